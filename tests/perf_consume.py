"""Streaming against long polls: a Worker draining a backlog from a real node.

One ``pq node`` process (SQLite, as users run it), a backlog of jobs
enqueued in batches, then a ``Worker`` (16 slots, a handler that does
nothing) drains it, once on a ``Consume`` stream and once by long polls,
alternating, ``--repeats`` times. Prints, per run, jobs per second and the
node's CPU (psutil) and this process's CPU per job, and the ratios of the
medians. Not a test (no assertion on speed): a measurement, run by hand::

    PYTHONPATH=. .venv/bin/python -m tests.perf_consume --jobs 20000 --repeats 3
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import psutil

from pqueue.client import Client
from pqueue.v1 import queue_pb2 as pb
from pqueue.worker import Worker, WorkerConfig
from tests.proc import NodeProcess


async def drain(address: str, jobs: int, streaming: bool, queue: str) -> float:
    """Seconds a 16-slot worker takes to ack ``jobs`` jobs of ``queue``."""
    async with Client(address, timeout_s=30) as client:

        async def handler(job: pb.LeasedJob) -> None:
            return None

        config = WorkerConfig(concurrency=16, streaming=streaming)
        worker = Worker(client, queue, handler, config=config)
        task = asyncio.create_task(worker.run())
        started = time.perf_counter()
        while True:
            if worker.stats.acked >= jobs:
                break
            await asyncio.sleep(0.01)
        elapsed = time.perf_counter() - started
        worker.stop()
        await task
        return elapsed


async def fill(address: str, jobs: int, queue: str) -> None:
    async with Client(address, timeout_s=30) as client:
        for start in range(0, jobs, 1000):
            n = min(1000, jobs - start)
            await client.enqueue_batch(queue, [pb.JobSpec(payload=b"x" * 100)] * n)


def cpu_s(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return float(t.user + t.system)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        node = NodeProcess(Path(root) / "n1")
        address = node.start()
        try:
            server = psutil.Process(node.proc.pid if node.proc else 0)
            me = psutil.Process()
            rows: dict[str, list[tuple[float, float, float]]] = {"stream": [], "poll": []}
            for i in range(args.repeats):
                for mode in ("stream", "poll"):
                    queue = f"{mode}{i}"
                    await fill(address, args.jobs, queue)
                    node_before, me_before = cpu_s(server), cpu_s(me)
                    seconds = await drain(address, args.jobs, mode == "stream", queue)
                    node_us = (cpu_s(server) - node_before) / args.jobs * 1e6
                    me_us = (cpu_s(me) - me_before) / args.jobs * 1e6
                    rows[mode].append((args.jobs / seconds, node_us, me_us))
                    print(
                        f"{mode:6} run {i + 1}: {args.jobs / seconds:8.0f} jobs/s, "
                        f"node {node_us:6.0f} us CPU/job, worker {me_us:6.0f} us CPU/job",
                        flush=True,
                    )
        finally:
            node.terminate()
    med = {m: [statistics.median(col) for col in zip(*r, strict=True)] for m, r in rows.items()}
    (s_rate, s_node, s_me), (p_rate, p_node, p_me) = med["stream"], med["poll"]
    print(
        f"medians: stream/poll jobs/s {s_rate / p_rate:.2f}x; node CPU per job "
        f"{s_node / p_node:.2f}x (poll/stream {p_node / s_node:.2f}x); worker CPU per job "
        f"{s_me / p_me:.2f}x"
    )


if __name__ == "__main__":
    asyncio.run(main())
