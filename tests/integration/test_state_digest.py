"""``Admin.StateDigest``: replicas that applied the same entries say so,
whatever their history, over real gRPC servers."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pqueue.client import Client
from pqueue.core.snapshot import state_hash
from pqueue.errors import PermissionDeniedError
from pqueue.node.auth import Verifier, issue
from pqueue.v1 import queue_pb2 as pb
from pqueue.wire.roles import ADMIN, PRODUCER
from tests.inproc import Cluster, one_node

SECRET = b"s" * 32


async def test_replicas_agree_and_one_rebuilt_from_a_snapshot_too(tmp_path: Path) -> None:
    cluster = Cluster(
        tmp_path,
        cluster_options={"snapshot_every_entries": 5},
    )
    await cluster.start()
    try:
        leader = await cluster.leader()
        lagging = next(i for i in cluster.servers if i != leader)
        await cluster.stop_node(lagging)
        shutil.rmtree(tmp_path / f"n{lagging}")  # wiped: it comes back by a snapshot
        async with Client(cluster.addresses[leader]) as c:
            for _ in range(30):
                await c.enqueue_batch(
                    "q", [pb.JobSpec(payload=b"p%d" % j, priority=j % 3) for j in range(20)]
                )
            for job in await c.lease("q", max_jobs=7):
                await c.ack("q", job.job_id, job.lease_id)
        await cluster.start_node(lagging)
        await cluster.settled(timeout_s=20)
        digests = set()
        for i, address in cluster.addresses.items():
            async with Client(address) as c:
                answer = await c.state_digest()
            digests.add((answer.applied_index, answer.sha256))
            assert answer.sha256 == state_hash(cluster.servers[i].node.machine)
        assert len(digests) == 1, digests
    finally:
        await cluster.stop()


async def test_only_an_admin_may_ask(tmp_path: Path) -> None:
    async with one_node(tmp_path, verifier=Verifier(SECRET)) as srv:
        async with Client(srv.address, token=issue(SECRET, "ops", [ADMIN], 600)) as c:
            assert len((await c.state_digest()).sha256) == 64
        async with Client(srv.address, token=issue(SECRET, "acme", [PRODUCER], 600)) as c:
            with pytest.raises(PermissionDeniedError):
                await c.state_digest()
