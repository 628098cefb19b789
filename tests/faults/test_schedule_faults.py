"""Cron schedules on real processes: a one-second schedule on a 3-node
cluster whose leader is killed (kill -9) twice enqueues exactly one job per
tick (MISSED_TICKS_ALL), checked over at least 30 ticks, and every replica
ends with the same state (issue 16's acceptance test; its short form on an
in-process cluster is tests/integration/test_schedules.py)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from pqueue.client import Client
from pqueue.errors import FailedPreconditionError, PQueueError
from tests.faults.cluster import ProcCluster, started
from tests.schedule_ticks import assert_one_per_tick, tick_jobs, wait_jobs


async def put_when_ready(c: Client) -> None:
    """Put the schedule once every member has announced the lifecycle feature."""
    deadline = time.monotonic() + 20
    while True:
        try:
            await c.put_schedule("cron", "beat", "* * * * * *", "beat", missed="all")
            return
        except FailedPreconditionError:  # a member not heard from yet
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


async def kill_the_leader(cluster: ProcCluster) -> int:
    """kill -9 the leader; once another leads, start it again. The old leader."""
    old = await cluster.leader()
    cluster.kill9(old)
    await cluster.leader(among=[i for i in cluster.ports if i != old])
    cluster.launch(old)
    return old


async def same_digest(cluster: ProcCluster, timeout_s: float = 20) -> None:
    """Every node reaches the same applied index with the same state digest."""
    deadline = time.monotonic() + timeout_s
    answers: dict[int, tuple[int, str]] = {}
    while time.monotonic() < deadline:
        try:
            for i in cluster.ports:
                async with Client(cluster.address(i), max_retries=0, timeout_s=2) as c:
                    d = await c.state_digest()
                answers[i] = (d.applied_index, d.sha256)
        except PQueueError:
            await asyncio.sleep(0.2)
            continue
        if len(set(answers.values())) == 1:
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"replicas differ: {answers}")


# ~40 s; make test keeps tests/integration/test_schedules.py's
# test_one_job_per_tick_across_a_leader_change (one leader change).
@pytest.mark.slow
async def test_one_job_per_tick_with_the_leader_killed_twice(tmp_path: Path) -> None:
    async with started(tmp_path) as cluster:
        async with Client(cluster.endpoint, max_retries=20, timeout_s=5) as c:
            await c.create_queue("cron")
            await put_when_ready(c)
            await wait_jobs(c, "cron", 8, timeout_s=30)
            first = await kill_the_leader(cluster)
            await wait_jobs(c, "cron", 18, timeout_s=30)
            second = await kill_the_leader(cluster)
            await wait_jobs(c, "cron", 34, timeout_s=30)
            await c.pause_schedule("cron", "beat")
            by_tick = await tick_jobs(c, "cron", "beat")
            stats = (await c.stats("cron", consistent=True))[0]
        ticks = assert_one_per_tick(by_tick, 1000, at_least=30)
        assert stats.enqueued_total == len(ticks)
        print(f"\n{len(ticks)} ticks, one job each; leaders killed: n{first}, n{second}")
        await same_digest(cluster)
