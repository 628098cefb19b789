"""Identity on disk with real processes: a member restarted the wrong way is
refused, and the cluster is not split (issue 12, item 5)."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from pqueue.client import Client
from pqueue.errors import PQueueError
from tests.faults.cluster import ProcCluster, started
from tests.proc import NodeProcess


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[ProcCluster]:
    async with started(tmp_path) as c:
        yield c


def refused(data_dir: Path, node_id: str, *extra: str) -> str:
    """Start ``pq node`` on ``data_dir`` as given; it must exit 1. Its log."""
    node = NodeProcess(data_dir, node_id, extra)
    try:
        with pytest.raises(RuntimeError, match=r"exit 1\)"):
            node.start()
    finally:
        node.ensure_stopped()
    return (data_dir.parent / f"{node_id}.log").read_text()


async def payload_on(address: str, job_id: int, timeout_s: float = 15.0) -> bytes:
    """The job's payload as the node at ``address`` has applied it (waits for it)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            async with Client(address, timeout_s=1.0, max_retries=0) as c:
                return (await c.get_job("q", job_id)).payload
        except PQueueError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


async def test_a_member_restarted_alone_is_refused_and_the_cluster_stays_one(
    cluster: ProcCluster, tmp_path: Path
) -> None:
    leader = await cluster.leader()
    victim = next(i for i in cluster.ports if i != leader)
    async with Client(cluster.address(leader), max_retries=2) as c:
        first = (await c.enqueue("q", b"before")).job_id
    await payload_on(cluster.address(victim), first)
    cluster.kill9(victim)

    # The README's old hint: `pq node --data-dir .cluster/nN`, no --peers.
    log = refused(tmp_path / f"n{victim}", str(victim))
    assert "refusing to start alone (no --peers)" in log
    assert f"--node-id {victim} --peers 1=" in log  # says what to run instead
    # ...and as another member, and in another cluster, neither.
    peers = ",".join(f"{i}={cluster.address(i)}" for i in sorted(cluster.ports))
    log = refused(tmp_path / f"n{victim}", str(leader), "--peers", peers)
    assert f"refusing to start as node {leader}" in log
    log = refused(tmp_path / f"n{victim}", str(victim), "--peers", peers, "--cluster-id", "b")
    assert "refusing to start in cluster 'b'" in log
    # A dir from before identity records (none kept): its ballots give it away.
    db = sqlite3.connect(tmp_path / f"n{victim}" / "pqueue.db")
    try:
        db.execute("DELETE FROM identity")
        db.commit()
    finally:
        db.close()
    log = refused(tmp_path / f"n{victim}", str(victim))
    assert f"holds ballots of nodes [{leader}]" in log

    # The cluster was never split: one leader, and a job id has one payload.
    async with Client(cluster.address(leader), max_retries=2) as c:
        second = (await c.enqueue("q", b"after")).job_id
    cluster.launch(victim)  # the right way
    assert await payload_on(cluster.address(victim), second) == b"after"
    assert await payload_on(cluster.address(victim), first) == b"before"
    assert await cluster.leader() == leader
