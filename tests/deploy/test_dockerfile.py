"""deploy/Dockerfile and the health check it installs."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tests.deploy.dockerfile import stages
from tests.deploy.files import DEPLOY, DOCKERFILE, ENTRYPOINT, ROOT

#: gRPC (balancer, node), the nodes' peer port, pq web's HTTP, metrics (balancer, node).
PORTS = {7700, 7701, 7711, 7780, 9700, 9701}
DATA_DIR = "/var/lib/pqueue"
DOCKERIGNORE = DOCKERFILE.with_name(DOCKERFILE.name + ".dockerignore")


def final_user() -> str:
    """The user the image runs as (its last USER), without the group."""
    users = stages()[-1].all("USER")
    assert users, "the image runs as root: no USER"
    return users[-1].args.split(":")[0]


def test_every_stage_is_python_3_11() -> None:
    names: set[str] = set()
    for stage in stages():
        assert stage.image.startswith("python:3.11") or stage.image in names, stage.image
        if stage.name:
            names.add(stage.name)


def test_runs_as_a_fixed_non_root_uid() -> None:
    user = final_user()
    assert user not in ("root", "0"), "the image runs as root"
    assert user.isdigit(), "a numeric uid, so that Kubernetes' runAsNonRoot can verify it"


def test_entrypoint_is_the_pq_console_script() -> None:
    (entrypoint,) = stages()[-1].all("ENTRYPOINT")
    assert entrypoint.args.startswith("["), "exec form: pq is PID 1 and gets SIGTERM"
    assert entrypoint.words() == [ENTRYPOINT]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts[ENTRYPOINT] == "pqueue.cli:main"


def test_exposes_the_ports_and_the_data_volume() -> None:
    final = stages()[-1]
    exposed = {int(p.split("/")[0]) for e in final.all("EXPOSE") for p in e.words()}
    assert exposed == PORTS
    assert any(DATA_DIR in v.words() for v in final.all("VOLUME")), f"no VOLUME {DATA_DIR}"
    assert any(DATA_DIR in r.args and final_user() in r.args for r in final.all("RUN")), (
        f"{DATA_DIR} is not created for uid {final_user()}"
    )


def test_copies_every_package_pyproject_ships() -> None:
    find = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    packages = {pattern.rstrip("*") for pattern in find["find"]["include"]}
    copied = {
        source
        for stage in stages()
        for copy in stage.all("COPY")
        if "from" not in copy.flags()
        for source in copy.operands()[:-1]
    }
    assert packages <= copied, f"not copied into the build: {sorted(packages - copied)}"
    assert {"pyproject.toml", "README.md"} <= copied, "the wheel's metadata needs both"


def test_installs_the_web_extra_so_pq_web_runs_in_the_image() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert "web" in extras, "pyproject has no [web] extra"
    installs = [r.args for s in stages() for r in s.all("RUN") if "pip install" in r.args]
    assert any(".whl)[web]" in args for args in installs), installs


def test_build_context_allows_what_the_dockerfile_copies() -> None:
    lines = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", "an allow list: exclude everything, then name what the build needs"
    allowed = [line[1:] for line in lines if line.startswith("!")]
    for stage in stages():
        for copy in stage.all("COPY"):
            if "from" in copy.flags():
                continue
            for source in copy.operands()[:-1]:
                assert (ROOT / source).exists(), f"COPY {source}: no such file"
                assert any(source == a or source.startswith(a + "/") for a in allowed), (
                    f"COPY {source}: left out of the build context by {DOCKERIGNORE.name}"
                )


@pytest.fixture
def health_server() -> Iterator[tuple[str, Any, grpc.Server]]:
    server = grpc.server(ThreadPoolExecutor(max_workers=2), options=[("grpc.so_reuseport", 0)])
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}", servicer, server
    finally:
        server.stop(None)


def healthcheck(address: str) -> int:
    done = subprocess.run(
        [sys.executable, str(DEPLOY / "healthcheck.py"), address, "--timeout-s", "5"],
        capture_output=True,
        timeout=30,
        check=False,
    )
    return done.returncode


def test_healthcheck_passes_only_while_serving(
    health_server: tuple[str, Any, grpc.Server],
) -> None:
    address, servicer, server = health_server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    assert healthcheck(address) == 0
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert healthcheck(address) == 1
    server.stop(None)
    assert healthcheck(address) == 1, "nothing listening"
