"""State at scale: one node, then a 3-node cluster, holding N pending jobs.

For each depth N (100k and 1M by default; ``--scale 10m`` adds 10M; ``--jobs``
names any list), on fresh ``pq node`` processes (SQLite, fsync per commit):

- **fill**: N jobs of 100 bytes, priorities 0..9, in EnqueueBatch calls of
  1,000 with 8 in flight (a node whose RSS passes ``--max-rss-mb`` stops it);
- **memory**: each node's RSS idle (after a warm-up) and full, both after a
  2 s settle; RSS per job is (full - idle) / N; the data dir's size;
- **snapshot**: the time and size of the snapshot the node takes at that
  depth (``pq_snapshot_seconds``, ``pq_snapshot_bytes`` on its /metrics);
- **writes**: one writer enqueueing single jobs, one call at a time, until
  the node has taken a snapshot: p50/p99 of the calls that overlapped one
  against the rest;
- **lease+ack**: 8 workers leasing one job per call and acking it, for
  ``--seconds``, at 1k pending and at N pending (acked jobs are enqueued
  again, 100 per call, so the depth holds); the ratio;
- **restart**: ``kill -9`` of the single node, right after the fill (the
  log as the fill left it) and again after the writes made it snapshot; from
  the new process's start to its first successful Lease; every job counted;
- **catch-up** (cluster): serial writes at the leader until it has a
  snapshot (if it has none), then ``kill -9`` of a follower, its data dir
  wiped, a new process on it: the time until its applied index reaches the
  leader's while a writer keeps enqueueing at the leader; then every
  queue's stats and state digests (``Admin.StateDigest``) compared across the nodes.

Every wait has a timeout; a phase that fails says so and the run goes on.

    python -m bench.scale [--jobs 100k,1m] [--scale 10m] [--seconds 10] [-o json]
                                                                (make bench-scale)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from prometheus_client.parser import text_string_to_metric_families

from pqueue.cli.devcluster import free_ports, peers_arg
from pqueue.client import Client, job_spec
from pqueue.errors import NotTakenError, PQueueError
from pqueue.v1 import queue_pb2 as pb

PAYLOAD = b"p" * 100
BATCH = 1_000
IN_FLIGHT = 8
WORKERS = 8
REFILL = 100
BASELINE_DEPTH = 1_000
SETTLE_S = 2.0
QUEUE = "bench"
DEFAULT_JOBS = "100k,1m"
#: Each start of a node writes this line, then the command, to its log.
START_MARK = "---- bench-scale starts: "
#: Issue 14's targets ("Done when"), checked at every depth (RSS at 1M only).
TARGET_RSS_1M = 400 * 2**20
TARGET_RESTART_S = 10.0
TARGET_P99_RATIO = 2.0
TARGET_LEASE_RATIO = 0.8


def count(text: str) -> int:
    """``2000``, ``2k``, ``1m``, ``1.5M``."""
    text = text.strip().lower().replace("_", "").replace(",", "")
    scale = {"k": 1_000, "m": 1_000_000}.get(text[-1:], 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def counts(text: str) -> list[int]:
    return [count(t) for t in text.split(",") if t.strip()]


# ------------------------------------------------------------------ output


class Progress:
    """Phase lines and a one-line bar on stderr (a line per 10% when not a tty)."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self.tty = sys.stderr.isatty()
        self._last = 0.0
        self._decile = -1

    def phase(self, text: str) -> None:
        if not self.quiet:
            print(f"  {text}", file=sys.stderr, flush=True)

    def bar(self, label: str, done: int, total: int, started: float) -> None:
        if self.quiet:
            return
        now = time.perf_counter()
        frac = done / total if total else 1.0
        if self.tty and now - self._last < 0.2 and done < total:
            return
        if not self.tty and int(frac * 10) == self._decile:
            return
        self._last, self._decile = now, int(frac * 10)
        rate = done / max(now - started, 1e-9)
        eta = (total - done) / rate if rate > 0 else math.inf
        width = 30
        filled = int(frac * width)
        line = (
            f"  {label} [{'#' * filled}{'.' * (width - filled)}] {frac:4.0%} "
            f"{done:,}/{total:,}  {rate:,.0f}/s  eta {eta:4.0f} s"
        )
        print(("\r" if self.tty else "") + line, end="" if self.tty else "\n", file=sys.stderr)
        if self.tty and done >= total:
            print(file=sys.stderr)
        sys.stderr.flush()


def mb(n: float | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:,.1f} MB"


def ms(s: float | None) -> str:
    return "n/a" if s is None else f"{s * 1000:,.1f} ms"


