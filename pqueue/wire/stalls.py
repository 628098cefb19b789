"""Where a process's event loop stops: how late a ticking timer fires, and
how long each cyclic garbage collection holds the loop.

A request's tail latency is set by the moments nothing on the loop runs: a
full collection walking a large heap, a long callback, a slow syscall. This
makes them visible to an operator, as two Prometheus histograms and a log
line per stall:

- ``pq_event_loop_lag_seconds``: how much later than asked a timer ticking
  every ``interval_s`` fired (the loop was held that long, by anything);
- ``pq_gc_pause_seconds{generation}``: each collection's duration
  (``gc.callbacks``), by generation;
- a WARNING when the loop was held longer than ``log_over_s``, saying how
  much of it the collector took.

The collector's callback runs inside any allocation, on any thread, so it
only adds to plain counters; no lock is taken there (a metrics lock held by
the thread the collection interrupted would deadlock). The histograms are
read from those counters when scraped. One watch per process (the entry
points start it; servers in one test process do not).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import gc
import logging
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector

logger = logging.getLogger(__name__)

#: Upper bounds of the histograms' buckets, in seconds.
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Histogram:
    """Counts per bucket and a sum, updated without a lock (one writer)."""

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(BUCKETS, seconds)] += 1
        self.sum += seconds

    def buckets(self) -> list[tuple[str, float]]:
        """Cumulative (upper bound, count) pairs, ``+Inf`` last."""
        out, total = [], 0
        for bound, count in zip((*map(str, BUCKETS), "+Inf"), self.counts, strict=True):
            total += count
            out.append((bound, float(total)))
        return out


class StallWatch(Collector):
    """The loop's lag and the collector's pauses (see the module's doc)."""

    def __init__(self, interval_s: float = 0.05, log_over_s: float = 0.1) -> None:
        self.interval_s = interval_s
        self.log_over_s = log_over_s
        self.lag = Histogram()
        self.gc = [Histogram() for _ in range(3)]
        #: Collections since the tick began: their seconds, and the longest.
        self._gc_seconds = 0.0
        self._gc_longest = (0.0, 0)
        self._gc_started = 0.0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start watching (on the running loop)."""
        gc.callbacks.append(self._on_gc)
        self._task = asyncio.get_running_loop().create_task(self._tick(), name="pq-stall-watch")

    async def stop(self) -> None:
        with contextlib.suppress(ValueError):
            gc.callbacks.remove(self._on_gc)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
            return
        seconds = time.perf_counter() - self._gc_started
        generation = min(int(info.get("generation", 2)), 2)
        self.gc[generation].observe(seconds)
        self._gc_seconds += seconds
        if seconds > self._gc_longest[0]:
            self._gc_longest = (seconds, generation)

    async def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._gc_seconds, self._gc_longest = 0.0, (0.0, 0)
            due = loop.time() + self.interval_s
            await asyncio.sleep(self.interval_s)
            late = max(loop.time() - due, 0.0)
            self.lag.observe(late)
            if late > self.log_over_s:
                longest, generation = self._gc_longest
                logger.warning(
                    "event loop held %.0f ms; cyclic garbage collections took %.0f ms "
                    "meanwhile (the longest %.0f ms, generation %d)",
                    late * 1000,
                    self._gc_seconds * 1000,
                    longest * 1000,
                    generation,
                )

    def collect(self) -> Iterator[HistogramMetricFamily]:
        yield HistogramMetricFamily(
            "pq_event_loop_lag_seconds",
            "How much later than asked a timer on the event loop fired (the loop was held).",
            buckets=self.lag.buckets(),
            sum_value=self.lag.sum,
        )
        pauses = HistogramMetricFamily(
            "pq_gc_pause_seconds",
            "How long each cyclic garbage collection took, by generation.",
            labels=["generation"],
        )
        for generation, hist in enumerate(self.gc):
            pauses.add_metric([str(generation)], hist.buckets(), hist.sum)
        yield pauses
