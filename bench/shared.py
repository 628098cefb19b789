"""One queue, two tenants: does a big tenant's backlog starve a small one?

Tenant ``big`` has a backlog of jobs in the queue before the clock starts;
tenant ``small`` then enqueues one job every 20 ms while 4 consumers lease
and ack as fast as they can (8 jobs per call). We time each of small's jobs
from its enqueue returning to a consumer leasing it. The same workload, in
one run, on:

- the PostgreSQL ``SKIP LOCKED`` queue users pick instead (ORDER BY
  priority, id: first come, first served);
- pqueue, both producers as one tenant (one lane: first come, first served);
- pqueue, a queue shared with both tenants at equal weights (fair leasing);
- pqueue, both tenants with backlogs, weights big 1 : small 3 (the share of
  leases each got).

One ``pq node`` process with auth. The backlog is sized to outlast the run,
so first come, first served makes small wait behind all of it; a job of
small's never leased counts with its age when the run ends (a lower bound).

    python -m bench.shared [--seconds 8] [--backlog 120000]   (make bench-shared)

PQ_BENCH_PG_DSN picks the PostgreSQL (default: the local test database).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg

from bench.pg import DEFAULT_PG_DSN, PostgresBackend
from bench.tenants import _p
from pqueue.client import Client
from pqueue.node.auth import issue
from pqueue.v1 import log_pb2 as logpb
from pqueue.v1 import queue_pb2 as pb
from tests.machine_driver import Driver
from tests.proc import NodeProcess

SECRET = b"bench-secret-bench-secret-bench-secret"
CONSUMERS = 4
PER_LEASE = 8
SMALL_EVERY_S = 0.02

#: Enqueue payloads; lease -> (payload, tenant) pairs; ack what was leased.
Enqueue = Callable[[list[bytes]], Awaitable[None]]
Lease = Callable[[], Awaitable[list[tuple[bytes, str]]]]


async def _workload(
    put_big: Enqueue,
    put_small: Enqueue,
    lease: Lease,
    backlog: int,
    seconds: float,
    trickle: bool = True,
) -> tuple[list[float], Counter[str], float]:
    """Small's waits (s), leases per tenant, and leases per second."""
    for start in range(0, backlog, 1000):
        await put_big([b"b" * 256] * min(1000, backlog - start))
    sent: dict[bytes, float] = {}
    waits: list[float] = []
    got: Counter[str] = Counter()
    stop = asyncio.Event()

    async def small() -> None:
        seq = 0
        while not stop.is_set():
            payload = b"s%07d" % seq
            await put_small([payload])
            sent[payload] = time.perf_counter()
            seq += 1
            await asyncio.sleep(SMALL_EVERY_S)

    async def consume() -> None:
        while not stop.is_set():
            for payload, tenant in await lease():
                got[tenant] += 1
                if payload in sent:
                    waits.append(time.perf_counter() - sent.pop(payload))

    started = time.perf_counter()
    tasks = [asyncio.create_task(small())] if trickle else []
    tasks += [asyncio.create_task(consume()) for _ in range(CONSUMERS)]
    await asyncio.sleep(seconds)
    stop.set()
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - started
    waits += [time.perf_counter() - t for t in sent.values()]  # never leased: at least this
    return waits, got, sum(got.values()) / elapsed


def _line(name: str, waits: list[float], got: Counter[str], rate: float) -> str:
    ms = sorted(w * 1000 for w in waits)
    shares = ", ".join(f"{t} {n}" for t, n in sorted(got.items()))
    waited = f"p50 {_p(ms, 50):8.1f} ms  p99 {_p(ms, 99):8.1f} ms" if ms else f"{'-':>29}"
    return f"{name:<34} small waits {waited}  leases {rate:6.0f}/s  ({shares})"


async def _postgres(dsn: str, backlog: int, seconds: float) -> str:
    try:
        pool = await asyncpg.create_pool(dsn, min_size=CONSUMERS + 1, max_size=CONSUMERS + 1)
    except (OSError, asyncpg.PostgresError) as exc:
        return f"postgres SKIP LOCKED: unavailable ({dsn}): {exc}"
    try:
        pg = PostgresBackend(pool)
        await pg.reset()

        async def lease() -> list[tuple[bytes, str]]:
            jobs = await pg.lease(PER_LEASE)
            await pg.ack([(i, t) for i, t, _ in jobs])
            return [(p, "small" if p.startswith(b"s") else "big") for _, _, p in jobs]

        result = await _workload(pg.enqueue, pg.enqueue, lease, backlog, seconds)
        await pool.execute("DROP TABLE IF EXISTS pq_bench_jobs")
        return _line("postgres SKIP LOCKED (FIFO)", *result)
    finally:
        await pool.close()


