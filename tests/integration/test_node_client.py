"""The Node.js client of docs/other-languages.md (clients/node), built from
proto-bundle/ alone, against real ``pq node`` processes: it enqueues, leases
and acks, and tells UNAVAILABLE + NOT_TAKEN from a plain UNAVAILABLE.

Needs ``node`` and ``npm`` (``npm ci`` runs here when clients/node has no
node_modules). Without them the tests skip, and fail where CI is set (CI or
PQ_TEST_REQUIRE_NODE), so that CI never passes them by skipping.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import NoReturn

import pytest

from pqueue.cli.devcluster import free_ports
from pqueue.client import Client
from pqueue.errors import PQueueError
from pqueue.v1 import queue_pb2 as pb
from tests.faults.cluster import ProcCluster
from tests.proc import NodeProcess

ROOT = Path(__file__).resolve().parents[2]
CLIENT_DIR = ROOT / "clients" / "node"


def _unavailable(why: str) -> NoReturn:
    if os.environ.get("CI") or os.environ.get("PQ_TEST_REQUIRE_NODE"):
        pytest.fail(f"{why} (CI needs it: the other-language client is part of the contract)")
    pytest.skip(why)


@pytest.fixture(scope="module")
def node_bin() -> str:
    """The ``node`` binary, with clients/node's pinned packages installed."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        _unavailable("node and npm are not installed")
    if not (CLIENT_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir():
        done = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund"],
            cwd=CLIENT_DIR,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert done.returncode == 0, f"npm ci failed:\n{done.stdout}\n{done.stderr}"
    return node


async def run_client(node: str, address: str, queue: str = "node-demo") -> tuple[int, list[str]]:
    """Run clients/node/client.js against ``address``: exit status, output lines."""
    proc = await asyncio.create_subprocess_exec(
        node,
        str(CLIENT_DIR / "client.js"),
        address,
        queue,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "NODE_NO_WARNINGS": "1"},  # an older node's notices are not errors
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert not err, err.decode()  # an uncaught exception would show here
    return proc.returncode or 0, out.decode().splitlines()


async def test_enqueue_lease_ack(node_bin: str, tmp_path: Path) -> None:
    node = NodeProcess(tmp_path / "n1")
    try:
        address = node.start()
        status, lines = await run_client(node_bin, address, "from-node")
        assert status == 0, lines
        assert len(lines) == 3, lines
        enqueued, leased, acked = lines
        job_id = int(enqueued.removeprefix("enqueued "))
        assert leased.startswith(f"leased {job_id} lease ")
        assert leased.endswith(" payload hello")
        assert acked == "acked 1"
        async with Client(address, timeout_s=10.0, max_retries=0) as client:
            job = await client.get_job("from-node", job_id)
        assert job.state == pb.JOB_STATE_COMPLETED
        assert job.payload == b"hello"
    finally:
        node.ensure_stopped()


async def test_not_taken_from_a_node_without_quorum(node_bin: str, tmp_path: Path) -> None:
    # Node 1 of three, alone: it elects nobody, so it takes no write and
    # says so (UNAVAILABLE with ErrorInfo NOT_TAKEN).
    cluster = ProcCluster(tmp_path, nodes=3)
    cluster.allocate_ports()
    cluster.launch(1)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                async with Client(cluster.address(1), timeout_s=0.5, max_retries=0) as c:
                    assert (await c.node_status()).role != "leader"
                break
            except PQueueError:
                assert time.monotonic() < deadline, "node 1 did not answer"
                await asyncio.sleep(0.1)
        status, lines = await run_client(node_bin, cluster.address(1))
        assert status == 1
        assert len(lines) == 1, lines
        assert (
            lines[0]
            == 'NOT_TAKEN (did not run, safe to retry): no leader yet {"cause":"NO_LEADER"}'
        )

    finally:
        await cluster.stop()


async def test_plain_unavailable_where_nobody_listens(node_bin: str) -> None:
    (port,) = free_ports(1)
    status, lines = await run_client(node_bin, f"127.0.0.1:{port}")
    assert status == 1
    assert len(lines) == 1, lines
    assert lines[0].startswith("UNAVAILABLE (no details) (may have run): ")
