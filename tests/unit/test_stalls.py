"""The event loop's stall watch (pqueue/wire/stalls.py): a held loop and a
collection are counted, a long stall is logged, the histograms scrape, and
stopping leaves no callback behind."""

from __future__ import annotations

import asyncio
import gc
import logging
import time

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from pqueue.wire.stalls import BUCKETS, Histogram, StallWatch


def test_a_histogram_counts_into_cumulative_buckets() -> None:
    h = Histogram()
    for seconds in (0.0005, 0.001, 0.003, 7.0):
        h.observe(seconds)
    buckets = dict(h.buckets())
    assert buckets["0.001"] == 2  # le: 0.001 itself is in its bucket
    assert buckets["0.005"] == 3
    assert buckets[str(BUCKETS[-1])] == 3
    assert buckets["+Inf"] == 4
    assert h.sum == pytest.approx(7.0045)


async def test_a_held_loop_and_a_collection_are_counted_and_the_stall_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="pqueue.wire.stalls")
    watch = StallWatch(interval_s=0.01, log_over_s=0.1)
    registry = CollectorRegistry(auto_describe=True)
    registry.register(watch)
    callbacks = len(gc.callbacks)
    watch.start()
    try:
        await asyncio.sleep(0.05)  # a few ticks
        assert dict(watch.lag.buckets())["+Inf"] >= 1
        full = dict(watch.gc[2].buckets())["+Inf"]
        time.sleep(0.25)  # noqa: ASYNC251 - the point: the loop held, nothing runs
        gc.collect()
        await asyncio.sleep(0.05)
    finally:
        await watch.stop()
    assert len(gc.callbacks) == callbacks
    late = dict(watch.lag.buckets())
    assert late["+Inf"] - late["0.1"] >= 1  # one tick came more than 0.1 s late
    assert dict(watch.gc[2].buckets())["+Inf"] >= full + 1
    lines = [r.getMessage() for r in caplog.records]
    assert all(line.startswith("event loop held ") for line in lines)
    assert max(int(line.split()[3]) for line in lines) >= 200, lines  # the 250 ms
    scraped = generate_latest(registry).decode()
    assert 'pq_gc_pause_seconds_count{generation="2"}' in scraped
    assert "pq_event_loop_lag_seconds_bucket" in scraped


async def test_stopping_a_watch_never_started_is_harmless() -> None:
    await StallWatch().stop()
