"""Single enqueues of many clients through a balancer, coalescing on and off,
and straight to the leader: jobs/s, and CPU per job of the balancer and of
the leader. A measurement, not a test (no figure is asserted)::

    PYTHONPATH=. .venv/bin/python -m tests.faults.balancer_load --repeats 3

A real 3-node cluster of ``pq node`` processes on SQLite (``synchronous=FULL``)
and two ``pq balancer`` processes in front of it (``--coalesce`` and
``--no-coalesce``), in one run. Each client has its own connection and sends
one ``Enqueue`` at a time (a raw stub, as a client in any language does;
``--sdk``: an SDK ``Client`` calling ``enqueue()``). CPU is user + system
time of each process from ``/proc``. A repeat is ``--rounds`` short turns of
each target (the order rotates), so a noisy neighbour on a shared machine
weighs on each alike; quote the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import grpc

from pqueue.cli.devcluster import free_ports
from pqueue.client import Client
from pqueue.errors import PQueueError
from pqueue.v1 import queue_pb2 as pb
from tests.faults.cluster import ProcCluster

QUEUE = "load"
_TICK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


async def load(
    address: str, clients: int, seconds: float, payload: bytes, sdk: bool = False
) -> tuple[int, int]:
    """``clients`` connections each sending single enqueues for ``seconds``:
    (jobs acknowledged, calls failed). ``sdk``: each client a ``Client`` calling
    ``enqueue()`` (it sends a lone call as a ``Submit`` of one)."""
    if sdk:
        return await _sdk_load(address, clients, seconds, payload)
    channels = [grpc.aio.insecure_channel(address) for _ in range(clients)]
    done = failed = 0
    try:
        await asyncio.gather(*(c.channel_ready() for c in channels))
        end = time.monotonic() + seconds
        # Serialized once: the clients' own CPU is not what is measured.
        request = pb.EnqueueRequest(queue=QUEUE, job=pb.JobSpec(payload=payload))
        data = request.SerializeToString()

        async def client(channel: grpc.aio.Channel) -> None:
            nonlocal done, failed
            enqueue: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
                "/pqueue.v1.Queue/Enqueue"
            )
            while time.monotonic() < end:
                try:
                    await enqueue(data, timeout=10)
                    done += 1
                except grpc.aio.AioRpcError:
                    failed += 1

        await asyncio.gather(*(client(c) for c in channels))
    finally:
        for channel in channels:
            await channel.close()
    return done, failed


async def _sdk_load(address: str, clients: int, seconds: float, payload: bytes) -> tuple[int, int]:
    done = failed = 0
    sdks = [Client(address, look_aside=False, timeout_s=10, max_retries=0) for _ in range(clients)]
    end = time.monotonic() + seconds

    async def client(c: Client) -> None:
        nonlocal done, failed
        while time.monotonic() < end:
            try:
                await c.enqueue(QUEUE, payload)
                done += 1
            except PQueueError:
                failed += 1

    try:
        await asyncio.gather(*(client(c) for c in sdks))
    finally:
        for c in sdks:
            await c.close()
    return done, failed


class Balancer:
    """A ``pq balancer`` process in front of ``cluster``."""

    def __init__(self, cluster: ProcCluster, root: Path, *flags: str) -> None:
        port, metrics_port = free_ports(2)
        self.address = f"127.0.0.1:{port}"
        self.metrics = f"http://127.0.0.1:{metrics_port}/metrics"
        cmd = [sys.executable, "-m", "pqueue.cli", "balancer", "run", "--listen", self.address]
        cmd += ["--backends", ",".join(cluster.address(i) for i in sorted(cluster.ports))]
        cmd += ["--metrics-listen", f"127.0.0.1:{metrics_port}", "--log-level", "WARNING"]
        with (root / f"balancer-{port}.log").open("ab") as log:
            self.proc = subprocess.Popen([*cmd, *flags], stdout=log, stderr=log)

    def submits(self) -> tuple[float, float]:
        """(Submit calls sent, calls they carried) so far."""
        text = urllib.request.urlopen(self.metrics, timeout=5).read().decode()
        found = {"_count": 0.0, "_sum": 0.0}
        for line in text.splitlines():
            for suffix in found:
                if line.startswith(f"pq_balancer_submit_operations{suffix} "):
                    found[suffix] = float(line.split()[1])
        return found["_count"], found["_sum"]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(15)


async def knows_leader(address: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            async with Client(address, look_aside=False, timeout_s=1, max_retries=0) as c:
                if (await c.balancer_status()).leader_address:
                    return
        except PQueueError:
            pass
        await asyncio.sleep(0.2)
    raise RuntimeError(f"the balancer on {address} never learned the leader")


#: The balancers measured beside direct calls: name -> ``pq balancer run`` flags.
VARIANTS = {
    "coalesce on": ("--coalesce",),
    "coalesce off": ("--no-coalesce",),
    "on, 2 in flight": ("--coalesce", "--coalesce-in-flight", "2"),
}


async def measure(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="pq-balancer-load-") as tmp:
        root = Path(tmp)
        cluster = ProcCluster(root, extra={i: ("--log-level", "WARNING") for i in (1, 2, 3)})
        balancers: dict[str, Balancer] = {}
        try:
            await cluster.start()
            for name in args.variants:
                balancers[name] = Balancer(cluster, root, *VARIANTS[name])
            for each in balancers.values():
                await knows_leader(each.address)
            leader = await cluster.leader()
            async with Client(cluster.address(leader), timeout_s=10) as c:
                await c.create_queue(QUEUE)
            targets = ["direct", *balancers]
            payload = b"x" * args.payload_bytes

            def address_of(target: str, leader: int) -> str:
                return cluster.address(leader) if target == "direct" else balancers[target].address

            for target in targets:  # warm up each path
                await load(address_of(target, leader), args.clients, 1.0, payload, args.sdk)
            rows: dict[tuple[int, str], tuple[float, float, float]] = {}
            # Per repeat and target: [jobs, seconds, leader CPU s, balancer CPU s, Submits, calls].
            totals: dict[tuple[int, str], list[float]] = {}
            for repeat in range(args.repeats):
                for round_ in range(args.rounds):  # short turns, so load swings hit each alike
                    k = (repeat * args.rounds + round_) % len(targets)
                    for target in targets[k:] + targets[:k]:
                        leader = await cluster.leader()
                        lpid = cluster.procs[leader].pid
                        b = balancers.get(target)
                        l0, b0 = cpu_s(lpid), cpu_s(b.proc.pid) if b else 0.0
                        s0 = b.submits() if b else (0.0, 0.0)
                        started = time.monotonic()
                        jobs, failed = await load(
                            address_of(target, leader),
                            args.clients,
                            args.seconds,
                            payload,
                            args.sdk,
                        )
                        elapsed = time.monotonic() - started
                        l1, b1 = cpu_s(lpid), cpu_s(b.proc.pid) if b else 0.0
                        s1 = b.submits() if b else (0.0, 0.0)
                        t = totals.setdefault((repeat, target), [0.0] * 6)
                        for i, v in enumerate(
                            (jobs, elapsed, l1 - l0, b1 - b0, s1[0] - s0[0], s1[1] - s0[1])
                        ):
                            t[i] += v
                        if failed:
                            print(f"repeat {repeat + 1} {target}: {failed} calls failed")
                        async with Client(cluster.address(leader), timeout_s=10) as c:
                            await c.purge(QUEUE)
                for target in targets:
                    done, elapsed, lead_s, bal_s, submits, carried = totals[(repeat, target)]
                    per_job = 1e6 / max(1.0, done)
                    rows[(repeat, target)] = (done / elapsed, lead_s * per_job, bal_s * per_job)
                    batch = f"  {carried / submits:5.1f} calls/Submit" if submits else ""
                    print(
                        f"repeat {repeat + 1} {target:>16}: {done / elapsed:7.0f} jobs/s  "
                        f"leader {lead_s * per_job:5.0f} us/job  "
                        f"balancer {bal_s * per_job:5.0f} us/job{batch}",
                        flush=True,
                    )
            print()
            for repeat in range(args.repeats):
                d = rows[(repeat, "direct")]
                parts = []
                for name in balancers:
                    r = rows[(repeat, name)]
                    parts.append(
                        f"{name}: jobs/s x{r[0] / d[0]:.2f}, leader CPU/job x{r[1] / d[1]:.2f}, "
                        f"balancer+leader CPU/job x{(r[1] + r[2]) / d[1]:.2f}"
                    )
                print(f"repeat {repeat + 1} (vs direct) " + "; ".join(parts))
        finally:
            for each in balancers.values():
                each.stop()
            await cluster.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=2.0, help="one turn of one target")
    parser.add_argument("--rounds", type=int, default=3, help="turns of each target per repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--payload-bytes", type=int, default=64)
    parser.add_argument(
        "--sdk", action="store_true", help="clients are SDK Clients calling enqueue()"
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=list(VARIANTS),
        default=["coalesce on", "coalesce off"],
        help="the balancers measured beside direct calls",
    )
    asyncio.run(measure(parser.parse_args()))


if __name__ == "__main__":
    main()
