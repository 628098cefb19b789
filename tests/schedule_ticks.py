"""Check that a schedule's ticks made exactly one job each (integration and
fault tests): the jobs carry their tick in their idempotency key."""

from __future__ import annotations

import asyncio
import time

from pqueue.client import Client
from pqueue.core.schedules import tick_key
from pqueue.errors import PQueueError


async def tick_jobs(c: Client, queue: str, name: str) -> dict[int, list[int]]:
    """Tick time -> the ids of the jobs made for it, from every job in ``queue``
    (leased, then read back with ``GetJob`` for its key)."""
    by_tick: dict[int, list[int]] = {}
    prefix = tick_key(name, 0).removesuffix("0")
    while True:
        jobs = await c.lease(queue, max_jobs=1000, lease_ms=600_000)
        if not jobs:
            return by_tick
        for leased in jobs:
            job = await c.get_job(queue, leased.job_id, consistent=True)
            assert job.idempotency_key.startswith(prefix), job.idempotency_key
            tick = int(job.idempotency_key.removeprefix(prefix))
            by_tick.setdefault(tick, []).append(job.job_id)


def assert_one_per_tick(by_tick: dict[int, list[int]], step_ms: int, at_least: int) -> list[int]:
    """Every tick from the first to the last, ``step_ms`` apart, has exactly
    one job; there are at least ``at_least``. The ticks, in order."""
    ticks = sorted(by_tick)
    assert len(ticks) >= at_least, f"only {len(ticks)} ticks"
    doubled = {t: ids for t, ids in by_tick.items() if len(ids) != 1}
    assert not doubled, f"ticks with more than one job: {doubled}"
    missing = sorted(set(range(ticks[0], ticks[-1] + 1, step_ms)) - set(ticks))
    assert not missing, f"ticks without a job: {missing}"
    assert all(t % step_ms == 0 for t in ticks)
    return ticks


async def wait_jobs(c: Client, queue: str, count: int, timeout_s: float) -> None:
    """Until ``queue`` has had ``count`` jobs enqueued (read through ``c``,
    riding out failovers)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if (await c.stats(queue))[0].enqueued_total >= count:
                return
        except PQueueError:
            pass
        await asyncio.sleep(0.2)
    raise AssertionError(f"fewer than {count} jobs in {timeout_s} s")
