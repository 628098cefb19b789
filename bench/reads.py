"""Reads that must not starve writes: ``Stats('')`` beside another tenant's enqueues.

One node with auth on holds ``--queues`` queues spread over ``--tenants``
tenants. Tenant ``calm`` enqueues one job at a time and we take its latency,
first alone, then while tenant ``t0`` calls ``Stats('')`` (no queue named)
``--rate`` times a second, as a dashboard or an attacker would. Before
issue 12 each such call built stats for every tenant's queues; now it reads
one page of the caller's own.

    python -m bench.reads [--queues 5000] [--tenants 50] [--rate 18] [--seconds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from pqueue.client import Client
from pqueue.node.auth import Verifier, issue
from pqueue.node.server import NodeServer, ServerConfig
from pqueue.storage.sqlite import SqliteStorage
from pqueue.v1 import queue_pb2 as pb

SECRET = b"b" * 32


def _token(tenant: str) -> str:
    return issue(SECRET, tenant, ("producer", "consumer"), 3600)


async def _writes(client: Client, seconds: float) -> list[float]:
    """Enqueue latencies (ms) of one producer for ``seconds``."""
    out: list[float] = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        start = time.perf_counter()
        await client.enqueue("w", b"x")
        out.append((time.perf_counter() - start) * 1000)
    return out


async def _reads(address: str, rate: float, stop: asyncio.Event) -> int:
    """Raw ``Stats('')`` calls at ``rate`` per second (as an old client sends them)."""
    calls = 0
    async with Client(address, max_retries=0, token=_token("t0")) as c:
        auth = (("authorization", f"Bearer {_token('t0')}"),)
        while not stop.is_set():
            await c._stubs.queue.Stats(pb.StatsRequest(), metadata=auth)
            calls += 1
            await asyncio.sleep(1 / rate)
    return calls


def _summary(label: str, ms: list[float]) -> str:
    q = statistics.quantiles(ms, n=100)
    return f"{label:<28} writes {len(ms):>6}  p50 {q[49]:7.2f} ms  p99 {q[98]:7.2f} ms"


async def main(queues: int, tenants: int, rate: float, seconds: float) -> None:
    with tempfile.TemporaryDirectory() as root:
        config = ServerConfig(listen="127.0.0.1:0", grace_s=0.5, verifier=Verifier(SECRET))
        async with NodeServer(SqliteStorage(Path(root) / "n1"), config) as srv:
            per = queues // tenants
            for t in range(tenants):
                async with Client(srv.address, token=_token(f"t{t}")) as c:
                    await asyncio.gather(*(c.enqueue(f"q{i}", b"x") for i in range(per)))
            async with Client(srv.address, token=_token("calm")) as calm:
                print(f"{queues} queues over {tenants} tenants; Stats('') at {rate:g}/s")
                print(_summary("alone", await _writes(calm, seconds)))
                stop = asyncio.Event()
                reader = asyncio.create_task(_reads(srv.address, rate, stop))
                ms = await _writes(calm, seconds)
                stop.set()
                calls = await reader
                print(_summary(f"beside {calls} Stats('')", ms))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--queues", type=int, default=5000)
    parser.add_argument("--tenants", type=int, default=50)
    parser.add_argument("--rate", type=float, default=18.0)
    parser.add_argument("--seconds", type=float, default=5.0)
    a = parser.parse_args()
    asyncio.run(main(a.queues, a.tenants, a.rate, a.seconds))
