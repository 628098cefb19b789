"""Linearizable reads and read-your-writes against real, partitioned processes.

A ``consistent`` read on an old leader that was paused, then cut off while
the others elected a new leader and took writes, must be refused or answered
correctly, never stale. A read carrying a write's ``log_index`` as
``min_index`` never answers from a node that has not applied that write.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pqueue.client import Client
from pqueue.errors import NotFoundError, NotLeaderError, PQueueError, UnavailableError
from tests.faults.cluster import ProcCluster, started


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[ProcCluster]:
    async with started(tmp_path, partitionable=True) as c:
        yield c


@dataclass
class Read:
    started: float
    ended: float
    enqueued_total: int | None  # None: refused
    error: PQueueError | None = None


def check_counter_reads(
    reads: list[Read], acked_at: list[float], attempted_at: list[float]
) -> None:
    """A read is linearizable for a counter of enqueues: it sees every
    enqueue acknowledged before it began and none attempted after it ended."""
    for read in reads:
        if read.enqueued_total is None:
            continue
        floor = sum(1 for t in acked_at if t < read.started)
        ceiling = sum(1 for t in attempted_at if t < read.ended)
        assert floor <= read.enqueued_total <= ceiling, (
            f"stale read: saw {read.enqueued_total} enqueues, "
            f"{floor} were acknowledged before it began"
        )


async def test_a_consistent_read_on_a_cut_off_old_leader_is_never_stale(
    cluster: ProcCluster,
) -> None:
    old = await cluster.leader()
    others = [i for i in cluster.ports if i != old]
    async with Client(cluster.address(old), timeout_s=5) as c:
        await c.create_queue("r")
    cluster.pause(old)  # it still believes it leads when it wakes up
    cluster.isolate(old)
    acked_at: list[float] = []
    attempted_at: list[float] = []
    try:
        new = await cluster.leader(among=others)
        async with Client(cluster.address(new), timeout_s=5) as w:
            for i in range(5):
                attempted_at.append(time.monotonic())
                await w.enqueue("r", f"w-{i}", idempotency_key=f"w-{i}")
                acked_at.append(time.monotonic())
    finally:
        cluster.resume(old)
    reads: list[Read] = []
    async with Client(cluster.address(old), timeout_s=10, max_retries=0) as r:
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            started = time.monotonic()
            try:
                (stats,) = await r.stats("r", consistent=True)
                reads.append(Read(started, time.monotonic(), stats.enqueued_total))
            except PQueueError as exc:
                reads.append(Read(started, time.monotonic(), None, exc))
                await asyncio.sleep(0.05)
        cluster.heal()
        # Healed, the old leader follows and a consistent read through it is
        # forwarded to the leader: correct again.
        for _ in range(100):
            try:
                started = time.monotonic()
                (stats,) = await r.stats("r", consistent=True)
                reads.append(Read(started, time.monotonic(), stats.enqueued_total))
                break
            except PQueueError:
                await asyncio.sleep(0.1)
    check_counter_reads(reads, acked_at, attempted_at)
    refusals = [r.error for r in reads if r.error is not None]
    # Refused as a client retries elsewhere: not leader, or unavailable.
    assert all(e.retriable or isinstance(e, NotLeaderError) for e in refusals), refusals
    assert reads[-1].enqueued_total == 5
    assert any(r.enqueued_total is None for r in reads)  # the cut-off node refused


async def test_a_read_with_min_index_never_misses_the_callers_write(
    cluster: ProcCluster,
) -> None:
    leader = await cluster.leader()
    lagging = next(i for i in cluster.ports if i != leader)
    async with Client(cluster.address(leader), timeout_s=5) as w:
        await w.create_queue("ryw")
        # Let every node learn the queue, then cut one follower off.
        await w.stats("ryw", consistent=True)
        await asyncio.sleep(0.5)
        cluster.isolate(lagging)
        sent = await w.enqueue("ryw", b"mine")
        assert sent.log_index > 0
        assert w.last_log_index == sent.log_index
    async with Client(cluster.address(lagging), timeout_s=10, max_retries=0) as r:
        # Without the index, the lagging follower answers from its old state.
        r.read_your_writes = False
        with pytest.raises(NotFoundError):
            await r.get_job("ryw", sent.job_id)
        # With it, the follower waits, then refuses: retriable, never stale.
        r.read_your_writes = True
        r.last_log_index = sent.log_index
        with pytest.raises(UnavailableError) as refused:
            await r.get_job("ryw", sent.job_id)
        assert refused.value.retriable
        cluster.heal()
        job = await r.get_job("ryw", sent.job_id)  # waits until it has applied it
        assert job.payload == b"mine"
