"""What one call costs the node: CPU per job on the leader and the followers.

A real 3-node cluster of ``pq node`` processes on SQLite (fsync on, request
logs at INFO into a file, as operators run it), driven from this one process
straight at the leader (no balancer, no SDK batching: raw stubs on one
channel) through three scenarios, each for a fixed number of jobs:

- ``enqueue``: 16 tasks, each calling ``Enqueue`` with one job in a loop;
- ``submit``: 16 tasks, each calling ``Submit`` with 16 enqueue ops;
- ``lease+ack``: 16 tasks, each calling ``Lease`` (one job) then ``Ack`` on
  a queue filled beforehand (outside the measured window).

For each: jobs per second, the calls' p50/p99 latency, log entries per job
(group commit), and CPU microseconds per job (user + system, all threads,
from ``psutil``) of the leader and of the followers, read before and after.
Each pass starts a fresh cluster; ``--runs`` passes give the ranges.

``--compare DIR`` alternates passes between nodes run from another checkout
(its code first on their ``PYTHONPATH``) and from this one, so an old and a
new tree are measured by the same driver on the same machine minutes apart:
on a shared machine, quote those ratios, not absolutes. ``--profile DIR``
records the leader and a follower with py-spy during each scenario of the
first pass (``DIR/<scenario>.txt``, ``<scenario>-follower.txt``: collapsed
stacks of the threads holding the GIL) and prints the leader's top frames.

    python -m bench.node_call [--quick] [--runs 3] [--compare DIR] [--profile DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import psutil

from pqueue.client import Client
from pqueue.v1 import queue_pb2 as pb
from pqueue.v1 import queue_pb2_grpc as pbg
from tests.faults.cluster import ProcCluster

PAYLOAD = b"x" * 256
CONCURRENCY = 16
OPS_PER_SUBMIT = 16
SCENARIOS = ("enqueue", "submit", "lease+ack")
WARMUP_CALLS = 256
HERE = Path(__file__).resolve().parent.parent


@dataclass
class Figures:
    """One scenario of one pass."""

    jobs: int
    seconds: float
    leader_cpu_s: float
    #: Of the leader's CPU, the part spent in the kernel (syscalls, fsync).
    leader_sys_s: float
    follower_cpu_s: list[float]
    #: Log entries the leader committed meanwhile (group commit: jobs share them).
    entries: int
    #: Each call's latency, seconds.
    latencies: list[float]

    @property
    def jobs_per_s(self) -> float:
        return self.jobs / self.seconds

    @property
    def leader_us(self) -> float:
        return self.leader_cpu_s / self.jobs * 1e6

    @property
    def follower_us(self) -> float:
        return statistics.mean(self.follower_cpu_s) / self.jobs * 1e6

    def percentile_ms(self, p: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(len(ordered) * p))] * 1000

    def line(self) -> str:
        return (
            f"{self.jobs_per_s:7.0f} jobs/s  p50 {self.percentile_ms(0.5):6.1f} ms  "
            f"p99 {self.percentile_ms(0.99):6.1f} ms  leader {self.leader_us:5.0f} us/job "
            f"({100 * self.leader_sys_s / max(self.leader_cpu_s, 1e-9):2.0f}% sys)  "
            f"followers {self.follower_us:4.0f} us/job  "
            f"jobs/entry {self.jobs / max(self.entries, 1):5.1f}"
        )


def _cpu(proc: psutil.Process) -> tuple[float, float]:
    """(user + system, system) seconds of ``proc``, all threads."""
    t = proc.cpu_times()
    return t.user + t.system, t.system


async def _spread(calls: int, one: Callable[[], Awaitable[None]]) -> list[float]:
    """``calls`` calls of ``one`` over ``CONCURRENCY`` tasks; each one's latency."""
    remaining = calls
    latencies: list[float] = []

    async def loop() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            started = time.perf_counter()
            await one()
            latencies.append(time.perf_counter() - started)

    await asyncio.gather(*(loop() for _ in range(CONCURRENCY)))
    return latencies


