"""An idle leader holds one side's entry for the other side's commands
(``ClusterConfig.mix_wait_ms``, ``pqueue.node.mixing``), through real gRPC."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from pqueue.node.replicated import ReplicatedLog
from pqueue.v1 import queue_pb2 as pb
from pqueue.v1 import queue_pb2_grpc as pbg
from tests.inproc import Cluster
from tests.integration.test_group_commit import gate_persist, until

#: Long enough that a hold which should not happen, or should have ended
#: early, cannot hide in a test's timing.
HOLD_MS = 1000


class Leader:
    def __init__(self, cluster: Cluster, leader: int, stub: pbg.QueueAsyncStub) -> None:
        self.cluster = cluster
        self.id = leader
        self.stub = stub
        log = cluster.servers[leader].node.log
        assert isinstance(log, ReplicatedLog)
        self.log = log

    async def enqueue(self, payload: bytes) -> pb.EnqueueResponse:
        request = pb.EnqueueRequest(queue="q", job=pb.JobSpec(payload=payload))
        return await self.stub.Enqueue(request)


@pytest.fixture
async def leader(tmp_path: Path) -> AsyncIterator[Leader]:
    # Slow ticks: followers may hold their votes a while (an election
    # timeout is 1-2 s); a hold of HOLD_MS is allowed for the test.
    c = Cluster(tmp_path, cluster_options={"tick_ms": 100, "mix_wait_ms": HOLD_MS})
    await c.start()
    try:
        leader = await c.leader()
        async with grpc.aio.insecure_channel(c.addresses[leader]) as channel:
            yield Leader(c, leader, pbg.QueueStub(channel))
    finally:
        await c.stop()


async def test_a_lease_queued_behind_an_enqueue_waits_for_the_next_and_shares_its_entry(
    leader: Leader,
) -> None:
    gate = asyncio.Event()
    for i, server in leader.cluster.servers.items():
        if i != leader.id:
            gate_persist(server.node.storage, gate)
    try:
        first = asyncio.ensure_future(leader.enqueue(b"a"))
        await until(lambda: leader.log.status().pending == 1 and not leader.log._proposals)
        # A consumer's lease queues behind the producer's open entry.
        lease = asyncio.ensure_future(leader.stub.Lease(pb.LeaseRequest(queue="q")))
        await until(lambda: len(leader.log._proposals) == 1)
    finally:
        gate.set()
    opened = await first
    # That entry committed; the lease, alone, is held for the producers...
    await asyncio.sleep(0.05)
    assert not lease.done()
    started = time.monotonic()
    second = await leader.enqueue(b"b")
    leased = await lease
    # ...ends as the next enqueue comes (not when the hold runs out), and
    # shares its entry (in order of arrival: the lease first, as it would have).
    assert time.monotonic() - started < HOLD_MS / 1000 * 0.8
    assert leased.log_index == second.log_index == opened.log_index + 1
    assert [job.job_id for job in leased.jobs] == [opened.job_id]
    # A hold was joined: the next lone command finds the log idle and still
    # waits for the other side; this time nobody comes, and the hold runs out.
    started = time.monotonic()
    again = await leader.stub.Lease(pb.LeaseRequest(queue="q"))
    assert time.monotonic() - started >= HOLD_MS / 1000 * 0.95
    assert again.log_index == second.log_index + 1
    assert [job.job_id for job in again.jobs] == [second.job_id]


async def test_at_low_load_a_lone_ack_is_not_held(leader: Leader) -> None:
    """A waiting long poll's lease rides behind the enqueue (one entry of
    both sides); the worker's ack then finds the log idle, and goes at once."""
    async with asyncio.timeout(HOLD_MS / 1000 * 0.8):
        lease = asyncio.ensure_future(leader.stub.Lease(pb.LeaseRequest(queue="q", wait_ms=10_000)))
        await until(lambda: leader.cluster.servers[leader.id].node.long_polls.waiting == 1)
        enqueued = await leader.enqueue(b"a")
        leased = await lease
        assert leased.log_index == enqueued.log_index  # the ride: one entry
        [job] = leased.jobs
        ack = pb.AckRequest(
            queue="q", leases=[pb.JobLease(job_id=job.job_id, lease_id=job.lease_id)]
        )
        await leader.stub.Ack(ack)


async def test_a_side_working_alone_is_not_held(leader: Leader) -> None:
    async with asyncio.timeout(5):  # each enqueue held a second would take 20
        indexes = [(await leader.enqueue(b"x")).log_index for _ in range(20)]
    assert indexes == list(range(indexes[0], indexes[0] + 20))