async def _pqueue(
    address: str,
    name: str,
    queue: str,
    tenants: dict[str, int],
    two_backlogs: bool,
    args: argparse.Namespace,
) -> str:
    """``tenants``: producer tenant -> weight (one entry: both produce as the owner)."""

    def tok(tenant: str, *roles: str) -> str:
        return issue(SECRET, tenant, roles, 3600)

    async with Client(address, token=tok("ops", "admin"), timeout_s=60) as admin:
        shares = [pb.TenantShare(tenant=t, weight=w) for t, w in tenants.items()]
        await admin.create_queue(f"owner/{queue}", pb.QueueConfig(shares=shares))
    big_tenant, small_tenant = ("big", "small") if len(tenants) > 1 else ("owner", "owner")
    async with (
        Client(address, token=tok(big_tenant, "producer"), timeout_s=60) as big,
        Client(address, token=tok(small_tenant, "producer"), timeout_s=60) as small,
        Client(address, token=tok("owner", "consumer"), timeout_s=60) as consumer,
    ):
        named = f"owner/{queue}"

        async def put_big(payloads: list[bytes]) -> None:
            await big.enqueue_batch(named, [pb.JobSpec(payload=p) for p in payloads])

        async def put_small(payloads: list[bytes]) -> None:
            await small.enqueue_batch(named, [pb.JobSpec(payload=p) for p in payloads])

        async def lease() -> list[tuple[bytes, str]]:
            jobs = await consumer.lease(queue, max_jobs=PER_LEASE, wait_ms=200)
            if jobs:
                await consumer.ack_many(queue, [(j.job_id, j.lease_id) for j in jobs])
            return [
                (
                    j.payload,
                    j.tenant if len(tenants) > 1 else "small" if j.payload[:1] == b"s" else "big",
                )
                for j in jobs
            ]

        if two_backlogs:
            for start in range(0, args.backlog, 1000):
                await put_small([b"S" * 256] * min(1000, args.backlog - start))
        result = await _workload(
            put_big, put_small, lease, args.backlog, args.seconds, trickle=not two_backlogs
        )
        return _line(name, *result)


async def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument(
        "--backlog",
        type=int,
        default=120_000,
        help="jobs queued ahead (each tenant, in the weighted run)",
    )
    args = p.parse_args(argv)
    print(
        f"1 node; big: {args.backlog} jobs queued ahead; small: 1 job every "
        f"{SMALL_EVERY_S * 1000:g} ms; {CONSUMERS} consumers leasing {PER_LEASE} per call "
        f"and acking; {args.seconds:g} s each"
    )
    dsn = os.environ.get("PQ_BENCH_PG_DSN", DEFAULT_PG_DSN)
    print("  running postgres...", file=sys.stderr, flush=True)
    print(await _postgres(dsn, args.backlog, args.seconds))
    with tempfile.TemporaryDirectory(prefix="pq-bench-shared-") as tmp:
        (Path(tmp) / "secret").write_bytes(SECRET)
        for name, queue, tenants, two_backlogs in (
            ("pqueue, one tenant (FIFO)", "fifo", {"owner": 1}, False),
            ("pqueue, shared 1:1 (fair)", "fair", {"big": 1, "small": 1}, False),
            ("pqueue, two backlogs, weights 1:3", "weighted", {"big": 1, "small": 3}, True),
        ):
            # A fresh node each: a run must not pay for the last one's leftover jobs.
            print(f"  running {name}...", file=sys.stderr, flush=True)
            node = NodeProcess(
                Path(tmp) / queue / "n1", extra=("--auth-key-file", str(Path(tmp) / "secret"))
            )
            address = node.start()
            try:
                print(await _pqueue(address, name, queue, tenants, two_backlogs, args))
            finally:
                node.terminate()
    print(_machine_cost())
    return 0


def _machine_cost(jobs: int = 64_000) -> str:
    """What the lanes cost the state machine itself: lease+ack of 8 at a time,
    in-process, with the backlog spread over 1, 2 or 8 tenants."""
    cells = []
    for n in (1, 2, 8):
        names = [f"t{i}" for i in range(n)]
        d = Driver()
        config = pb.QueueConfig(shares=[pb.TenantShare(tenant=t) for t in names])
        d.ok(create_queue=pb.CreateQueueRequest(queue="o/q", config=config))
        for tenant in names:
            for _ in range(jobs // n // 1000):
                batch = pb.EnqueueBatchRequest(queue="o/q", jobs=[pb.JobSpec(payload=b"x")] * 1000)
                d.ok(enqueue=batch, caller=logpb.Caller(tenant=tenant))
        started = time.perf_counter()
        while leased := list(d.ok(lease=pb.LeaseRequest(queue="o/q", max_jobs=8)).jobs):
            leases = [pb.JobLease(job_id=j.job_id, lease_id=j.lease_id) for j in leased]
            d.ok(ack=pb.AckRequest(queue="o/q", leases=leases))
        rate = d.m.queues["o/q"].counters.acked / (time.perf_counter() - started)
        cells.append(f"{n} lane{'s' if n > 1 else ''} {rate:,.0f}/s")
    return "state machine alone, lease+ack of 8: " + ", ".join(cells)


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