class Driver:
    """Raw calls at the leader on one channel."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.aio.insecure_channel(address)
        self.stub = pbg.QueueStub(self.channel)
        self.spec = pb.JobSpec(payload=PAYLOAD)

    async def enqueue(self, queue: str) -> None:
        await self.stub.Enqueue(pb.EnqueueRequest(queue=queue, job=self.spec), timeout=30)

    async def submit(self, queue: str) -> None:
        op = pb.Operation(enqueue=pb.EnqueueRequest(queue=queue, job=self.spec))
        response = await self.stub.Submit(pb.SubmitRequest(ops=[op] * OPS_PER_SUBMIT), timeout=30)
        for result in response.results:
            if result.status.code:
                raise RuntimeError(f"a Submit op failed: {result.status.message}")

    async def fill(self, queue: str, jobs: int) -> None:
        for start in range(0, jobs, 1000):
            n = min(1000, jobs - start)
            await self.stub.EnqueueBatch(
                pb.EnqueueBatchRequest(queue=queue, jobs=[self.spec] * n), timeout=60
            )

    async def lease_ack(self, queue: str) -> None:
        while True:
            leased = await self.stub.Lease(
                pb.LeaseRequest(queue=queue, max_jobs=1, wait_ms=1000), timeout=30
            )
            if leased.jobs:
                break
        job = leased.jobs[0]
        lease = pb.JobLease(job_id=job.job_id, lease_id=job.lease_id)
        await self.stub.Ack(pb.AckRequest(queue=queue, leases=[lease]), timeout=30)

    async def close(self) -> None:
        await self.channel.close()


class Profiler:
    """py-spy recording one process's GIL-holding thread until stopped."""

    def __init__(self, pid: int, out: Path) -> None:
        spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        cmd = [spy, "record", "--pid", str(pid), "--format", "raw", "--rate", "250"]
        cmd += ["--nonblocking", "--gil", "-o", str(out)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    async def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        await asyncio.to_thread(self.proc.wait, 30)


def top_entries(path: Path, n: int = 15) -> list[tuple[str, float, float]]:
    """(frame, own %, total %) of the ``n`` frames with the most own samples."""
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        samples += count
        own[frames[-1]] += count
        for frame in set(frames):
            total[frame] += count
    if not samples:
        return []
    return [(f, 100 * c / samples, 100 * total[f] / samples) for f, c in own.most_common(n)]


class Pass:
    """One fresh cluster, the three scenarios once."""

    def __init__(self, jobs: int, profile: Path | None) -> None:
        self.jobs = {"enqueue": jobs, "submit": jobs * 4, "lease+ack": jobs}
        self.profile = profile

    async def run(self, tree: Path) -> dict[str, Figures]:
        # The nodes' code (ProcCluster passes the environment on): first on
        # their path, and not behind the working directory (``-m`` puts it first).
        os.environ["PYTHONPATH"] = str(tree)
        os.environ["PYTHONSAFEPATH"] = "1"
        out: dict[str, Figures] = {}
        with tempfile.TemporaryDirectory(prefix="pq-node-call-") as tmp:
            cluster = ProcCluster(Path(tmp))
            try:
                await cluster.start()
                leader_id = await cluster.leader()
                leader = psutil.Process(cluster.procs[leader_id].pid)
                followers = [
                    psutil.Process(p.pid) for i, p in cluster.procs.items() if i != leader_id
                ]
                driver = Driver(cluster.address(leader_id))
                try:
                    async with Client(cluster.address(leader_id)) as admin:
                        for name in SCENARIOS:
                            queue = f"q-{name.replace('+', '-')}"
                            await admin.create_queue(queue)
                            out[name] = await self.scenario(
                                name, driver, admin, queue, leader, followers
                            )
                            await admin.delete_queue(queue)
                finally:
                    await driver.close()
            finally:
                await cluster.stop()
        return out

    async def scenario(
        self,
        name: str,
        driver: Driver,
        admin: Client,
        queue: str,
        leader: psutil.Process,
        followers: list[psutil.Process],
    ) -> Figures:
        jobs = self.jobs[name]
        if name == "enqueue":
            await _spread(WARMUP_CALLS, lambda: driver.enqueue(queue))
            calls, one = jobs, (lambda: driver.enqueue(queue))
        elif name == "submit":
            calls, one = jobs // OPS_PER_SUBMIT, (lambda: driver.submit(queue))
        else:
            await driver.fill(queue, jobs + CONCURRENCY)
            calls, one = jobs, (lambda: driver.lease_ack(queue))
        spies: list[Profiler] = []
        if self.profile is not None:
            spies.append(Profiler(leader.pid, self.profile / f"{name}.txt"))
            spies.append(Profiler(followers[0].pid, self.profile / f"{name}-follower.txt"))
            await asyncio.sleep(0.5)  # let py-spy attach
        first = (await admin.node_status()).commit_index
        lead0, sys0 = _cpu(leader)
        follow0 = [_cpu(f)[0] for f in followers]
        started = time.perf_counter()
        latencies = await _spread(calls, one)
        seconds = time.perf_counter() - started
        lead1, sys1 = _cpu(leader)
        follow1 = [_cpu(f)[0] for f in followers]
        last = (await admin.node_status()).commit_index
        for spy in spies:
            await spy.stop()
        return Figures(
            jobs=calls * (OPS_PER_SUBMIT if name == "submit" else 1),
            seconds=seconds,
            leader_cpu_s=lead1 - lead0,
            leader_sys_s=sys1 - sys0,
            follower_cpu_s=[b - a for a, b in zip(follow0, follow1, strict=True)],
            entries=last - first,
            latencies=latencies,
        )


def _range(values: list[float]) -> str:
    lo, hi = min(values), max(values)
    return f"{lo:.0f}" if round(lo) == round(hi) else f"{lo:.0f}-{hi:.0f}"


def summary(label: str, passes: list[dict[str, Figures]]) -> None:
    print(f"\n{label}: {len(passes)} pass(es), ranges")
    print(
        f"{'scenario':10s} {'jobs/s':>12s} {'p99 ms':>10s} {'leader us/job':>14s} "
        f"{'follower us/job':>16s} {'jobs/entry':>11s}"
    )
    for name in SCENARIOS:
        figs = [p[name] for p in passes]
        print(
            f"{name:10s} {_range([f.jobs_per_s for f in figs]):>12s} "
            f"{_range([f.percentile_ms(0.99) for f in figs]):>10s} "
            f"{_range([f.leader_us for f in figs]):>14s} "
            f"{_range([f.follower_us for f in figs]):>16s} "
            f"{_range([f.jobs / max(f.entries, 1) for f in figs]):>11s}"
        )


async def main_async(args: argparse.Namespace) -> int:
    profile = Path(args.profile) if args.profile else None
    if profile is not None:
        profile.mkdir(parents=True, exist_ok=True)
    trees = [("this tree", HERE, "this")]
    if args.compare:
        trees.insert(0, (f"nodes from {args.compare}", Path(args.compare), "compared"))
    results: dict[str, list[dict[str, Figures]]] = {label: [] for label, _, _ in trees}
    for run in range(args.runs):
        for label, tree, slug in trees:
            into = None
            if profile is not None and run == 0:
                into = profile / slug if args.compare else profile
                into.mkdir(parents=True, exist_ok=True)
            for attempt in range(1, 4):
                try:
                    figs = await Pass(args.jobs, into).run(tree)
                    break
                except grpc.aio.AioRpcError as exc:  # a leader lost at start: a fresh cluster
                    print(f"pass {run + 1} {label}: {exc.code().name} {exc.details()}; again")
                    if attempt == 3:
                        raise
            results[label].append(figs)
            for name, fig in figs.items():
                print(f"pass {run + 1} {label:>12.12s} {name:10s} {fig.line()}", flush=True)
    for label, passes in results.items():
        summary(label, passes)
    if args.compare:
        old_passes, new_passes = results.values()
        print("\nleader us/job, medians: old -> new")
        for name in SCENARIOS:
            before = statistics.median(p[name].leader_us for p in old_passes)
            after = statistics.median(p[name].leader_us for p in new_passes)
            print(f"{name:10s} {before:6.0f} -> {after:6.0f}  ({after / before:.2f}x)")
    if profile is not None:
        for name in SCENARIOS:
            path = profile / ("this" if args.compare else "") / f"{name}.txt"
            if path.exists():
                print(f"\nleader profile, {name} (own %, total %):")
                for frame, mine, whole in top_entries(path):
                    print(f"  {mine:5.1f} {whole:5.1f}  {frame}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--jobs", type=int, default=4000, help="jobs per scenario and pass")
    parser.add_argument("--runs", type=int, default=3, help="passes (per tree)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 500 jobs, 1 pass")
    parser.add_argument("--compare", metavar="DIR", help="alternate with nodes from DIR")
    parser.add_argument("--profile", metavar="DIR", help="py-spy the first pass into DIR")
    args = parser.parse_args(argv)
    if args.quick:
        args.jobs, args.runs = 500, 1
    if args.compare:
        args.compare = str(Path(args.compare).resolve())
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
