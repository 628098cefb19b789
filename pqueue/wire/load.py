"""What a node tells balancers about its load: CPU and the work it holds.

CPU is the utilization of the CPUs this process may run on (its affinity
set), not of the process alone: a node pinned beside a busy neighbour is
busy too, though its own process is idle. On an unpinned node that is the
whole host. Each sampler keeps its own previous reading (psutil's
module-level ``cpu_percent`` state would be shared by every node in a test
process), and readings closer together than ``min_interval_s`` reuse the
last figure rather than divide by a tiny interval.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import psutil


@dataclass(frozen=True)
class CpuReading:
    """CPU use over the interval since the previous reading."""

    utilization: float  # of the CPUs this process may run on, 0..1
    process_cores: float  # this process's own use, in cores (1.0 = one core busy)
    cpu_count: int  # how many CPUs this process may run on
    rss_bytes: int


def _affinity() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return list(range(psutil.cpu_count() or 1))


def _busy_total(times: Any) -> tuple[float, float]:
    """(busy, total) seconds of one CPU's ``psutil.cpu_times`` entry."""
    # Linux counts guest time inside user (and guest_nice inside nice) too.
    guest = getattr(times, "guest", 0.0) + getattr(times, "guest_nice", 0.0)
    total = float(sum(times)) - guest
    idle = float(times.idle + getattr(times, "iowait", 0.0))
    return total - idle, total


class CpuSampler:
    """Utilization since the previous call (the first call measures from creation)."""

    def __init__(self, min_interval_s: float = 0.25) -> None:
        self.min_interval_s = min_interval_s
        self._process = psutil.Process()
        self._last = self._sample()
        self._reading = CpuReading(0.0, 0.0, len(self._last[2]), 0)

    def _sample(self) -> tuple[float, float, list[int], list[tuple[float, float]]]:
        cpus = _affinity()
        per_cpu = psutil.cpu_times(percpu=True)
        if len(per_cpu) != (psutil.cpu_count() or 0) or max(cpus) >= len(per_cpu):
            # psutil lists online CPUs only; with some offline its index is
            # not the CPU id. Fall back to the whole host.
            cpus = list(range(len(per_cpu)))
        busy_total = [_busy_total(per_cpu[i]) for i in cpus]
        t = self._process.cpu_times()
        return time.monotonic(), t.user + t.system, cpus, busy_total

    def read(self) -> CpuReading:
        """The figures since the previous reading."""
        now = time.monotonic()
        if now - self._last[0] < self.min_interval_s:
            return self._reading
        sample = self._sample()
        then, proc_then, cpus_then, bt_then = self._last
        at, proc_now, cpus_now, bt_now = sample
        busy = total = 0.0
        if cpus_then == cpus_now:
            for (b0, t0), (b1, t1) in zip(bt_then, bt_now, strict=True):
                busy += max(0.0, b1 - b0)
                total += max(0.0, t1 - t0)
        utilization = min(1.0, busy / total) if total > 0 else self._reading.utilization
        self._reading = CpuReading(
            utilization=utilization,
            process_cores=max(0.0, proc_now - proc_then) / max(at - then, 1e-6),
            cpu_count=len(cpus_now),
            rss_bytes=self._process.memory_info().rss,
        )
        self._last = sample
        return self._reading
