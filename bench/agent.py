"""A producer or consumer process of ``make bench``: ``python -m bench.agent producer|consumer``.

Producers and consumers run in processes of their own, as an application's
producers and its workers would, one of each per system, the same for every
system. The bench drives them over stdin/stdout, one JSON object a line:

    -> {"op": "prepare", "spec": {...}}   <- {"ev": "ready", "pids": [...]}
    -> {"op": "go", "t0": T}              <- {"ev": "count", ...} every 0.1 s
    producer:                             <- {"ev": "produced", "ids": [...], ...}
    consumer: -> {"op": "drain", "ids": [...], "timeout_s": S}
                                          <- {"ev": "consumed", "jobs": [...], ...}
                                          <- {"ev": "stopped", "settled": {...}}
    -> {"op": "close"}                    <- {"ev": "closed"}
    -> {"op": "exit"}

Connections stay open until ``close``: the bench reads the CPU of every
process first, the server processes serving them too.

Times are ``time.monotonic()`` (CLOCK_MONOTONIC: one clock for every
process on the machine). A failure answers ``{"ev": "error", "error": ...}``
and the agent waits for the next ``prepare``.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from typing import Any

from bench.drivers import Consumer, Producer, consumer_for, producer_for
from bench.spec import CellSpec, stamp_of, stamped
from pqueue.wire.loop import new_event_loop

TICK_S = 0.1


def emit(event: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(event, separators=(",", ":")) + "\n")
    sys.stdout.flush()


async def read() -> dict[str, Any]:
    line = await asyncio.to_thread(sys.stdin.readline)
    if not line:
        raise EOFError("the bench went away")
    msg: dict[str, Any] = json.loads(line)
    return msg


async def expect(op: str) -> dict[str, Any]:
    msg = await read()
    if msg.get("op") != op:
        raise RuntimeError(f"expected {op!r}, got {msg.get('op')!r}")
    return msg


async def ticking(count: Callable[[], dict[str, Any]], work: Awaitable[Any]) -> Any:
    """Await ``work``, emitting ``count()`` every tick meanwhile."""

    async def tick() -> None:
        while True:
            emit({"ev": "count", **count()})
            await asyncio.sleep(TICK_S)

    ticker = asyncio.create_task(tick())
    try:
        return await work
    finally:
        ticker.cancel()
        emit({"ev": "count", **count()})


class Production:
    """What the producer did: ids in the order their enqueues returned."""

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.issued = 0
        self.errors = 0
        self.first_error = ""
        self.calls = 0

    async def call(self, drv: Producer, client: int, batch: int, stamp: float) -> None:
        self.issued += batch
        try:
            ids = await drv.enqueue(client, [stamped(stamp)] * batch)
        except Exception as exc:
            self.errors += batch
            self.first_error = self.first_error or f"{type(exc).__name__}: {exc}"
            await asyncio.sleep(0.05)
        else:
            self.ids.extend(ids)
        self.calls += 1

    def count(self) -> dict[str, Any]:
        return {"n": len(self.ids), "issued": self.issued, "errors": self.errors}


async def closed_loop(drv: Producer, spec: CellSpec, t0: float, out: Production) -> None:
    """``producers`` tasks, each enqueueing again as soon as its call returns."""
    end = t0 + spec.seconds

    async def task(k: int) -> None:
        while time.monotonic() < end:
            await out.call(drv, k, spec.batch, time.monotonic())

    await asyncio.gather(*(task(k) for k in range(spec.producers)))


async def open_loop(drv: Producer, spec: CellSpec, t0: float, out: Production) -> None:
    """A call every 1/rate s whatever the calls before it are doing; each job
    stamped with the time it was due, so a late call counts its lateness."""
    total = int(spec.rate * spec.seconds)
    running: set[asyncio.Task[None]] = set()
    for i in range(total):
        due = t0 + i / spec.rate
        if (delay := due - time.monotonic()) > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(out.call(drv, i, spec.batch, due))
        running.add(task)
        task.add_done_callback(running.discard)
    if running:
        await asyncio.wait(set(running))


async def produce(spec: CellSpec) -> None:
    drv = producer_for(spec)
    try:
        emit({"ev": "ready", "pids": await drv.open()})
        t0 = float((await expect("go"))["t0"])
        out = Production()
        loop = open_loop if spec.rate else closed_loop
        await ticking(out.count, loop(drv, spec, t0, out))
        emit(
            {
                "ev": "produced",
                "ids": out.ids,
                "issued": out.issued,
                "calls": out.calls,
                "errors": out.errors,
                "first_error": out.first_error,
                "t_end": time.monotonic(),
            }
        )
        await expect("close")
    finally:
        await drv.close()
    emit({"ev": "closed"})


class Consumption:
    """Every delivery the handler saw, and when each expected job first completed."""

    def __init__(self) -> None:
        self.jobs: list[int] = []
        self.leases: list[int] = []
        self.latency_us: list[int] = []
        self.first_done: dict[int, float] = {}
        self.expected: list[int] = []
        self.remaining: set[int] | None = None
        self.done = asyncio.Event()

    def on_job(self, job_id: int, lease_id: int, payload: bytes) -> None:
        now = time.monotonic()
        self.jobs.append(job_id)
        self.leases.append(lease_id)
        self.latency_us.append(round((now - stamp_of(payload)) * 1e6))
        self.first_done.setdefault(job_id, now)
        if self.remaining is not None:
            self.remaining.discard(job_id)
            if not self.remaining:
                self.done.set()

    def expect(self, ids: list[int]) -> None:
        self.expected = ids
        self.remaining = set(ids) - self.first_done.keys()
        if not self.remaining:
            self.done.set()

    def count(self) -> dict[str, Any]:
        return {"n": len(self.jobs)}


async def consume(spec: CellSpec) -> None:
    drv: Consumer = consumer_for(spec)
    try:
        emit({"ev": "ready", "pids": await drv.open()})
        await expect("go")
        got = Consumption()
        running = asyncio.create_task(drv.run(got.on_job))

        async def until_drained() -> bool:
            drain = await expect("drain")
            got.expect([int(i) for i in drain["ids"]])
            try:
                await asyncio.wait_for(got.done.wait(), float(drain["timeout_s"]))
            except TimeoutError:
                return False
            return True

        waiting = asyncio.create_task(until_drained())
        await ticking(
            got.count, asyncio.wait([running, waiting], return_when=asyncio.FIRST_COMPLETED)
        )
        if running.done():  # the consumers died before the jobs were done
            waiting.cancel()
            running.result()
            raise RuntimeError("the consumers stopped on their own")
        drained = waiting.result()
        ends = [got.first_done[j] for j in got.expected if j in got.first_done]
        emit(
            {
                "ev": "consumed",
                "drained": drained,
                "not_completed": len(got.remaining or ()),
                "jobs": got.jobs,
                "leases": got.leases,
                "latency_us": got.latency_us,
                "t_last": max(ends, default=0.0),
            }
        )
        drv.stop()
        await running
        emit({"ev": "stopped", "settled": asdict(drv.settled)})
        await expect("close")
    finally:
        drv.stop()
        await drv.close()
    emit({"ev": "closed"})


async def main(role: str) -> None:
    serve = {"producer": produce, "consumer": consume}[role]
    while True:
        try:
            msg = await read()
        except EOFError:
            return
        if msg.get("op") == "exit":
            return
        try:
            if msg.get("op") != "prepare":
                raise RuntimeError(f"expected 'prepare', got {msg.get('op')!r}")
            await serve(CellSpec(**msg["spec"]))
        except EOFError:
            return
        except Exception as exc:
            emit({"ev": "error", "error": f"{type(exc).__name__}: {exc}"})


if __name__ == "__main__":
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        runner.run(main(sys.argv[1]))