def quantile(values: Sequence[float], q: float) -> float | None:
    """Nearest rank; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


#: One write: (start, end, error); the error is "" when it succeeded.
Write = tuple[float, float, str]


def latency_summary(writes: Sequence[Write]) -> dict[str, Any]:
    """Percentiles of the writes that succeeded; the failed ones counted."""
    took = [end - start for start, end, error in writes if not error]
    failed = [error for _, _, error in writes if error]
    return {
        "n": len(took),
        "p50_ms": _ms(quantile(took, 0.5)),
        "p99_ms": _ms(quantile(took, 0.99)),
        "max_ms": _ms(max(took) if took else None),
        "failed": len(failed),
        "first_error": failed[0] if failed else "",
    }


def _ms(s: float | None) -> float | None:
    return None if s is None else round(s * 1000, 3)


def dir_bytes(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += (Path(root) / name).stat().st_size
    return total


# ------------------------------------------------------------------ nodes


class Node:
    """One ``pq node`` process on fixed ports (so a restart keeps its address)."""

    def __init__(
        self, root: Path, node_id: int, extra: Sequence[str], peers: dict[int, str] | None = None
    ) -> None:
        self.node_id = node_id
        self.data_dir = root / f"n{node_id}"
        self.log_path = root / f"n{node_id}.log"
        port, metrics_port = free_ports(2)
        self.address = f"127.0.0.1:{port}"
        self.metrics_address = f"127.0.0.1:{metrics_port}"
        self.peers = peers
        self.extra = list(extra)
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0

    def launch(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pqueue.cli", "node", "--data-dir", str(self.data_dir)]
        cmd += ["--listen", self.address, "--node-id", str(self.node_id), "--grace-s", "1"]
        cmd += ["--metrics-listen", self.metrics_address, *self.extra]
        if self.peers:
            cmd += ["--peers", peers_arg(self.peers)]
        with self.log_path.open("ab") as log:
            log.write(f"{START_MARK}{' '.join(cmd)}\n".encode())
            self.started_at = time.perf_counter()
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=log)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def exit_text(self) -> str:
        code = self.proc.poll() if self.proc else None
        return "" if code is None else f"exited {code}; "

    def kill9(self) -> None:
        if self.alive:
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait(30)

    def stop(self) -> None:
        if not self.alive:
            return
        assert self.proc is not None
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(30)

    def rss(self) -> int | None:
        if not self.alive:
            return None
        assert self.proc is not None
        try:
            return int(psutil.Process(self.proc.pid).memory_info().rss)
        except psutil.Error:
            return None

    def log_tail(self, lines: int = 6) -> str:
        try:
            text = self.log_path.read_bytes()[-20_000:].decode(errors="replace")
        except OSError:
            return ""
        # This process's lines (after our start marker) but its request lines,
        # which say nothing about why a node failed.
        text = text.rsplit(START_MARK, 1)[-1].split("\n", 1)[-1]
        kept = [line.strip() for line in text.splitlines() if " request for grpc://" not in line]
        return " | ".join(kept[-lines:])

    def client(self, timeout_s: float = 30.0) -> Client:
        return Client(self.address, timeout_s=timeout_s, max_retries=0)

    async def status(self, timeout_s: float = 2.0) -> pb.NodeStatusResponse:
        async with self.client(timeout_s) as c:
            return await c.node_status()

    async def metrics(self, timeout_s: float = 30.0) -> dict[str, float]:
        """Unlabelled samples of /metrics, by name."""

        def get() -> str:
            url = f"http://{self.metrics_address}/metrics"
            with urllib.request.urlopen(url, timeout=timeout_s) as r:
                return str(r.read().decode())

        text = await asyncio.to_thread(get)
        return {
            s.name: s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if not s.labels
        }


async def wait_serving(node: Node, timeout_s: float) -> None:
    """Until the node answers NodeStatus (or fail, with its last log lines)."""
    deadline = time.perf_counter() + timeout_s
    while time.perf_counter() < deadline:
        if not node.alive:
            raise PhaseError(f"n{node.node_id} {node.exit_text()}{node.log_tail()}")
        with contextlib.suppress(PQueueError):
            await node.status(1.0)
            return
        await asyncio.sleep(0.05)
    raise PhaseError(f"n{node.node_id} not serving after {timeout_s:.0f} s: {node.log_tail()}")


async def find_leader(nodes: Sequence[Node], timeout_s: float = 30.0) -> Node:
    deadline = time.perf_counter() + timeout_s
    while time.perf_counter() < deadline:
        leaders = []
        for n in nodes:
            if n.alive:
                with contextlib.suppress(PQueueError):
                    if (await n.status(1.0)).role == "leader":
                        leaders.append(n)
        if len(leaders) == 1:
            return leaders[0]
        await asyncio.sleep(0.1)
    raise PhaseError(f"no single leader after {timeout_s:.0f} s")


async def elections(nodes: Sequence[Node]) -> int:
    """Elections the nodes have started, all told (``pq_consensus_elections_total``)."""
    total = 0
    for n in nodes:
        with contextlib.suppress(OSError, ValueError):
            total += int((await n.metrics(5.0)).get("pq_consensus_elections_total", 0))
    return total


async def settled_rss(nodes: Sequence[Node], settle_s: float) -> list[int | None]:
    """Each node's RSS after ``settle_s`` (its garbage collected, buffers let go)."""
    await asyncio.sleep(settle_s)
    return [n.rss() for n in nodes]


class PhaseError(Exception):
    """A phase that did not complete: the message says what was seen."""


@dataclass
class Snapshots:
    """Snapshots seen on a node's /metrics, polled in the background."""

    node: Node
    interval_s: float = 0.1
    #: (start, end, seconds, bytes): when the snapshot ran (perf_counter time), from
    #: ``pq_snapshot_last_timestamp_seconds``; else a window between two scrapes.
    events: list[tuple[float, float, float, float]] = field(default_factory=list)
    _task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._poll())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _poll(self) -> None:
        last: tuple[float, float] | None = None  # (count, sum)
        sent_before = time.perf_counter()
        # The node stamps a snapshot's end in wall time; writes are timed in perf time.
        offset = time.time() - time.perf_counter()
        while True:
            sent = time.perf_counter()
            try:
                m = await self.node.metrics()
            except (OSError, ValueError):
                await asyncio.sleep(self.interval_s)
                continue
            got = time.perf_counter()
            now = (m.get("pq_snapshot_seconds_count", 0.0), m.get("pq_snapshot_seconds_sum", 0.0))
            if last is not None and now[0] > last[0]:
                seconds = now[1] - last[1]
                end = m.get("pq_snapshot_last_timestamp_seconds", 0.0) - offset
                if now[0] - last[0] == 1 and sent_before - 1.0 < end <= got + 1.0:
                    window = (end - seconds, end)
                else:  # several at once, or no stamp: it ended between the two scrapes
                    window = (sent_before - seconds, got)
                self.events.append((*window, seconds, m.get("pq_snapshot_bytes", 0.0)))
            last, sent_before = now, sent
            await asyncio.sleep(self.interval_s)

    def overlaps(self, t0: float, t1: float) -> bool:
        return any(t0 < end and t1 > start for start, end, _, _ in self.events)


