"""deploy/docker-compose.yml as the tests see it: services, ports, mounts, pq commands."""

from __future__ import annotations

import argparse
import shlex
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from tests.deploy.files import COMPOSE, DEPLOY, DOCKERFILE, IMAGE, load_yaml, parse_pq


def compose() -> dict[str, Any]:
    """The compose file."""
    return load_yaml(COMPOSE)


def services() -> dict[str, dict[str, Any]]:
    """Service name -> definition."""
    found: dict[str, dict[str, Any]] = compose()["services"]
    return found


def runs_pqueue(service: dict[str, Any]) -> bool:
    """The service runs our image (built from deploy/Dockerfile, or named pqueue:latest)."""
    build = service.get("build")
    if isinstance(build, dict):
        dockerfile = DEPLOY / build.get("context", ".") / build.get("dockerfile", "Dockerfile")
        if dockerfile.resolve() == DOCKERFILE.resolve():
            return True
    return service.get("image") == IMAGE


def pq_services() -> dict[str, dict[str, Any]]:
    """The services that run ``pq``."""
    return {name: s for name, s in services().items() if runs_pqueue(s)}


def command(service: dict[str, Any]) -> list[str]:
    """The arguments given to the ENTRYPOINT (a string command is split as compose does)."""
    cmd = service.get("command", [])
    return shlex.split(cmd) if isinstance(cmd, str) else [str(a) for a in cmd]


def pq_args(service: dict[str, Any]) -> argparse.Namespace:
    """The service's command as ``pq`` parses it."""
    return parse_pq(command(service))


def container_ports(service: dict[str, Any]) -> set[int]:
    """Ports the service exposes to the network or publishes to the host (container side)."""
    ports = {int(str(p).split("/")[0]) for p in service.get("expose", [])}
    for spec in service.get("ports", []):
        if isinstance(spec, dict):
            ports.add(int(spec["target"]))
        else:
            ports.add(int(str(spec).split("/")[0].rsplit(":", 1)[-1]))
    return ports


def published_ports(service: dict[str, Any]) -> dict[int, int]:
    """Host port -> container port of the service's ``ports``."""
    published: dict[int, int] = {}
    for spec in service.get("ports", []):
        if isinstance(spec, dict):
            published[int(spec["published"])] = int(spec["target"])
            continue
        parts = str(spec).split("/")[0].split(":")
        assert len(parts) >= 2, f"{spec!r}: no host port; compose would pick a random one"
        published[int(parts[-2])] = int(parts[-1])
    return published


@dataclass(frozen=True)
class Mount:
    """One entry of a service's ``volumes``."""

    source: str
    target: PurePosixPath
    bind: bool

    def host_path(self) -> Path:
        """A bind mount's source on the host (relative paths are relative to deploy/)."""
        return (DEPLOY / self.source).resolve()


def mounts(service: dict[str, Any]) -> list[Mount]:
    """The service's volumes and bind mounts, in either compose syntax."""
    found = []
    for spec in service.get("volumes", []):
        if isinstance(spec, dict):
            source, target = str(spec.get("source", "")), str(spec["target"])
            bind = spec.get("type") == "bind"
        else:
            source, target = str(spec).split(":")[:2]
            bind = source.startswith((".", "/", "~"))
        found.append(Mount(source, PurePosixPath(target), bind))
    return found


def resolve_in_container(service: dict[str, Any], path: str) -> Path | None:
    """The host file behind ``path`` in the service's container, if a bind mount holds it."""
    inside = PurePosixPath(path)
    for mount in sorted(mounts(service), key=lambda m: len(m.target.parts), reverse=True):
        if mount.bind and inside.is_relative_to(mount.target):
            return mount.host_path() / inside.relative_to(mount.target)
    return None
