"""Loading ``deploy/`` and parsing the ``pq`` commands in it with the real CLI parser."""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from pqueue.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
DOCKERFILE = DEPLOY / "Dockerfile"
PROMETHEUS = DEPLOY / "prometheus.yml"
K8S = DEPLOY / "k8s"
GRAFANA = DEPLOY / "grafana"
DATASOURCES = GRAFANA / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS = GRAFANA / "provisioning" / "dashboards" / "pqueue.yml"
DASHBOARD = GRAFANA / "dashboards" / "pqueue.json"

#: The image's ENTRYPOINT and the name of the image compose and Kubernetes run.
ENTRYPOINT = "pq"
IMAGE = "pqueue:latest"


#: libyaml's safe loader where PyYAML has it (several times faster).
SafeLoader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@functools.cache
def load_yaml_documents(path: Path) -> tuple[Any, ...]:
    """Every YAML document of ``path``, parsed once per test run: callers must not change them."""
    return tuple(yaml.load_all(path.read_text(), Loader=SafeLoader))


def load_yaml(path: Path) -> dict[str, Any]:
    """One YAML document that must be a mapping (shared: do not change it)."""
    (data,) = load_yaml_documents(path)
    assert isinstance(data, dict), f"{path}: expected a mapping at the top"
    return data


@functools.cache
def _pq_parser() -> argparse.ArgumentParser:
    return build_parser()


def parse_pq(argv: list[str]) -> argparse.Namespace:
    """``pq ARGV`` through the CLI's own parser: an unknown flag or a bad value fails the test."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return _pq_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"pq {shlex.join(argv)}: rejected by pqueue.cli:\n{err.getvalue()}")


def host_port(address: str) -> tuple[str, int]:
    """``HOST:PORT`` split; the port as an int."""
    host, sep, port = address.rpartition(":")
    assert sep, f"{address!r}: expected HOST:PORT"
    assert host, f"{address!r}: no host"
    assert port.isdigit(), f"{address!r}: the port is not a number"
    return host, int(port)
