"""A leader that is stopped gracefully hands leadership over first.

Real node processes behind a real balancer: the leader gets SIGTERM while a
producer enqueues through the balancer; no enqueue fails and none stalls
for an election timeout.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from pqueue.client import Client
from pqueue.errors import PQueueError
from tests.faults.cluster import ProcCluster, started


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[ProcCluster]:
    async with started(tmp_path, balancer_probe_s=0.5) as c:
        yield c


async def test_a_gracefully_stopped_leader_hands_over_without_stalling_writes(
    cluster: ProcCluster,
) -> None:
    old = await cluster.leader()
    latencies: list[float] = []
    errors: list[PQueueError] = []
    stop = asyncio.Event()

    async def producer() -> None:
        async with Client(
            cluster.balancer_address, look_aside=False, timeout_s=10, max_retries=0
        ) as c:
            await c.create_queue("handover")
            i = 0
            while not stop.is_set():
                i += 1
                started = time.monotonic()
                try:
                    await c.enqueue("handover", f"j-{i}", idempotency_key=f"j-{i}")
                except PQueueError as exc:
                    errors.append(exc)
                latencies.append(time.monotonic() - started)
                await asyncio.sleep(0.005)

    task = asyncio.create_task(producer())
    try:
        await asyncio.sleep(1.0)
        before = len(latencies)
        cluster.procs[old].terminate()  # SIGTERM: a graceful stop
        new = await cluster.leader(among=[i for i in cluster.ports if i != old])
        await asyncio.to_thread(cluster.procs[old].wait, 15)
        await asyncio.sleep(1.0)
    finally:
        stop.set()
        await task
    assert new != old
    assert errors == []
    assert len(latencies) > before + 20  # writes went on through the stop
    assert max(latencies) <= 1.5, f"slowest enqueue {max(latencies):.2f} s"
    log = (cluster.root / f"n{old}.log").read_text()
    assert "handed over leadership" in log