# ------------------------------------------------------------------ workloads


def specs(n: int, rng: random.Random) -> list[pb.JobSpec]:
    return [job_spec(PAYLOAD, priority=rng.randrange(10)) for _ in range(n)]


async def fill(
    c: Client,
    queue: str,
    total: int,
    nodes: Sequence[Node],
    max_rss: int,
    progress: Progress,
    label: str,
) -> tuple[int, float]:
    """Enqueue ``total`` jobs (batches of 1,000, 8 in flight): (jobs in, seconds).

    Stops early (PhaseError) if a node dies or passes ``max_rss``."""
    rng = random.Random(total)
    batches = [min(BATCH, total - i) for i in range(0, total, BATCH)]
    done = 0
    stop: str | None = None
    started = time.perf_counter()

    async def sender() -> None:
        nonlocal done, stop
        while batches and stop is None:
            n = batches.pop()
            try:
                await c.enqueue_batch(queue, specs(n, rng))
            except NotTakenError:  # no leader for a moment: nothing was taken, resend
                batches.append(n)
                await asyncio.sleep(0.2)
                continue
            except PQueueError as exc:  # refused, or its outcome unknown: stop and say so
                dead = [f"n{x.node_id} {x.exit_text()}{x.log_tail()}" for x in nodes if not x.alive]
                stop = f"{type(exc).__name__}: {exc}" + "".join(f"; {d}" for d in dead)
                return
            done += n
            progress.bar(label, done, total, started)

    async def guard() -> None:
        nonlocal stop
        while True:
            await asyncio.sleep(0.5)
            for n in nodes:
                rss = n.rss()
                if rss is None:
                    stop = f"n{n.node_id} {n.exit_text()}{n.log_tail()}"
                elif rss > max_rss:
                    stop = f"n{n.node_id} RSS {mb(rss)} passed --max-rss-mb {max_rss // 2**20}"

    watch = asyncio.create_task(guard())
    try:
        await asyncio.gather(*(sender() for _ in range(IN_FLIGHT)))
    finally:
        watch.cancel()
    if stop is not None:
        raise PhaseError(f"fill stopped at {done:,} jobs: {stop}")
    return done, time.perf_counter() - started


async def lease_ack(c: Client, queue: str, seconds: float) -> float:
    """Jobs/s of 8 workers leasing 1 and acking it; the depth is held by refills."""
    rng = random.Random(7)
    acked = 0
    owed = 0
    stopping = False
    #: Every worker has returned: no ack is in flight, so ``owed`` is final.
    workers_done = False

    async def worker() -> None:
        nonlocal acked, owed
        while not stopping:
            jobs = await c.lease(queue, max_jobs=1)
            for j in jobs:
                await c.ack(queue, j.job_id, j.lease_id)
                acked += 1
                owed += 1

    async def refiller() -> None:
        nonlocal owed
        # Not done at ``stopping``: a worker may still be acking a job it
        # leased just before, which it then owes (the depth came back 6 short).
        while not workers_done or owed:
            if owed >= REFILL or (stopping and owed):
                n = min(owed, REFILL)
                owed -= n
                await c.enqueue_batch(queue, specs(n, rng))
            else:
                await asyncio.sleep(0.01)

    tasks = [asyncio.create_task(worker()) for _ in range(WORKERS)]
    refill = asyncio.create_task(refiller())
    started = time.perf_counter()
    try:
        await asyncio.sleep(seconds)
        rate = acked / (time.perf_counter() - started)
        stopping = True
        await asyncio.wait_for(asyncio.gather(*tasks), 60)
        workers_done = True
        await asyncio.wait_for(refill, 60)  # the depth back where it was
    finally:
        stopping = workers_done = True
        for t in (*tasks, refill):
            t.cancel()
    return rate


async def serial_writes(
    c: Client, queue: str, until: Callable[[float], bool], timeout_s: float
) -> list[Write]:
    """One writer, one single-job Enqueue at a time, until ``until(now)`` or
    ``timeout_s``. A failed call is kept (with its error) and the next follows."""
    out: list[Write] = []
    deadline = time.perf_counter() + timeout_s
    while True:
        now = time.perf_counter()
        if now > deadline or until(now):
            return out
        try:
            await c.enqueue(queue, PAYLOAD)
            out.append((now, time.perf_counter(), ""))
        except PQueueError as exc:
            out.append((now, time.perf_counter(), f"{type(exc).__name__}: {exc}"))
            await asyncio.sleep(0.05)


def still_running(node: Node, who: str, deadline: float, late: str) -> None:
    """Raise ``PhaseError`` if ``node``'s process ended or ``deadline`` passed
    (``late`` says what did not happen), with its last log lines."""
    if not node.alive:
        raise PhaseError(
            f"{who} {node.exit_text()}after "
            f"{time.perf_counter() - node.started_at:.1f} s: {node.log_tail()}"
        )
    if time.perf_counter() > deadline:
        raise PhaseError(f"{late}: {node.log_tail()}")


async def _pressure(c: Client, stop: asyncio.Event) -> None:
    """Batches of 1,000 jobs to the queue "pressure" every 50 ms until ``stop``."""
    batch = [pb.JobSpec(payload=PAYLOAD, priority=i % 10) for i in range(1000)]
    while not stop.is_set():
        with contextlib.suppress(PQueueError):
            await c.enqueue_batch("pressure", batch)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.05)


