"""One cell of ``make bench``: one system under one scenario, end to end.

The cell's producer and consumer agents (``bench.agent``) connect; the clock
starts; producers enqueue for ``seconds`` (closed loop: each task again as
soon as its call returns; open loop: at a fixed rate whatever happens); then
the consumers are told which jobs were acknowledged and run until every one
has completed (or a timeout). Measured:

- jobs/s: acknowledged enqueues over the time from the start to the last
  of them completing (the drain included: every job produced, done);
- latency per job: from its enqueue call (open loop: from when the call was
  due) to its handler running; p50, p99, max;
- CPU per job: user+system CPU seconds of every process in the path (the
  system's servers, both agents) from the start until every handler has
  run, from /proc, per job;
- open loop: the backlog (jobs offered, not refused, not yet completed)
  every 0.1 s, its maximum and its value when the load stopped;
- a history check (``check_history``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import sys
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import psutil

from bench.spec import CellSpec
from bench.systems import PqSystem, System

ROOT = Path(__file__).resolve().parents[1]
#: A backlog is bounded when, as the load stops, it is under this much of it.
BOUNDED_S = 0.5


@dataclass(frozen=True)
class Scenario:
    key: str
    title: str
    batch: int
    producers: int
    producer_clients: int
    consumers: int
    consumer_clients: int
    rate: float = 0.0
    #: For the plot's axes.
    short: str = ""


class AgentError(Exception):
    """An agent failed, or said something unexpected."""


class Agent:
    """A ``python -m bench.agent`` process and its event stream."""

    def __init__(self, role: str, log: Path) -> None:
        self.role = role
        self.log = log
        self.proc: asyncio.subprocess.Process | None = None
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.reader: asyncio.Task[None] | None = None
        #: The latest counters it reported.
        self.count: dict[str, Any] = {}

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def start(self) -> None:
        env = dict(
            os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
        )
        with self.log.open("ab") as err:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "bench.agent",
                self.role,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=err,
                cwd=ROOT,
                env=env,
                limit=1 << 30,
            )
        self.reader = asyncio.create_task(self._read(), name=f"bench-agent-{self.role}")

    async def _read(self) -> None:
        assert self.proc is not None
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            event = json.loads(line)
            if event["ev"] == "count":
                self.count = event
            else:
                self.events.put_nowait(event)
        self.events.put_nowait({"ev": "eof"})

    async def send(self, msg: dict[str, Any]) -> None:
        assert self.proc is not None
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(msg, separators=(",", ":")).encode() + b"\n")
        await self.proc.stdin.drain()

    async def expect(self, ev: str, timeout_s: float) -> dict[str, Any]:
        try:
            event = await asyncio.wait_for(self.events.get(), timeout_s)
        except TimeoutError:
            raise AgentError(f"{self.role}: no {ev!r} in {timeout_s:.0f} s") from None
        if event["ev"] == ev:
            return event
        if event["ev"] == "eof":
            assert self.proc is not None
            code = await self.proc.wait()
            raise AgentError(f"{self.role} exited {code}: {self.tail()}")
        raise AgentError(f"{self.role}: {event.get('error') or event}")

    def tail(self, lines: int = 5) -> str:
        try:
            return " | ".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    async def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.returncode is None:
            with contextlib.suppress(OSError, ConnectionError):
                await self.send({"op": "exit"})
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        if self.reader is not None:
            self.reader.cancel()
        self.proc = None


def quantile(sorted_values: Sequence[float], q: float) -> float | None:
    """Nearest rank; None for no values."""
    if not sorted_values:
        return None
    rank = min(len(sorted_values), max(1, math.ceil(q * len(sorted_values))))
    return sorted_values[rank - 1]


def check_history(
    enqueued: Sequence[int],
    enqueue_errors: int,
    jobs: Sequence[int],
    leases: Sequence[int],
    acks_ok: int,
    left: int | None,
    server_acks: int | None = None,
) -> dict[str, Any]:
    """Was every acknowledged enqueue completed, once?

    - ``lost``: acknowledged enqueues never delivered (must be 0);
    - ``duplicate_ids``: one id answered for two enqueues (must be 0);
    - ``unexpected``: deliveries of ids never acknowledged (at most the
      enqueues that failed, whose outcome the producer cannot know);
    - ``same_lease_twice``: one (job, lease) delivered twice (must be 0);
    - ``redelivered``: deliveries of a job under a later lease (allowed, after
      a lease expired or an ack was refused; counted);
    - ``double_completions``: completions the system accepted beyond one per
      job (must be 0); with ``server_acks``, the server's count is used too;
    - ``left``: jobs still in the queue afterwards (must be 0).
    """
    expected = set(enqueued)
    by_job: dict[int, list[int]] = defaultdict(list)
    for job, lease in zip(jobs, leases, strict=True):
        by_job[job].append(lease)
    delivered = set(by_job)
    accepted = max(acks_ok, server_acks or 0)
    out: dict[str, Any] = {
        "enqueued": len(enqueued),
        "delivered": len(jobs),
        "completed": len(delivered & expected),
        "lost": len(expected - delivered),
        "duplicate_ids": len(enqueued) - len(expected),
        "unexpected": len(delivered - expected),
        "same_lease_twice": sum(len(ls) - len(set(ls)) for ls in by_job.values()),
        "redelivered": sum(len(set(ls)) - 1 for ls in by_job.values()),
        "double_completions": max(0, accepted - len(delivered)),
        "left": left,
        "acks_ok": acks_ok,
        "server_acks": server_acks,
    }
    out["ok"] = (
        out["lost"] == 0
        and out["duplicate_ids"] == 0
        and out["unexpected"] <= enqueue_errors
        and out["same_lease_twice"] == 0
        and out["double_completions"] == 0
        and left == 0
    )
    return out


def cpu_seconds(pids: dict[int, str]) -> dict[int, float]:
    out = {}
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            t = psutil.Process(pid).cpu_times()
            out[pid] = t.user + t.system
    return out


#: Before a cell: the machine counts as quiet once its CPUs are this busy or
#: less over two samples in a row (what the last cell left behind, such as
#: PostgreSQL's autovacuum and checkpoints, or a cluster's shutdown, is done)...
QUIET_BUSY = 0.25
QUIET_SAMPLE_S = 0.5
#: ...or after this long (a shared machine may never be quiet: the cell runs).
QUIET_MAX_S = 20.0


async def until_quiet(
    sample: Callable[[], Awaitable[float]],
    busy: float = QUIET_BUSY,
    max_s: float = QUIET_MAX_S,
    clock: Callable[[], float] = time.monotonic,
) -> tuple[float, bool]:
    """Wait until ``sample()`` (the machine's busy share over a sample, 0..1)
    is at most ``busy`` twice in a row, or ``max_s`` passed: (the seconds
    waited, whether it was quiet)."""
    start = clock()
    calm = 0
    while True:
        calm = calm + 1 if await sample() <= busy else 0
        waited = clock() - start
        if calm >= 2:
            return waited, True
        if waited >= max_s:
            return waited, False


async def machine_busy(interval_s: float = QUIET_SAMPLE_S) -> float:
    """The share of all CPUs busy over the next ``interval_s`` (0..1)."""
    psutil.cpu_percent()  # starts the interval
    await asyncio.sleep(interval_s)
    return psutil.cpu_percent() / 100


def _ms(us: float | None) -> float | None:
    return None if us is None else round(us / 1000, 2)


Progress = Callable[[str], None]


class CellRunner:
    """Runs cells on a system's pair of agents (restarted after a failure)."""

    def __init__(self, system: System, logs: Path, say: Progress) -> None:
        self.system = system
        self.logs = logs
        self.say = say
        self.producer: Agent | None = None
        self.consumer: Agent | None = None

    async def _agents(self) -> tuple[Agent, Agent]:
        if self.producer is None or self.consumer is None:
            key = self.system.key
            self.producer = Agent("producer", self.logs / f"{key}-producer.log")
            self.consumer = Agent("consumer", self.logs / f"{key}-consumer.log")
            await self.producer.start()
            await self.consumer.start()
        return self.producer, self.consumer

    async def stop(self) -> None:
        for a in (self.producer, self.consumer):
            if a is not None:
                await a.stop()
        self.producer = self.consumer = None

    async def run(
        self, scenario: Scenario, base: CellSpec, drain_timeout_s: float
    ) -> dict[str, Any]:
        """The cell's figures; ``{"error": ...}`` with what was measured if it failed."""
        name = f"{scenario.key}-{int(time.time() * 1000) % 10**8}".replace("@", "-")
        queue = ""
        try:
            queue = await self.system.new_queue(name)
            waited_s, quiet = await until_quiet(machine_busy)
            if not quiet:
                self.say(f"the machine stayed busy for {waited_s:.0f} s: running the cell anyway")
            spec = replace(
                base,
                system=self.system.kind,
                target=self.system.target(),
                queue=queue,
                batch=scenario.batch,
                producers=scenario.producers,
                producer_clients=scenario.producer_clients,
                consumers=scenario.consumers,
                consumer_clients=scenario.consumer_clients,
                rate=scenario.rate,
                # pqueue's columns: look-aside (the SDK's default) or the proxy only.
                look_aside=getattr(self.system, "look_aside", True),
            )
            cell = await self._run(spec, drain_timeout_s)
            cell["settle"] = {"waited_s": round(waited_s, 1), "quiet": quiet}
            return cell
        except Exception as exc:  # any system's error: reported, and the run goes on
            self.say(f"FAILED: {type(exc).__name__}: {exc}")
            await self.stop()
            return {"error": f"{type(exc).__name__}: {exc}"}
        finally:
            if queue:
                with contextlib.suppress(Exception):
                    await self.system.drop_queue(queue)

    async def _run(self, spec: CellSpec, drain_timeout_s: float) -> dict[str, Any]:
        producer, consumer = await self._agents()
        producer.count = consumer.count = {}
        for a in (consumer, producer):
            await a.send({"op": "prepare", "spec": spec.to_json()})
        setup_s = 60 + spec.producer_clients + spec.consumer_clients
        backend_pids = (await consumer.expect("ready", setup_s))["pids"]
        backend_pids += (await producer.expect("ready", setup_s))["pids"]
        pids = await self.system.pids()
        pids |= {p: "postgres" for p in backend_pids}
        pids |= {producer.pid: "producers", consumer.pid: "consumers"}
        cpu0 = cpu_seconds(pids)
        t0 = time.monotonic()
        for a in (consumer, producer):
            await a.send({"op": "go", "t0": t0})
        samples: list[tuple[float, int]] = []
        watch = asyncio.create_task(self._watch(spec, t0, samples))
        try:
            produced = await producer.expect("produced", spec.seconds * 4 + 120)
            await consumer.send(
                {"op": "drain", "ids": produced["ids"], "timeout_s": drain_timeout_s}
            )
            consumed = await consumer.expect("consumed", drain_timeout_s + 60)
            # Every handler has run: the acks still in flight are a few calls,
            # while a Worker that holds one back idles up to its 30 s grace.
            cpu1 = cpu_seconds(pids)
            settled = (await consumer.expect("stopped", 90))["settled"]
            for a in (consumer, producer):
                await a.send({"op": "close"})
                await a.expect("closed", 60)
        finally:
            watch.cancel()
        left = await self.system.left(spec.queue)
        server_acks = None
        if isinstance(self.system, PqSystem):
            server_acks = await self.system.acked(spec.queue)
        return self._figures(
            spec, t0, produced, consumed, settled, left, server_acks, pids, cpu0, cpu1, samples
        )

    async def _watch(self, spec: CellSpec, t0: float, samples: list[tuple[float, int]]) -> None:
        """Backlog samples every 0.1 s; a progress line every 2 s."""
        assert self.producer is not None
        assert self.consumer is not None
        said = 0.0
        while True:
            await asyncio.sleep(0.1)
            now = time.monotonic() - t0
            p, c = self.producer.count, self.consumer.count
            if p and c:
                # Offered, not failed, not yet completed (0 at least: the two
                # counts are read a moment apart).
                waiting = int(p["issued"]) - int(p["errors"]) - int(c["n"])
                samples.append((now, max(0, waiting)))
            if now - said >= 2.0:
                said = now
                phase = f"{now:4.0f}/{spec.seconds:g} s" if now < spec.seconds else "draining"
                self.say(
                    f"{phase}: enqueued {p.get('n', 0):,}, completed {c.get('n', 0):,}"
                    + (f", errors {p['errors']:,}" if p.get("errors") else "")
                )

    def _figures(
        self,
        spec: CellSpec,
        t0: float,
        produced: dict[str, Any],
        consumed: dict[str, Any],
        settled: dict[str, Any],
        left: int,
        server_acks: int | None,
        pids: dict[int, str],
        cpu0: dict[int, float],
        cpu1: dict[int, float],
        samples: list[tuple[float, int]],
    ) -> dict[str, Any]:
        ids: list[int] = produced["ids"]
        history = check_history(
            ids,
            int(produced["errors"]),
            consumed["jobs"],
            consumed["leases"],
            int(settled["acks_ok"]),
            left,
            server_acks,
        )
        history["drained"] = bool(consumed["drained"])
        history["ok"] = history["ok"] and history["drained"]
        history["acks_refused"] = settled["acks_refused"]
        expected = set(ids)
        first: dict[int, int] = {}
        for job, lat in zip(consumed["jobs"], consumed["latency_us"], strict=True):
            if job in expected:
                first.setdefault(job, lat)
        lat_us = sorted(first.values())
        elapsed = float(consumed["t_last"]) - t0 if first else None
        by: dict[str, float] = defaultdict(float)
        for pid, what in pids.items():
            if pid in cpu0 and pid in cpu1:
                by[what] += cpu1[pid] - cpu0[pid]
        jobs = len(first)
        cell: dict[str, Any] = {
            "error": "",
            "jobs": jobs,
            "elapsed_s": round(elapsed, 3) if elapsed else None,
            "jobs_per_s": round(jobs / elapsed, 1) if elapsed else None,
            "enqueue_calls": produced["calls"],
            "enqueued_per_s": round(len(ids) / spec.seconds, 1),
            "enqueue_errors": produced["errors"],
            "consume_errors": settled["errors"],
            "first_error": produced["first_error"] or settled["first_error"],
            "latency_ms": {
                "p50": _ms(quantile(lat_us, 0.5)),
                "p99": _ms(quantile(lat_us, 0.99)),
                "max": _ms(lat_us[-1] if lat_us else None),
            },
            "cpu_us_per_job": round(sum(by.values()) / jobs * 1e6, 1) if jobs else None,
            "cpu_us_per_job_by": {k: round(v / jobs * 1e6, 1) for k, v in by.items()}
            if jobs
            else {},
            "cpu_seconds": round(sum(by.values()), 3),
            "history": history,
            "backlog": None,
        }
        if spec.rate:
            during = [b for t, b in samples if t <= spec.seconds]
            at_end = [b for t, b in samples if t >= spec.seconds]
            end = at_end[0] if at_end else (during[-1] if during else None)
            cell["offered_per_s"] = spec.rate
            cell["issued_per_s"] = round(int(produced["issued"]) / spec.seconds, 1)
            cell["backlog"] = {
                "max": max(during, default=None),
                "end": end,
                "bounded": end is not None and end <= spec.rate * BOUNDED_S,
                "samples": _thin(samples, 200),
            }
        return cell


def _thin(samples: list[tuple[float, int]], n: int) -> list[list[float]]:
    step = max(1, len(samples) // n)
    return [[round(t, 2), b] for t, b in samples[::step]]
