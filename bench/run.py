"""pqueue beside the PostgreSQL ``SKIP LOCKED`` queue users pick instead.

Same scenarios, payloads and concurrency against both, in one run:

- enqueue: producers enqueue jobs (1 per call, or 100 per call)
- lease+ack: consumers lease and ack a pre-filled queue (1 or 100 per call)
- end-to-end: producers and consumers at once; latency from enqueue call
  to ack, per job

pqueue runs as real ``pq node`` processes on SQLite (fsync per group commit):
one node alone, then a 3-node cluster called directly at its leader and
through a ``pq balancer`` process (the "hop" column is the balancer's
throughput over direct-to-leader: the cost of the extra hop), then a 3-node
cluster keeping its logs in PostgreSQL (one schema per node), at its leader. The baseline
is a table with ``FOR UPDATE SKIP LOCKED`` through an asyncpg pool, one
transaction per call with ``synchronous_commit`` on.

    python -m bench.run [--jobs N] [--concurrency C]     (make bench)

PQ_BENCH_PG_DSN picks the PostgreSQL (default: the local test database);
without a reachable PostgreSQL the baseline column says so.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import asyncpg
import psutil

from pqueue.client import Client, job_spec
from pqueue.errors import PQueueError
from tests.faults.cluster import ProcCluster
from tests.proc import NodeProcess

DEFAULT_PG_DSN = "postgresql://postgres@127.0.0.1:5432/test"
PAYLOAD = b"x" * 256


class Backend(Protocol):
    name: str

    async def reset(self) -> None: ...

    async def enqueue(self, payloads: Sequence[bytes]) -> None: ...

    async def lease(self, n: int) -> list[tuple[int, int, bytes]]:
        """(job id, lease token, payload)"""
        ...

    async def ack(self, leases: Sequence[tuple[int, int]]) -> None: ...


class PQueueBackend:
    def __init__(self, client: Client, name: str) -> None:
        self.client = client
        self.name = name
        self.queue = "bench"
        self.round = 0

    async def reset(self) -> None:
        self.round += 1
        self.queue = f"bench-{self.round}"
        await self.client.create_queue(self.queue)

    async def enqueue(self, payloads: Sequence[bytes]) -> None:
        if len(payloads) == 1:
            await self.client.enqueue(self.queue, payloads[0])
        else:
            await self.client.enqueue_batch(self.queue, [job_spec(p) for p in payloads])

    async def lease(self, n: int) -> list[tuple[int, int, bytes]]:
        jobs = await self.client.lease(self.queue, max_jobs=n, wait_ms=200)
        return [(j.job_id, j.lease_id, j.payload) for j in jobs]

    async def ack(self, leases: Sequence[tuple[int, int]]) -> None:
        await self.client.ack_many(self.queue, leases)


class PostgresBackend:
    name = "postgres SKIP LOCKED"

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def reset(self) -> None:
        await self.pool.execute(
            """
            DROP TABLE IF EXISTS pq_bench_jobs;
            CREATE TABLE pq_bench_jobs (
                id bigserial PRIMARY KEY,
                priority int NOT NULL DEFAULT 0,
                payload bytea NOT NULL,
                ready_at timestamptz NOT NULL DEFAULT now(),
                leased_until timestamptz
            );
            CREATE INDEX ON pq_bench_jobs (priority, id) WHERE leased_until IS NULL;
            """
        )

    async def enqueue(self, payloads: Sequence[bytes]) -> None:
        await self.pool.execute(
            "INSERT INTO pq_bench_jobs (payload) SELECT unnest($1::bytea[])", list(payloads)
        )

    async def lease(self, n: int) -> list[tuple[int, int, bytes]]:
        rows = await self.pool.fetch(
            """
            UPDATE pq_bench_jobs SET leased_until = now() + interval '30 seconds'
            WHERE id IN (
                SELECT id FROM pq_bench_jobs
                WHERE leased_until IS NULL AND ready_at <= now()
                ORDER BY priority, id
                FOR UPDATE SKIP LOCKED LIMIT $1
            )
            RETURNING id, payload
            """,
            n,
        )
        if not rows:
            await asyncio.sleep(0.005)  # what a poller does between empty polls
        return [(r["id"], 0, r["payload"]) for r in rows]

    async def ack(self, leases: Sequence[tuple[int, int]]) -> None:
        await self.pool.execute(
            "DELETE FROM pq_bench_jobs WHERE id = ANY($1::bigint[])", [i for i, _ in leases]
        )


@dataclass
class Result:
    jobs_per_s: float
    p50_ms: float
    p99_ms: float


def _summary(jobs: int, elapsed_s: float, latencies_s: list[float]) -> Result:
    latencies_s.sort()
    p99 = latencies_s[min(len(latencies_s) - 1, int(len(latencies_s) * 0.99))]
    return Result(jobs / elapsed_s, statistics.median(latencies_s) * 1000, p99 * 1000)


async def _spread(concurrency: int, calls: int, one: Callable[[], Awaitable[None]]) -> list[float]:
    """Run ``calls`` calls over ``concurrency`` tasks; per-call latencies."""
    latencies: list[float] = []
    remaining = calls

    async def loop() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            t0 = time.perf_counter()
            await one()
            latencies.append(time.perf_counter() - t0)

    await asyncio.gather(*(loop() for _ in range(concurrency)))
    return latencies


async def bench_enqueue(b: Backend, jobs: int, per_call: int, conc: int) -> Result:
    await b.reset()
    batch = [PAYLOAD] * per_call
    t0 = time.perf_counter()
    lat = await _spread(conc, jobs // per_call, lambda: b.enqueue(batch))
    return _summary(jobs, time.perf_counter() - t0, lat)


async def bench_lease_ack(b: Backend, jobs: int, per_call: int, conc: int) -> Result:
    await b.reset()
    for _ in range(jobs // 1000):
        await b.enqueue([PAYLOAD] * 1000)
    done = 0
    latencies: list[float] = []

    async def consumer() -> None:
        nonlocal done
        while done < jobs:
            t0 = time.perf_counter()
            got = await b.lease(per_call)
            if got:
                await b.ack([(i, lease) for i, lease, _ in got])
                done += len(got)
                latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(consumer() for _ in range(conc)))
    return _summary(done, time.perf_counter() - t0, latencies)


async def bench_end_to_end(b: Backend, jobs: int, per_call: int, conc: int) -> Result:
    await b.reset()
    latencies: list[float] = []
    done = 0

    async def producer(n_calls: int) -> None:
        for _ in range(n_calls):
            stamp = str(time.perf_counter()).encode().ljust(len(PAYLOAD))
            await b.enqueue([stamp] * per_call)

    async def consumer() -> None:
        nonlocal done
        while done < jobs:
            got = await b.lease(per_call)
            if got:
                await b.ack([(i, lease) for i, lease, _ in got])
                now = time.perf_counter()
                latencies.extend(now - float(p.strip()) for _, _, p in got)
                done += len(got)

    half = max(1, conc // 2)
    calls = jobs // per_call
    t0 = time.perf_counter()
    await asyncio.gather(
        *(producer(calls // half + (i < calls % half)) for i in range(half)),
        *(consumer() for _ in range(half)),
    )
    return _summary(done, time.perf_counter() - t0, latencies)


SCENARIOS = [
    ("enqueue", 1, bench_enqueue),
    ("enqueue", 100, bench_enqueue),
    ("lease+ack", 1, bench_lease_ack),
    ("lease+ack", 100, bench_lease_ack),
    ("end-to-end", 1, bench_end_to_end),
    ("end-to-end", 100, bench_end_to_end),
]


def _row(cells: Sequence[str]) -> str:
    widths = (12, 8, 21, 21, 21, 21, 21, 6, 24)
    return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=False)).rstrip()


def _fmt(r: Result | None) -> str:
    return f"{r.jobs_per_s:7.0f}/s {r.p50_ms:5.1f}/{r.p99_ms:.0f}ms" if r else "n/a"


async def failover_trials(cluster: ProcCluster, trials: int, endpoint: str) -> list[float]:
    """Seconds from kill -9 of the leader to the first successful write via ``endpoint``."""
    times = []
    async with Client(endpoint, timeout_s=2, max_retries=0) as c:
        await c.create_queue("failover")
        for trial in range(trials):
            leader = await cluster.leader()
            await c.enqueue("failover", b"before")
            started = time.perf_counter()
            cluster.kill9(leader)
            while True:
                try:
                    await c.enqueue("failover", f"after-{trial}")
                    break
                except PQueueError:
                    await asyncio.sleep(0.01)
            times.append(time.perf_counter() - started)
            cluster.launch(leader)
            await asyncio.sleep(2.0)  # let it rejoin and catch up before the next trial
    return times


async def hop_cpu(cluster: ProcCluster, balancer: str, calls: int, conc: int) -> str:
    """CPU per single-job enqueue of the leader and the balancer, direct and through it."""
    leader = await cluster.leader()
    assert cluster.balancer is not None
    procs = [psutil.Process(cluster.procs[leader].pid), psutil.Process(cluster.balancer.pid)]
    parts = []
    for label, endpoint in (("direct", cluster.address(leader)), ("via balancer", balancer)):
        async with Client(endpoint, timeout_s=30) as c:
            await c.create_queue("hop")

            async def one(c: Client = c) -> None:
                await c.enqueue("hop", PAYLOAD)

            before = [p.cpu_times() for p in procs]
            started = time.perf_counter()
            await _spread(conc, calls, one)
            elapsed = time.perf_counter() - started
            after = [p.cpu_times() for p in procs]
        us = [
            ((b.user + b.system) - (a.user + a.system)) / calls * 1e6
            for a, b in zip(before, after, strict=True)
        ]
        parts.append(
            f"{label}: {calls / elapsed:.0f} calls/s, leader {us[0]:.0f} us, "
            f"balancer {us[1]:.0f} us of CPU per call"
        )
    return "hop cost (enqueue x1): " + "; ".join(parts)


async def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--jobs", type=int, default=5_000, help="jobs per single-job scenario")
    p.add_argument("--batched-jobs", type=int, default=50_000, help="jobs per batched scenario")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--failover-trials", type=int, default=5)
    args = p.parse_args(argv)
    dsn = os.environ.get("PQ_BENCH_PG_DSN", DEFAULT_PG_DSN)

    pool = None
    try:
        pool = await asyncpg.create_pool(dsn, min_size=args.concurrency, max_size=args.concurrency)
    except (OSError, asyncpg.PostgresError) as exc:
        print(f"baseline unavailable ({dsn}): {exc}", file=sys.stderr)

    with tempfile.TemporaryDirectory(prefix="pq-bench-") as tmp:
        node = NodeProcess(Path(tmp) / "single" / "n1")
        cluster = ProcCluster(Path(tmp) / "cluster")
        # The same cluster keeping its logs in PostgreSQL (schemas dropped after).
        on_pg = ProcCluster(
            Path(tmp) / "pg-cluster", store=dsn, schema_prefix=f"pq_bench_{uuid.uuid4().hex[:8]}"
        )
        try:
            address = node.start()
            await cluster.start()
            balancer = await cluster.start_balancer(probe_interval_s=1.0)
            leader = cluster.address(await cluster.leader())
            pg_leader = ""
            if pool is not None:
                await on_pg.start()
                pg_leader = on_pg.address(await on_pg.leader())
            async with (
                Client(address, timeout_s=30) as single,
                Client(leader, timeout_s=30) as direct,
                Client(balancer, timeout_s=30) as via_balancer,
                Client(pg_leader or leader, timeout_s=30) as on_pg_leader,
            ):
                backends: list[Backend] = [
                    PQueueBackend(single, "pqueue 1 node"),
                    PQueueBackend(direct, "3 nodes: leader"),
                    PQueueBackend(via_balancer, "3 nodes: balancer"),
                ]
                if pool is not None:
                    backends.append(PQueueBackend(on_pg_leader, "3 nodes on PG: leader"))
                    backends.append(PostgresBackend(pool))
                print(
                    f"{args.concurrency} concurrent clients, {len(PAYLOAD)}-byte payloads; "
                    "cells are jobs/s and p50/p99 latency per call (end-to-end: per job); "
                    "hop is balancer over leader throughput; ratios are each pqueue "
                    "column over the PostgreSQL one"
                )
                names = [b.name for b in backends]
                print(_row(["scenario", "per call", *names, "hop", "ratios"]))
                for name, per_call, fn in SCENARIOS:
                    jobs = args.jobs if per_call == 1 else args.batched_jobs
                    results: list[Result | None] = []
                    for b in backends:
                        print(
                            f"  running {name} x{per_call} on {b.name}...",
                            file=sys.stderr,
                            flush=True,
                        )
                        results.append(await fn(b, jobs, per_call, args.concurrency))
                    ratios = "-"
                    base = results[-1] if pool is not None else None
                    if base is not None:
                        ratios = " ".join(
                            f"{r.jobs_per_s / base.jobs_per_s:.2f}x" for r in results[:-1] if r
                        )
                    leader_r, balancer_r = results[1], results[2]
                    hop = "-"
                    if leader_r and balancer_r:
                        hop = f"{balancer_r.jobs_per_s / leader_r.jobs_per_s:.2f}x"
                    cells = [name, str(per_call), *(_fmt(r) for r in results), hop, ratios]
                    print(_row(cells), flush=True)
            print(await hop_cpu(cluster, balancer, args.jobs, args.concurrency), flush=True)
            for label, endpoint in (("any node", cluster.endpoint), ("balancer", balancer)):
                if not args.failover_trials:
                    break
                times = await failover_trials(cluster, args.failover_trials, endpoint)
                ms = sorted(t * 1000 for t in times)
                print(
                    f"failover via {label} (kill -9 of the leader to the first successful "
                    f"write), {len(ms)} trials: min {ms[0]:.0f} ms, "
                    f"median {statistics.median(ms):.0f} ms, max {ms[-1]:.0f} ms"
                )
        finally:
            node.terminate()
            await cluster.stop()
            await on_pg.stop()
            if pool is not None:
                for i in range(1, on_pg.n + 1):
                    await pool.execute(f"DROP SCHEMA IF EXISTS {on_pg.schema(i)} CASCADE")
            if pool is not None:
                await pool.execute("DROP TABLE IF EXISTS pq_bench_jobs")
                await pool.close()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