async def jobs_in(c: Client, queue: str) -> int:
    [s] = await c.stats(queue)
    return int(s.ready + s.leased + s.delayed)


# ------------------------------------------------------------------ phases


@dataclass
class Bench:
    root: Path
    args: argparse.Namespace
    progress: Progress
    #: Fill rates (jobs/s) for the time estimate: this machine's, then the last depth's.
    rates: dict[str, float] = field(default_factory=lambda: {"single": 25_000.0})

    def timeout(self, jobs: int, base_s: float) -> float:
        """Waits scale with the depth: ``base_s`` plus 60 s per million jobs."""
        return base_s + 60.0 * jobs / 1_000_000

    async def phase(
        self, out: dict[str, Any], key: str, what: str, run: Callable[[], Awaitable[None]]
    ) -> bool:
        """Run one phase; a failure is recorded as ``out[key]['error']``."""
        self.progress.phase(what)
        try:
            await run()
            return True
        except (PhaseError, PQueueError, OSError, TimeoutError) as exc:
            text = str(exc) or type(exc).__name__
            out.setdefault(key, {})["error"] = f"{type(exc).__name__}: {text}"
            self.progress.phase(f"FAILED: {text}")
            return False

    # ---------------------------------------------------------- one node

    async def single(self, jobs: int) -> dict[str, Any]:
        out = single_template(jobs)
        node = Node(self.root / f"single-{jobs}", 1, self.args.node_arg)
        label = f"[1 node, {jobs:,}]"
        snaps = Snapshots(node)
        try:
            node.launch()
            await wait_serving(node, 30)
            snaps.start()
            async with node.client() as c:
                await c.create_queue(QUEUE)
                await c.create_queue("writes")
                await self.phase(
                    out, "lease_ack", f"{label} lease+ack at 1k pending", lambda: self._base(c, out)
                )
                out["memory"]["idle_rss_bytes"] = (await settled_rss([node], self.args.settle_s))[0]
                filled = await self.phase(
                    out, "fill", f"{label} fill", lambda: self._fill(c, [node], jobs, out, label)
                )
                if not filled:
                    return out
                rss = (await settled_rss([node], self.args.settle_s))[0]
                memory(out["memory"], rss, jobs, node.data_dir)
            # First as the fill left it: a log of large batched entries (the
            # snapshot policy decides whether one covers them).
            await snaps.stop()
            if not await self.phase(
                out,
                "restart",
                f"{label} kill -9 and restart, the log as filled",
                lambda: self._restart(node, jobs, out["restart"]),
            ):
                return out
            snaps = Snapshots(node)
            snaps.start()
            async with node.client() as c:
                await self.phase(
                    out,
                    "writes",
                    f"{label} serial writes until a snapshot",
                    lambda: self._writes(c, snaps, jobs, out),
                )
                await self.phase(
                    out,
                    "lease_ack",
                    f"{label} lease+ack at {jobs:,} pending",
                    lambda: self._at_depth(c, jobs, out),
                )
            # Then from the snapshot the writes made it take, and the log after it.
            await snaps.stop()
            await self.phase(
                out,
                "restart_snapshot",
                f"{label} kill -9 and restart, from its snapshot",
                lambda: self._restart(node, jobs, out["restart_snapshot"]),
            )
        except (PhaseError, PQueueError) as exc:  # outside any phase: the start
            out["error"] = f"{type(exc).__name__}: {exc}"
            self.progress.phase(f"FAILED: {exc}")
        finally:
            await snaps.stop()
            node.stop()
            if not self.args.keep:
                shutil.rmtree(node.data_dir, ignore_errors=True)
        return out

    async def _base(self, c: Client, out: dict[str, Any]) -> None:
        await c.create_queue("base")
        await c.enqueue_batch("base", specs(BASELINE_DEPTH, random.Random(1)))
        rate = await asyncio.wait_for(lease_ack(c, "base", self.args.seconds), 120)
        out["lease_ack"]["at_1k_per_s"] = round(rate, 1)
        await c.delete_queue("base")

    async def _fill(
        self, c: Client, nodes: Sequence[Node], jobs: int, out: dict[str, Any], label: str
    ) -> None:
        max_rss = self.args.max_rss_mb * 2**20
        timeout = self.timeout(jobs, 60) * 5
        done, seconds = await asyncio.wait_for(
            fill(c, QUEUE, jobs, nodes, max_rss, self.progress, f"{label} fill"), timeout
        )
        out["fill"] = {
            "jobs": done,
            "seconds": round(seconds, 2),
            "jobs_per_s": round(done / seconds, 1),
        }

    async def _writes(self, c: Client, snaps: Snapshots, jobs: int, out: dict[str, Any]) -> None:
        w = out["writes"]
        seen = len(snaps.events)
        started = time.perf_counter()

        def until(now: float) -> bool:
            # The first snapshot taken since the writes began, then two more seconds.
            return len(snaps.events) > seen and now > snaps.events[seen][1] + 2.0

        timeout = self.timeout(jobs, self.args.snapshot_timeout)
        # A deep state is snapshotted once the log holds a quarter of its
        # size (docs/durability.md): single-job writes alone would take
        # minutes to get there at 1M. A second producer sends a batch of
        # 1,000 jobs every 50 ms to another queue meanwhile (with and
        # without the snapshot alike), so the log grows ~2.5 MB/s.
        stop = asyncio.Event()
        pressure = asyncio.create_task(_pressure(c, stop))
        try:
            samples = await serial_writes(c, "writes", until, timeout)
        finally:
            stop.set()
            await pressure
        during = [x for x in samples if snaps.overlaps(x[0], x[1])]
        without = [x for x in samples if not snaps.overlaps(x[0], x[1])]
        w["without_snapshot"] = latency_summary(without)
        w["during_snapshot"] = latency_summary(during)
        p99_in, p99_out = w["during_snapshot"]["p99_ms"], w["without_snapshot"]["p99_ms"]
        w["p99_ratio"] = round(p99_in / p99_out, 2) if p99_in and p99_out else None
        taken = [e for e in snaps.events if e[1] >= started]
        out["snapshot"] = {
            "taken": len(taken),
            "seconds": round(max(e[2] for e in taken), 3) if taken else None,
            "bytes": int(taken[-1][3]) if taken else None,
        }
        await c.delete_queue("writes")  # the restart finds the N jobs alone
        await c.delete_queue("pressure")
        if not taken:
            raise PhaseError(
                f"no snapshot in {timeout:.0f} s of serial writes ({len(samples):,} writes)"
            )

    async def _at_depth(self, c: Client, jobs: int, out: dict[str, Any]) -> None:
        rate = await asyncio.wait_for(lease_ack(c, QUEUE, self.args.seconds), 120)
        la = out["lease_ack"]
        la["at_depth_per_s"] = round(rate, 1)
        base = la["at_1k_per_s"]
        la["ratio"] = round(rate / base, 3) if base else None
        present = await jobs_in(c, QUEUE)
        if present != jobs:
            raise PhaseError(f"{present:,} jobs in the queue after the run, not {jobs:,}")

    async def _restart(self, node: Node, jobs: int, r: dict[str, Any]) -> None:
        """kill -9, a new process: from its start to a Lease, then every job counted."""
        node.kill9()
        node.launch()
        timeout = self.timeout(jobs, self.args.restart_timeout)
        deadline = node.started_at + timeout
        while True:
            still_running(node, "the node", deadline, f"not serving after {timeout:.0f} s")
            try:
                async with node.client(timeout_s=2.0) as c:
                    leased = await c.lease(QUEUE, max_jobs=1)
                r["seconds"] = round(time.perf_counter() - node.started_at, 2)
                break
            except PQueueError:
                await asyncio.sleep(0.05)
        if not leased:
            raise PhaseError("the first Lease after the restart found no job")
        async with node.client() as c:
            r["jobs_present"] = await jobs_in(c, QUEUE)
        r["all_present"] = r["jobs_present"] == jobs
        r["rss_bytes"] = (await settled_rss([node], self.args.settle_s))[0]

    # ---------------------------------------------------------- 3 nodes

    async def cluster(self, jobs: int) -> dict[str, Any]:
        out = cluster_template(jobs)
        root = self.root / f"cluster-{jobs}"
        nodes = [Node(root, i, self.args.node_arg) for i in (1, 2, 3)]
        peers = {n.node_id: n.address for n in nodes}
        for n in nodes:
            n.peers = peers
        label = f"[3 nodes, {jobs:,}]"
        try:
            for n in nodes:
                n.launch()
            for n in nodes:
                await wait_serving(n, 30)
            leader = await find_leader(nodes)
            async with leader.client() as c:
                await c.create_queue(QUEUE)
                await c.create_queue("writes")
                await c.enqueue_batch("writes", specs(BASELINE_DEPTH, random.Random(1)))
                idle = await settled_rss(nodes, self.args.settle_s)
                if not await self.phase(
                    out, "fill", f"{label} fill", lambda: self._fill(c, nodes, jobs, out, label)
                ):
                    return out
            full = await settled_rss(nodes, self.args.settle_s)
            for n, before, after in zip(nodes, idle, full, strict=True):
                m = {"node": f"n{n.node_id}", "idle_rss_bytes": before}
                memory(m, after, jobs, n.data_dir)
                out["memory"].append(m)
            before = await elections(nodes)
            await self.phase(
                out,
                "snapshot",
                f"{label} serial writes at the leader until it has a snapshot",
                lambda: self._leader_snapshot(leader, jobs, out["snapshot"]),
            )
            # A snapshot that stalls the leader can cost it its leadership.
            leader = await find_leader(nodes)
            out["snapshot"]["leader_after"] = f"n{leader.node_id}"
            out["snapshot"]["elections"] = await elections(nodes) - before
            await self.phase(
                out,
                "catch_up",
                f"{label} wipe a follower, time its catch-up",
                lambda: self._catch_up(nodes, leader, jobs, out),
            )
        except (PhaseError, PQueueError) as exc:  # outside any phase: the start
            out["error"] = f"{type(exc).__name__}: {exc}"
            self.progress.phase(f"FAILED: {exc}")
        finally:
            for n in nodes:
                n.stop()
            if not self.args.keep:
                shutil.rmtree(root, ignore_errors=True)
        return out

    async def _leader_snapshot(self, leader: Node, jobs: int, out: dict[str, Any]) -> None:
        """So that the wiped follower catches up from a snapshot, as a long-running
        cluster's would: none yet (the fill made few, large entries)? write until one."""
        out["leader_before"] = f"n{leader.node_id}"
        if (await leader.status()).snapshot_index:
            m = await leader.metrics()
            count = m.get("pq_snapshot_seconds_count", 0.0)
            mean = m.get("pq_snapshot_seconds_sum", 0.0) / count if count else None
            out.update(forced=False, seconds=mean, bytes=m.get("pq_snapshot_bytes"))
            out["writes"] = latency_summary([])
            return
        snaps = Snapshots(leader)
        snaps.start()
        try:
            timeout = self.timeout(jobs, self.args.snapshot_timeout)
            async with leader.client() as c:
                writes = await serial_writes(c, "writes", lambda _: bool(snaps.events), timeout)
        finally:
            await snaps.stop()
        out["writes"] = latency_summary(writes)
        if not snaps.events:
            raise PhaseError(f"no snapshot in {timeout:.0f} s of serial writes ({len(writes):,})")
        _, _, seconds, size = snaps.events[0]
        out.update(forced=True, seconds=round(seconds, 3), bytes=int(size))

    async def _catch_up(
        self, nodes: Sequence[Node], leader: Node, jobs: int, out: dict[str, Any]
    ) -> None:
        cu = out["catch_up"]
        cu["leader_snapshot_index"] = (await leader.status()).snapshot_index
        follower = max((n for n in nodes if n is not leader), key=lambda n: n.node_id)
        cu["follower"] = f"n{follower.node_id}"
        others = [n for n in nodes if n is not follower]
        follower.kill9()
        shutil.rmtree(follower.data_dir)
        stop = False
        async with leader.client(timeout_s=10) as c:
            writer = asyncio.create_task(serial_writes(c, "writes", lambda _: stop, 1e9))
            try:
                await asyncio.sleep(1.0)
                follower.launch()
                timeout = self.timeout(jobs, self.args.restart_timeout)
                deadline = follower.started_at + timeout
                while True:
                    late = f"not caught up after {timeout:.0f} s"
                    still_running(follower, "the follower", deadline, late)
                    with contextlib.suppress(PQueueError):
                        # Whoever leads by now: the others' highest applied index.
                        target = max([(await n.status()).applied_index for n in others])
                        if (await follower.status()).applied_index >= target:
                            break
                    await asyncio.sleep(0.1)
                cu["seconds"] = round(time.perf_counter() - follower.started_at, 2)
            finally:
                stop = True
                samples = await asyncio.wait_for(writer, 60)
        started = follower.started_at
        cu["writes_during"] = latency_summary([w for w in samples if w[1] >= started])
        if not any(w[1] >= started and not w[2] for w in samples):
            raise PhaseError("the leader served no write while the follower caught up")
        cu["rss_bytes"] = (await settled_rss([follower], self.args.settle_s))[0]
        cu["stats_equal"] = await same_stats(nodes)
        if not cu["stats_equal"]:
            raise PhaseError("the nodes' queue stats differ after catch-up")
        digests = await same_digest(nodes)
        cu["state_hash"] = "equal" if len(set(digests)) == 1 else f"DIFFERENT: {digests}"
        if len(set(digests)) != 1:
            raise PhaseError(f"the nodes' state digests differ after catch-up: {digests}")


