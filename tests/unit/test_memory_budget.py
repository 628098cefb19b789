"""``MemoryBudget``: readings off the request path, refusals that say what to do."""

from __future__ import annotations

import asyncio

import pytest

from pqueue.errors import ResourceExhaustedError
from pqueue.node.memory import MIB, MemoryBudget


class FakeRss:
    def __init__(self, value: int) -> None:
        self.value = value
        self.reads = 0
        self.read = asyncio.Event()

    def __call__(self) -> int:
        self.reads += 1
        self.read.set()
        return self.value


async def test_no_budget_reads_nothing_and_refuses_nothing() -> None:
    rss = FakeRss(10 * 1024 * MIB)
    budget = MemoryBudget(0, "n1", rss)
    budget.start()
    budget.check()
    await budget.stop()
    assert (rss.reads, budget.refusals) == (0, 0)


async def test_at_or_above_the_budget_enqueues_are_refused_until_it_drops() -> None:
    rss = FakeRss(100 * MIB)
    budget = MemoryBudget(100 * MIB, "n2", rss, interval_s=0.01)
    budget.start()  # read at once: the first call is already checked
    try:
        with pytest.raises(ResourceExhaustedError) as refused:
            budget.check()
        assert str(refused.value) == (
            "node n2 is out of memory for new jobs: its RSS is 100 MiB, at or above its "
            "memory budget of 100 MiB (pq node --memory-budget-mb); consume the backlog "
            "(lease and ack) to free memory, or raise the budget"
        )
        assert refused.value.retriable
        rss.value = 99 * MIB
        rss.read.clear()
        async with asyncio.timeout(10):
            await rss.read.wait()  # the sampling task reads it again
        assert not budget.over
        budget.check()
        assert budget.refusals == 1
    finally:
        await budget.stop()
    reads = rss.reads
    await asyncio.sleep(0.05)
    assert rss.reads == reads  # stopped: no more readings


def test_a_negative_budget_is_refused() -> None:
    with pytest.raises(ValueError, match="must not be negative"):
        MemoryBudget(-1)


async def test_consuming_the_backlog_reopens_the_door_though_the_rss_stays() -> None:
    """CPython keeps freed memory: the RSS stays at the budget after jobs
    leave, and the jobs held when it was reached are what fits."""
    rss = FakeRss(100 * MIB)
    held = [5000]
    budget = MemoryBudget(100 * MIB, "n3", rss, interval_s=3600, jobs=lambda: held[0])
    budget.start()
    try:
        assert budget.fits_jobs == 5000
        with pytest.raises(ResourceExhaustedError):
            budget.check()
        held[0] = 1000  # consumed; the RSS did not move
        budget._read()
        budget.check()
        held[0] = 5000  # refilled into the freed memory: the limit again
        budget._read()
        with pytest.raises(ResourceExhaustedError):
            budget.check()
        held[0], rss.value = 3000, 120 * MIB  # grew with fewer jobs: fewer fit
        budget._read()
        assert budget.fits_jobs == 3000
        with pytest.raises(ResourceExhaustedError):
            budget.check()
        rss.value = 50 * MIB  # restarted small: the figure is forgotten
        budget._read()
        assert budget.fits_jobs is None
        budget.check()
    finally:
        await budget.stop()
