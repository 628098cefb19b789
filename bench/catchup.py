"""A wiped follower catching up by a streamed snapshot, at scale.

Two data dirs are seeded with the snapshot of a state of ``--jobs`` pending
100-byte jobs (built in this process by applying EnqueueBatch entries of
1,000); three ``pq node`` processes start on them and a third, empty dir.
Printed: the snapshot's size and write time, the seeded nodes' restart to a
leader, the empty node's catch-up (its start to applied at the snapshot's
index: transfer, store, restore), each node's peak RSS meanwhile, and
whether its stored snapshot is byte for byte the leader's. ``--writes``
keeps a client enqueueing at the leader during the catch-up (its latencies
are printed; the stored digest then is not compared). ``--after-bytes``
makes the leader snapshot again after that many bytes of new entries, with
the writes going on (see its log line: time and size of a node's own
background snapshot at that scale).

    python -m bench.catchup [--jobs 200000] [--writes] [--after-bytes 1MiB]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import sqlite3
import statistics
import tempfile
import threading
import time
from pathlib import Path

import psutil

from pqueue.cli.args import parse_bytes
from pqueue.cli.devcluster import free_ports
from pqueue.client import Client
from pqueue.errors import PQueueError
from tests.faults.cluster import ProcCluster
from tests.seed import filled_machine, seed_dirs

MB = 1e6


class RssWatch:
    """Samples each process's RSS every few milliseconds; keeps the peaks."""

    def __init__(self) -> None:
        self.peaks: dict[int, int] = {}
        self.procs: dict[int, psutil.Process] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def watch(self, node: int, pid: int) -> None:
        self.procs[node] = psutil.Process(pid)

    def start(self) -> None:
        self._thread.start()

    def reset(self) -> None:
        self.peaks = {}

    def _run(self) -> None:
        while not self._stop.is_set():
            for node, proc in list(self.procs.items()):
                try:
                    rss = proc.memory_info().rss
                except psutil.Error:
                    continue
                self.peaks[node] = max(self.peaks.get(node, 0), rss)
            time.sleep(0.02)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


async def status(address: str) -> tuple[str, int]:
    try:
        async with Client(address, timeout_s=1, max_retries=0) as c:
            s = await c.node_status()
            return s.role, s.applied_index
    except PQueueError:
        return "", 0


def stored_snapshot(data_dir: Path) -> tuple[int, bytes] | None:
    conn = sqlite3.connect(f"file:{data_dir / 'pqueue.db'}?mode=ro", uri=True)
    try:
        row = conn.execute("SELECT idx, digest FROM snapshot_file").fetchone()
    finally:
        conn.close()
    return None if row is None else (row[0], bytes(row[1]))


async def writer(address: str, stop: asyncio.Event, latencies: list[float]) -> None:
    async with Client(address, timeout_s=10, max_retries=3) as c:
        k = 0
        while not stop.is_set():
            k += 1
            started = time.perf_counter()
            await c.enqueue("w", f"during-{k}".encode().ljust(100, b"."))
            latencies.append(time.perf_counter() - started)


def quantiles(values: list[float]) -> str:
    if len(values) < 2:
        return f"{len(values)} calls"
    q = statistics.quantiles(values, n=100)
    return f"{len(values)} calls, p50 {q[49] * 1000:.1f} ms, p99 {q[98] * 1000:.1f} ms"


async def main(args: argparse.Namespace) -> None:
    root = Path(args.dir or tempfile.mkdtemp(prefix="pq-catchup-"))
    print(f"data under {root}")
    started = time.perf_counter()
    machine = filled_machine(args.jobs)
    print(f"built {args.jobs:,} jobs in {time.perf_counter() - started:.1f} s")
    seeded = await seed_dirs(machine, [root / "n1", root / "n2"])
    del machine
    gc.collect()
    print(
        f"snapshot at index {seeded.index}: {seeded.size / MB:.0f} MB, "
        f"frozen + serialized + written + fsynced in {seeded.write_s:.2f} s"
    )
    extra = ("--snapshot-log-bytes", str(args.after_bytes)) if args.after_bytes else ()
    cluster = ProcCluster(root, nodes=3, extra={1: extra, 2: extra})
    cluster.ports = dict(enumerate(free_ports(3), start=1))
    watch = RssWatch()
    try:
        t0 = time.perf_counter()
        for i in (1, 2):
            cluster.launch(i)
            watch.watch(i, cluster.procs[i].pid)
        watch.start()
        leader = await cluster.leader(timeout_s=600, among=[1, 2])
        print(
            f"nodes 1, 2 restarted on the snapshot, node {leader} leads: "
            f"{time.perf_counter() - t0:.1f} s"
        )
        print(
            "RSS after restart: "
            + ", ".join(f"n{i} {watch.peaks.get(i, 0) / MB:.0f} MB" for i in (1, 2))
        )
        stop = asyncio.Event()
        latencies: list[float] = []
        before: list[float] = []
        if args.writes:
            warm = asyncio.create_task(writer(cluster.address(leader), stop, before))
            await asyncio.sleep(3)
            stop.set()
            await warm
            stop = asyncio.Event()
            print(f"writes before the catch-up: {quantiles(before)}")
        print(
            "RSS before the catch-up: "
            + ", ".join(f"n{i} {watch.procs[i].memory_info().rss / MB:.0f} MB" for i in (1, 2))
        )
        watch.reset()
        writing = (
            asyncio.create_task(writer(cluster.address(leader), stop, latencies))
            if args.writes
            else None
        )
        t1 = time.perf_counter()
        cluster.launch(3)
        watch.watch(3, cluster.procs[3].pid)
        log = root / "n3.log"
        while "installed a snapshot" not in log.read_text():  # restored: its state is there
            if cluster.procs[3].poll() is not None:
                raise SystemExit("node 3 exited")
            await asyncio.sleep(0.05)
        caught = time.perf_counter() - t1
        _, applied = await status(cluster.address(3))
        stop.set()
        if writing is not None:
            await writing
        print(
            f"node 3 (empty) started to its snapshot installed: {caught:.1f} s (applied {applied})"
        )
        print(
            "peak RSS during the catch-up: "
            + ", ".join(
                f"n{i}{' (leader)' if i == leader else ''} {watch.peaks.get(i, 0) / MB:.0f} MB"
                for i in (1, 2, 3)
            )
        )
        if writing is not None:
            print(f"writes during the catch-up: {quantiles(latencies)}")
        for line in (root / "n3.log").read_text().splitlines():
            if "snapshot" in line:
                print("  n3:", line.split("] ", 1)[-1][:160])
        for line in (root / f"n{leader}.log").read_text().splitlines():
            if "snapshot at" in line:
                print(f"  n{leader}:", line.split("] ", 1)[-1][:160])
        stored = stored_snapshot(root / "n3")
        if stored is not None and stored[0] == seeded.index:
            same = stored[1] == seeded.digest
            print(f"node 3's stored snapshot is the leader's, byte for byte: {same}")
    finally:
        watch.stop()
        for proc in cluster.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in cluster.procs.values():
            try:
                proc.wait(30)
            except Exception:
                proc.kill()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=200_000)
    parser.add_argument("--writes", action="store_true")
    parser.add_argument("--after-bytes", type=parse_bytes, default=0)
    parser.add_argument("--dir", default=None)
    asyncio.run(main(parser.parse_args()))