async def same_stats(nodes: Sequence[Node], timeout_s: float = 30.0) -> bool:
    """Every node at the same applied index, then every queue's stats (local reads) alike."""
    deadline = time.perf_counter() + timeout_s
    while time.perf_counter() < deadline:
        applied = set()
        views = []
        for n in nodes:
            with contextlib.suppress(PQueueError):
                applied.add((await n.status()).applied_index)
                async with n.client() as c:
                    views.append(sorted(_stats_key(s) for s in await c.stats()))
                applied.add((await n.status()).applied_index)
        if len(applied) == 1 and len(views) == len(nodes):
            return all(v == views[0] for v in views)
        await asyncio.sleep(0.2)
    raise PhaseError(f"the nodes did not reach one applied index in {timeout_s:.0f} s")


async def same_digest(nodes: Sequence[Node], timeout_s: float = 120.0) -> list[str]:
    """Each node's "applied index:state digest", asked once no write is in
    flight (``same_stats`` saw one index), again while the indexes differ (a
    timer's tick may land between the asks): equal states, equal digests."""
    out: list[str] = []
    for _ in range(5):
        answers = []
        for n in nodes:
            async with n.client(timeout_s) as c:
                answers.append(await c.state_digest())
        out = [f"{a.applied_index}:{a.sha256[:16]}" for a in answers]
        if len({a.applied_index for a in answers}) == 1:
            break
    return out


