"""Single enqueues of many clients through a balancer, coalescing on and off,
and straight to the leader: jobs/s, and CPU per job of the balancer and of
the leader. A measurement, not a test (no figure is asserted)::

    PYTHONPATH=. .venv/bin/python -m tests.faults.balancer_load --seconds 5 --repeats 3

A real 3-node cluster of ``pq node`` processes on SQLite (``synchronous=FULL``)
and two ``pq balancer`` processes in front of it (``--coalesce`` and
``--no-coalesce``), in one run. Each client has its own connection and sends
one ``Enqueue`` at a time (a raw stub, as a client in any language does). CPU
is user + system time of each process from ``/proc``, over the window.
Targets take turns within a repeat (the order rotates), so a noisy neighbour
on a shared machine weighs on each alike; quote the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
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


async def load(address: str, clients: int, seconds: float, payload: bytes) -> tuple[int, int]:
    """``clients`` connections each sending single enqueues for ``seconds``:
    (jobs acknowledged, calls failed)."""
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


def launch_balancer(
    cluster: ProcCluster, root: Path, coalesce: bool
) -> tuple[subprocess.Popen[bytes], str]:
    address = f"127.0.0.1:{free_ports(1)[0]}"
    cmd = [sys.executable, "-m", "pqueue.cli", "balancer", "run", "--listen", address]
    cmd += ["--backends", ",".join(cluster.address(i) for i in sorted(cluster.ports))]
    cmd += ["--coalesce" if coalesce else "--no-coalesce", "--log-level", "WARNING"]
    with (root / f"balancer-{coalesce}.log").open("ab") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=log), address


async def knows_leader(address: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            async with Client(address, timeout_s=1, max_retries=0) as c:
                if (await c.balancer_status()).leader_address:
                    return
        except PQueueError:
            pass
        await asyncio.sleep(0.2)
    raise RuntimeError(f"the balancer on {address} never learned the leader")


async def measure(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="pq-balancer-load-") as tmp:
        root = Path(tmp)
        cluster = ProcCluster(root, extra={i: ("--log-level", "WARNING") for i in (1, 2, 3)})
        balancers: dict[str, tuple[subprocess.Popen[bytes], str]] = {}
        try:
            await cluster.start()
            balancers["coalesce on"] = launch_balancer(cluster, root, True)
            balancers["coalesce off"] = launch_balancer(cluster, root, False)
            for _, address in balancers.values():
                await knows_leader(address)
            leader = await cluster.leader()
            async with Client(cluster.address(leader), timeout_s=10) as c:
                await c.create_queue(QUEUE)
            targets = ["direct", "coalesce on", "coalesce off"]
            payload = b"x" * args.payload_bytes
            rows: list[tuple[int, str, float, float, float]] = []
            for target in targets:  # warm up each path
                address = cluster.address(leader) if target == "direct" else balancers[target][1]
                await load(address, args.clients, 1.0, payload)
            for repeat in range(args.repeats):
                order = targets[repeat % 3 :] + targets[: repeat % 3]
                for target in order:
                    leader = await cluster.leader()
                    lpid = cluster.procs[leader].pid
                    bpid = balancers[target][0].pid if target != "direct" else None
                    address = (
                        cluster.address(leader) if target == "direct" else balancers[target][1]
                    )
                    l0, b0 = cpu_s(lpid), cpu_s(bpid) if bpid else 0.0
                    started = time.monotonic()
                    jobs, failed = await load(address, args.clients, args.seconds, payload)
                    elapsed = time.monotonic() - started
                    l1, b1 = cpu_s(lpid), cpu_s(bpid) if bpid else 0.0
                    rate = jobs / elapsed
                    lead_us = (l1 - l0) / max(1, jobs) * 1e6
                    bal_us = (b1 - b0) / max(1, jobs) * 1e6
                    rows.append((repeat, target, rate, lead_us, bal_us))
                    print(
                        f"repeat {repeat + 1} {target:>12}: {rate:8.0f} jobs/s  leader "
                        f"{lead_us:6.0f} us/job  balancer {bal_us:6.0f} us/job  failed {failed}",
                        flush=True,
                    )
                    async with Client(cluster.address(leader), timeout_s=10) as c:
                        await c.purge(QUEUE)
            print()
            for repeat in range(args.repeats):
                by = {t: (a, b, c) for k, t, a, b, c in rows if k == repeat}
                d, on, off = by["direct"], by["coalesce on"], by["coalesce off"]
                print(
                    f"repeat {repeat + 1}: jobs/s on/direct {on[0] / d[0]:.2f}, "
                    f"off/direct {off[0] / d[0]:.2f}, on/off {on[0] / off[0]:.2f}; "
                    f"leader CPU/job on/off {on[1] / off[1]:.2f}, on/direct {on[1] / d[1]:.2f}; "
                    f"balancer CPU/job on/off {on[2] / off[2]:.2f}"
                )
        finally:
            for proc, _ in balancers.values():
                proc.terminate()
                proc.wait(15)
            await cluster.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--payload-bytes", type=int, default=64)
    asyncio.run(measure(parser.parse_args()))


if __name__ == "__main__":
    main()
