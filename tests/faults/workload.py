"""Producers and consumers against a cluster, recording a History.

Clients stay on the endpoint they are given (``look_aside=False``): given a
balancer, a fault run tests the balancer's proxy; look-aside's own fault
test is tests/integration/test_look_aside.py."""

from __future__ import annotations

import asyncio
import random
import time

from pqueue.client import Client
from pqueue.errors import LeaseLostError, NotFoundError, PQueueError
from tests.faults.history import History

QUEUE = "faults"
LEASE_MS = 2_000


def now_ms() -> int:
    return time.time_ns() // 1_000_000


async def produce(endpoint: str, history: History, name: str, stop: asyncio.Event) -> None:
    async with Client(endpoint, look_aside=False, timeout_s=3, max_retries=6) as c:
        i = 0
        while not stop.is_set():
            i += 1
            payload = f"{name}-{i}".encode()
            history.enqueue_attempt(payload)
            try:
                await c.enqueue(QUEUE, payload, idempotency_key=payload.decode())
            except PQueueError:
                continue  # outcome unknown: it may or may not be there
            history.enqueue_ok(payload)
            await asyncio.sleep(random.uniform(0, 0.01))


async def consume(endpoint: str, history: History, stop: asyncio.Event) -> None:
    async with Client(endpoint, look_aside=False, timeout_s=3, max_retries=0) as c:
        while not stop.is_set():
            try:
                jobs = await c.lease(QUEUE, max_jobs=4, lease_ms=LEASE_MS, wait_ms=300)
            except PQueueError:
                await asyncio.sleep(0.1)
                continue
            for job in jobs:
                lease = history.leased(
                    job.job_id, job.lease_id, job.payload, job.lease_expires_at_ms, LEASE_MS
                )
                await asyncio.sleep(random.uniform(0, 0.02))
                try:
                    await c.ack(QUEUE, job.job_id, job.lease_id)
                except (LeaseLostError, NotFoundError):
                    continue  # a stale lease is refused: exactly what should happen
                except PQueueError:
                    continue  # unknown: the lease will expire and the job come back
                history.ack_ok(lease, now_ms())


async def run(endpoint: str, history: History, stop: asyncio.Event, producers: int = 3) -> None:
    async with Client(endpoint, look_aside=False, timeout_s=5, max_retries=6) as c:
        await c.create_queue(QUEUE)
    await asyncio.gather(
        *(produce(endpoint, history, f"p{k}", stop) for k in range(producers)),
        *(consume(endpoint, history, stop) for _ in range(3)),
    )


async def drain(endpoint: str, history: History, timeout_s: float = 60) -> None:
    """Lease and ack until the queue is empty (held leases expire into it)."""
    deadline = time.monotonic() + timeout_s
    async with Client(endpoint, look_aside=False, timeout_s=5, max_retries=6) as c:
        while time.monotonic() < deadline:
            try:
                jobs = await c.lease(QUEUE, max_jobs=100, lease_ms=LEASE_MS, wait_ms=500)
                if not jobs:
                    [stats] = await c.stats(QUEUE, consistent=True)
                    if stats.ready + stats.delayed + stats.leased == 0:
                        return
                    continue
                for job in jobs:
                    lease = history.leased(
                        job.job_id, job.lease_id, job.payload, job.lease_expires_at_ms, LEASE_MS
                    )
                    await c.ack(QUEUE, job.job_id, job.lease_id)
                    history.ack_ok(lease, now_ms())
            except PQueueError:
                await asyncio.sleep(0.2)
    raise AssertionError("the queue did not drain")