def _stats_key(s: pb.QueueStats) -> tuple[Any, ...]:
    return (
        s.queue,
        s.ready,
        s.delayed,
        s.leased,
        s.dead,
        s.enqueued_total,
        s.acked_total,
        s.nacked_total,
        s.expired_total,
        s.dead_total,
        s.leased_total,
    )


def memory(m: dict[str, Any], rss: int | None, jobs: int, data_dir: Path) -> None:
    idle = m.get("idle_rss_bytes")
    m["rss_bytes"] = rss
    m["rss_per_job_bytes"] = round((rss - idle) / jobs, 1) if rss and idle else None
    m["data_dir_bytes"] = dir_bytes(data_dir)


def single_template(jobs: int) -> dict[str, Any]:
    """Every field the JSON holds for one node (None: not measured)."""
    return {
        "jobs": jobs,
        "fill": {"jobs": None, "seconds": None, "jobs_per_s": None},
        "memory": {
            "idle_rss_bytes": None,
            "rss_bytes": None,
            "rss_per_job_bytes": None,
            "data_dir_bytes": None,
        },
        "snapshot": {"taken": None, "seconds": None, "bytes": None},
        "writes": {"without_snapshot": None, "during_snapshot": None, "p99_ratio": None},
        "lease_ack": {"at_1k_per_s": None, "at_depth_per_s": None, "ratio": None},
        "restart": restart_template(),
        "restart_snapshot": restart_template(),
    }


def restart_template() -> dict[str, Any]:
    return {"seconds": None, "jobs_present": None, "all_present": None, "rss_bytes": None}


