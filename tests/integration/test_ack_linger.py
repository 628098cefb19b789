"""Acks alone wait a moment for company (``ClusterConfig.ack_linger_ms``):
at a low, steady load an ack shares the next enqueue's entry instead of
taking one of its own."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from pqueue.client import Client
from pqueue.node.replicated import ClusterConfig, ReplicatedLog
from pqueue.v1 import queue_pb2 as pb
from tests.inproc import Cluster


async def started(tmp_path: Path, linger_ms: float) -> Cluster:
    c = Cluster(tmp_path, cluster_options={"ack_linger_ms": linger_ms})
    await c.start()
    return c


@pytest.fixture
async def lingering(tmp_path: Path) -> AsyncIterator[Cluster]:
    # Long enough that an enqueue sent after the ack surely comes within it.
    c = await started(tmp_path, 100)
    try:
        yield c
    finally:
        await c.stop()


async def leased(c: Client, queue: str) -> tuple[int, int]:
    await c.enqueue(queue, b"work")
    [job] = await c.lease(queue, max_jobs=1, wait_ms=0)
    return job.job_id, job.lease_id


async def test_an_ack_alone_waits_and_shares_the_next_enqueues_entry(lingering: Cluster) -> None:
    leader = await lingering.leader()
    address = lingering.addresses[leader]
    async with (
        Client(address, max_retries=0) as worker,
        Client(address, max_retries=0) as producer,
    ):
        await producer.create_queue("q")
        job_id, lease_id = await leased(worker, "q")
        log = lingering.servers[leader].node.log
        assert isinstance(log, ReplicatedLog)
        ack = asyncio.create_task(worker.ack("q", job_id, lease_id))
        await asyncio.sleep(0.02)
        assert not ack.done()  # held back: no entry was open, and it is alone
        enqueued = await producer.enqueue("q", b"next")
        await ack
        # One entry holds both: the ack went along with the enqueue.
        assert worker.last_log_index == enqueued.log_index
        job = await producer.get_job("q", job_id, consistent=True)
        assert job.state == pb.JOB_STATE_COMPLETED


async def test_an_ack_alone_goes_once_its_linger_is_over(lingering: Cluster) -> None:
    leader = await lingering.leader()
    async with Client(lingering.addresses[leader], max_retries=0) as c:
        await c.create_queue("q")
        job_id, lease_id = await leased(c, "q")
        before = c.last_log_index
        started_at = time.monotonic()
        await c.ack("q", job_id, lease_id)
        waited = time.monotonic() - started_at
        assert c.last_log_index == before + 1  # its own entry, nobody else came
        assert waited >= 0.09  # it waited its 100 ms linger (less a timer's slack)
        assert (await c.get_job("q", job_id, consistent=True)).state == pb.JOB_STATE_COMPLETED


async def test_without_a_linger_an_ack_goes_at_once(tmp_path: Path) -> None:
    cluster = await started(tmp_path, 0)
    try:
        leader = await cluster.leader()
        async with Client(cluster.addresses[leader], max_retries=0) as c:
            await c.create_queue("q")
            job_id, lease_id = await leased(c, "q")
            before = c.last_log_index
            # Nothing to wait for: it is proposed as it arrives (the linger
            # test above waits 100 ms; this one has no floor to show).
            await asyncio.wait_for(c.ack("q", job_id, lease_id), timeout=5)
            assert c.last_log_index == before + 1
    finally:
        await cluster.stop()


def test_the_linger_is_bounded() -> None:
    with pytest.raises(ValueError, match="ack_linger_ms"):
        ClusterConfig(node_id=1, ack_linger_ms=101)
    with pytest.raises(ValueError, match="ack_linger_ms"):
        ClusterConfig(node_id=1, ack_linger_ms=-1)
