"""The process's CPU and memory, read with psutil at scrape time.

Registered on each server's own registry (node or balancer). Several servers
in one test process report the same process, which is the truth.
"""

from __future__ import annotations

from collections.abc import Iterator

import psutil
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from pqueue.wire.load import CpuSampler


class ProcessCollector(Collector):
    """``pq_process_*`` and ``pq_host_cpu_utilization_ratio``."""

    def __init__(self) -> None:
        self._process = psutil.Process()
        self._cpu = CpuSampler(min_interval_s=1.0)

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        p = self._process
        with p.oneshot():
            times = p.cpu_times()
            memory = p.memory_info()
            threads = p.num_threads()
            fds = p.num_fds() if hasattr(p, "num_fds") else 0
            started = p.create_time()
        yield CounterMetricFamily(
            "pq_process_cpu_seconds",
            "CPU time this process used, user and system.",
            value=times.user + times.system,
        )
        yield GaugeMetricFamily(
            "pq_process_resident_memory_bytes", "Resident set size.", value=memory.rss
        )
        yield GaugeMetricFamily(
            "pq_process_virtual_memory_bytes", "Virtual memory size.", value=memory.vms
        )
        yield GaugeMetricFamily("pq_process_open_fds", "Open file descriptors.", value=fds)
        yield GaugeMetricFamily("pq_process_threads", "OS threads.", value=threads)
        yield GaugeMetricFamily(
            "pq_process_start_time_seconds",
            "When the process started, in seconds since the epoch.",
            value=started,
        )
        yield GaugeMetricFamily(
            "pq_host_cpu_utilization_ratio",
            "Busy share of the CPUs this process may run on, since the last scrape (0..1).",
            value=self._cpu.read().utilization,
        )