def cluster_template(jobs: int) -> dict[str, Any]:
    return {
        "jobs": jobs,
        "fill": {"jobs": None, "seconds": None, "jobs_per_s": None},
        "memory": [],
        "snapshot": {
            "leader_before": None,
            "forced": None,
            "seconds": None,
            "bytes": None,
            "writes": None,
            "leader_after": None,
            "elections": None,
        },
        "catch_up": {
            "leader_snapshot_index": None,
            "follower": None,
            "seconds": None,
            "writes_during": None,
            "rss_bytes": None,
            "state_hash": None,
            "stats_equal": None,
        },
    }


# ------------------------------------------------------------------ report


def errors(d: dict[str, Any]) -> Iterator[tuple[str, str]]:
    for key, value in d.items():
        if isinstance(value, dict) and "error" in value:
            yield key, value["error"]
    if "error" in d:
        yield "setup", d["error"]


def _lat(d: dict[str, Any] | None) -> str:
    if not d:
        return "no samples"
    failed = f", {d['failed']:,} FAILED, first: {d['first_error']}" if d["failed"] else ""
    if not d["n"]:
        return f"no write succeeded{failed}"
    return f"p50 {d['p50_ms']:,.1f} / p99 {d['p99_ms']:,.1f} ms (n={d['n']:,}{failed})"


def _fill(f: dict[str, Any]) -> str:
    return f"{f['jobs']:,} jobs in {f['seconds']:,.2f} s ({f['jobs_per_s']:,.0f}/s)"


def _memory(m: dict[str, Any]) -> str:
    per = m["rss_per_job_bytes"]
    return (
        f"RSS {mb(m['rss_bytes'])} (idle {mb(m['idle_rss_bytes'])}): "
        f"{'n/a' if per is None else f'{per:,.0f}'} B/job; data dir {mb(m['data_dir_bytes'])}"
    )


class _Rows:
    def __init__(self, who: str, d: dict[str, Any]) -> None:
        self.who = who
        self.err = dict(errors(d))
        self.lines: list[str] = []

    def add(self, what: str, text: Callable[[], str], key: str = "", needs: object = 0) -> None:
        """A row: its phase's failure if it failed, "not measured" if ``needs`` is None,
        else ``text()``."""
        if key in self.err:
            shown = f"FAILED: {self.err[key]}"
        else:
            shown = "not measured" if needs is None else text()
        self.lines.append(f"{self.who:<8} {what:<27}{shown}")


def report_single(s: dict[str, Any]) -> list[str]:
    rows = _Rows("1 node", s)
    f, m, sn, w, la = (s[k] for k in ("fill", "memory", "snapshot", "writes", "lease_ack"))
    if "setup" in rows.err:
        rows.add("start", lambda: "", "setup")
    rows.add("fill", lambda: _fill(f), "fill", f["jobs"])
    rows.add("memory", lambda: _memory(m), needs=m["rss_bytes"])
    rows.add(
        "snapshot",
        lambda: f"{sn['seconds']:,.2f} s, {mb(sn['bytes'])} ({sn['taken']} taken)",
        "writes",
        sn["seconds"],
    )
    rows.add("writes x1 alone", lambda: _lat(w["without_snapshot"]), needs=w["without_snapshot"])
    rows.add(
        "writes x1 in a snapshot",
        lambda: f"{_lat(w['during_snapshot'])}: p99 {w['p99_ratio'] or 'n/a'}x",
        needs=w["during_snapshot"],
    )
    rows.add(
        "lease+ack 8 x1",
        lambda: (
            f"{la['at_depth_per_s']:,.0f}/s at depth, {la['at_1k_per_s']:,.0f}/s at 1k: "
            f"{la['ratio']}x"
        ),
        "lease_ack",
        la["ratio"],
    )
    for key, what in (("restart", "the log as filled"), ("restart_snapshot", "from a snapshot")):
        rows.add(
            f"kill -9, {what}",
            functools.partial(_restart, s[key], s["jobs"]),
            key,
            s[key]["jobs_present"],
        )
    return rows.lines


def _via(index: int) -> str:
    return (
        f"the leader's snapshot at {index:,}, then its log" if index else "the leader's log alone"
    )


def _restart(r: dict[str, Any], jobs: int) -> str:
    return (
        f"serving (a Lease) {r['seconds']} s after the start; {r['jobs_present']:,} of "
        f"{jobs:,} jobs there; RSS {mb(r['rss_bytes'])}"
    )


def report_cluster(cl: dict[str, Any]) -> list[str]:
    rows = _Rows("3 nodes", cl)
    f, cu = cl["fill"], cl["catch_up"]
    if "setup" in rows.err:
        rows.add("start", lambda: "", "setup")
    rows.add("fill", lambda: _fill(f), "fill", f["jobs"])
    for m in cl["memory"]:
        rows.add(f"memory {m['node']}", functools.partial(_memory, m))
    sn = cl["snapshot"]
    rows.add(
        "leader's snapshot",
        lambda: (
            f"{sn['seconds']:,.2f} s, {mb(sn['bytes'])} "
            + (
                f"(forced: serial writes {_lat(sn['writes'])})"
                if sn["forced"]
                else "(taken on its own; mean time)"
            )
            + f"; leader {sn['leader_before']}, {sn['elections']} elections, then "
            + f"{sn['leader_after']}"
        ),
        "snapshot",
        sn["forced"],
    )
    rows.add(
        f"catch-up of {cu['follower'] or 'a follower'}",
        lambda: (
            f"wiped, caught up in {cu['seconds']} s "
            f"({_via(cu['leader_snapshot_index'])}); the leader's writes meanwhile "
            f"{_lat(cu['writes_during'])}; its RSS after {mb(cu['rss_bytes'])}; "
            f"state hash {cu['state_hash']}; every queue's stats equal: {cu['stats_equal']}"
        ),
        "catch_up",
        cu["stats_equal"],
    )
    return rows.lines


def targets(depth: dict[str, Any]) -> list[str]:
    """Issue 14's "Done when", as far as this depth measured them."""
    s = depth.get("single") or single_template(depth["jobs"])
    cl = depth.get("cluster") or cluster_template(depth["jobs"])
    checks: list[tuple[str, bool | None]] = []
    if depth["jobs"] == 1_000_000:
        rss = s["memory"]["rss_bytes"]
        checks.append(("RSS <= 400 MB", None if rss is None else rss <= TARGET_RSS_1M))
    for key, what in (("restart", "log"), ("restart_snapshot", "snapshot")):
        r = s[key]
        took = None if r["seconds"] is None else r["seconds"] <= TARGET_RESTART_S
        checks.append((f"restart ({what}) <= 10 s, every job back", took and r["all_present"]))
    ratio = s["writes"]["p99_ratio"]
    checks.append(("p99 in snapshot <= 2x", None if ratio is None else ratio <= TARGET_P99_RATIO))
    la = s["lease_ack"]["ratio"]
    checks.append(("lease+ack >= 0.8x", None if la is None else la >= TARGET_LEASE_RATIO))
    cu = cl["catch_up"]
    checks.append(("catch-up, same state", None if cu["seconds"] is None else cu["stats_equal"]))
    word = {True: "ok", False: "MISSED", None: "not measured"}
    return ["targets  " + "; ".join(f"{name}: {word[ok]}" for name, ok in checks)]


def expected_minutes(jobs: int, seconds: float, rates: dict[str, float]) -> float:
    """A rough guess: the fills at the rates seen so far (or this machine's),
    two lease+ack runs, ~20 s of serial writes to a snapshot, settles, restarts."""
    t = 0.0
    if "single" in rates:
        t += jobs / rates["single"] + 2 * seconds + 20 + 4 * SETTLE_S + 5
    if "cluster" in rates:
        t += jobs / rates["cluster"] + 3 * SETTLE_S + 30
    return t / 60


async def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--jobs",
        type=counts,
        default=None,
        help=f"depths, e.g. 2k,100k,1m (default {DEFAULT_JOBS})",
    )
    p.add_argument("--scale", choices=("default", "10m"), default="default", help="10m adds 10M")
    p.add_argument("--seconds", type=float, default=10.0, help="each lease+ack run (default 10)")
    p.add_argument("--no-cluster", dest="cluster", action="store_false", help="one node only")
    p.add_argument("--no-single", dest="single", action="store_false", help="the cluster only")
    p.add_argument(
        "--restart-timeout", type=float, default=60.0, help="s, plus 60 per million jobs"
    )
    p.add_argument(
        "--snapshot-timeout",
        type=float,
        default=90.0,
        help="s of serial writes waiting for a snapshot, plus 60 per million jobs",
    )
    p.add_argument(
        "--max-rss-mb", type=int, default=6_000, help="stop a fill past this node RSS (MB)"
    )
    p.add_argument(
        "--node-arg", action="append", default=[], help="an extra `pq node` flag (repeatable)"
    )
    p.add_argument(
        "--settle-s", type=float, default=SETTLE_S, help="wait before reading RSS (default 2)"
    )
    p.add_argument("--keep", action="store_true", help="keep the data dirs and logs")
    p.add_argument("-o", "--output", choices=("table", "json"), default="table")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    args = p.parse_args(argv)
    depths = args.jobs or counts(DEFAULT_JOBS)
    if args.scale == "10m" and 10_000_000 not in depths:
        depths.append(10_000_000)
    progress = Progress(args.quiet)
    as_table = args.output == "table"
    result: dict[str, Any] = {
        "payload_bytes": len(PAYLOAD),
        "batch": BATCH,
        "in_flight": IN_FLIGHT,
        "lease_ack_workers": WORKERS,
        "lease_ack_seconds": args.seconds,
        "cpus": os.cpu_count(),
        "depths": [],
    }
    if as_table:
        print(
            f"{len(PAYLOAD)}-byte payloads, priorities 0..9, EnqueueBatch x{BATCH} with "
            f"{IN_FLIGHT} in flight; lease+ack: {WORKERS} workers x1 for {args.seconds:g} s; "
            f"{os.cpu_count()} CPUs",
            flush=True,
        )
    tmp = tempfile.mkdtemp(prefix="pq-scale-")
    if args.keep:
        print(f"data dirs and logs under {tmp}", file=sys.stderr)
    try:
        bench = Bench(Path(tmp), args, progress)
        if not args.single:
            bench.rates.pop("single")
        if args.cluster:
            bench.rates["cluster"] = 10_000.0
        for jobs in depths:
            guess = expected_minutes(jobs, args.seconds, bench.rates)
            progress.phase(f"== {jobs:,} pending jobs: expected about {guess:.0f} min ==")
            depth: dict[str, Any] = {"jobs": jobs}
            depth["single"] = await bench.single(jobs) if args.single else None
            depth["cluster"] = await bench.cluster(jobs) if args.cluster else None
            result["depths"].append(depth)
            for key in ("single", "cluster"):
                done = (depth[key] or {}).get("fill", {})
                if done.get("jobs_per_s") and key in bench.rates:
                    bench.rates[key] = done["jobs_per_s"]
            if as_table:
                print(f"== {jobs:,} pending jobs ==")
                lines = report_single(depth["single"]) if depth["single"] is not None else []
                if depth["cluster"] is not None:
                    lines += report_cluster(depth["cluster"])
                print("\n".join(lines + targets(depth)), flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    if not as_table:
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
