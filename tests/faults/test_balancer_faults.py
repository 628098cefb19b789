"""The balancer in front of real node processes: kill -9, failover, a CPU-burning neighbour."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest

from pqueue.client import Client
from pqueue.errors import NotFoundError, PQueueError
from pqueue.v1 import queue_pb2 as pb
from pqueue.v1 import queue_pb2_grpc as pbg
from pqueue.worker import Worker, WorkerConfig
from tests.faults.cluster import ProcCluster, started
from tests.faults.test_faults import scenario


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[ProcCluster]:
    async with started(tmp_path, balancer_probe_s=0.5) as c:
        yield c


async def balancer_status(address: str) -> dict[str, Any]:
    """What an operator sees: ``pq -o json balancer status``."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "pqueue.cli",
        "--endpoint",
        address,
        "-o",
        "json",
        "balancer",
        "status",
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await proc.communicate()
    assert proc.returncode == 0
    status: dict[str, Any] = json.loads(out)
    return status


def row(status: dict[str, Any], node_id: int) -> dict[str, Any]:
    return next(b for b in status["backends"] if b["node"] == f"n{node_id}")


async def test_a_killed_node_is_ejected_and_traffic_goes_on(cluster: ProcCluster) -> None:
    address = cluster.balancer_address
    leader = await cluster.leader()
    follower = next(i for i in cluster.ports if i != leader)
    errors: list[PQueueError] = []
    served = 0
    stop = asyncio.Event()

    async def traffic() -> None:
        nonlocal served
        async with Client(address, look_aside=False, timeout_s=5, max_retries=0) as c:
            await c.create_queue("q")
            i = 0
            while not stop.is_set():
                i += 1
                try:
                    await c.enqueue("q", f"job-{i}", idempotency_key=f"job-{i}")
                    await c.stats("q")
                    served += 1
                except PQueueError as exc:
                    errors.append(exc)
                await asyncio.sleep(0.01)

    task = asyncio.create_task(traffic())
    await asyncio.sleep(1.0)
    killed_at = time.monotonic()
    cluster.kill9(follower)
    async with Client(address, look_aside=False, timeout_s=5) as c:
        for _ in range(300):
            backends = (await c.balancer_status()).backends
            if next(b for b in backends if b.node_id == follower).ejected:
                break
            await asyncio.sleep(0.01)
    ejected_after_s = time.monotonic() - killed_at
    assert ejected_after_s < 3.0, "not ejected within a few probe intervals"
    before = served
    await asyncio.sleep(1.5)
    stop.set()
    await task
    assert served > before + 10  # traffic went on
    assert all(e.retriable for e in errors), errors  # nothing a client could not retry
    status = await balancer_status(address)
    assert row(status, follower)["weight"] == 0
    assert row(status, follower)["ejections"] == 1


async def test_a_leader_kill_through_the_balancer_loses_nothing(cluster: ProcCluster) -> None:
    async def fault(c: ProcCluster) -> None:
        old = await c.leader()
        c.kill9(old)
        await c.leader(among=[i for i in c.ports if i != old])
        await asyncio.sleep(1.0)
        c.launch(old)

    steady = asyncio.Event()
    failures: list[PQueueError] = []

    async def one_retry_producer() -> None:
        # Idempotent enqueues allowed a single retry each: a failover must
        # never need more (the balancer absorbs it, or one retry does).
        async with Client(
            cluster.balancer_address, look_aside=False, timeout_s=10, max_retries=1
        ) as c:
            i = 0
            while not steady.is_set():
                i += 1
                try:
                    await c.enqueue("one-retry", f"x-{i}", idempotency_key=f"x-{i}")
                except PQueueError as exc:
                    failures.append(exc)
                await asyncio.sleep(0.005)

    producer = asyncio.create_task(one_retry_producer())
    try:
        await scenario(cluster, fault, settle_s=2.0, endpoint=cluster.balancer_address)
    finally:
        steady.set()
        await producer
    assert failures == []


def _pin(pid: int, cpus: set[int]) -> None:
    """Pin every thread of a process (affinity is per thread on Linux)."""
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError):  # a thread that just ended
            os.sched_setaffinity(int(task), cpus)


async def _explain(
    cluster: ProcCluster,
    status: dict[str, Any],
    busy: int,
    calm: int,
    burner: subprocess.Popen[bytes],
) -> None:
    """Fail, saying what each node reported and where everything ran."""
    loads = {}
    for n in (busy, calm):
        async with Client(cluster.address(n), timeout_s=5) as direct:
            loads[n] = (await direct.node_status()).load
    pins = {
        n: sorted(
            {
                tuple(sorted(os.sched_getaffinity(int(t))))
                for t in os.listdir(f"/proc/{cluster.procs[n].pid}/task")
            }
        )
        for n in (busy, calm)
    }
    burning = psutil.Process(burner.pid)
    raise AssertionError(
        f"busy n{busy} never lighter: {status}; node loads {loads}; burner on "
        f"{burning.cpu_affinity()} at {burning.cpu_percent(0.2)} %; thread pins {pins}"
    )


def _burner(cpus: set[int]) -> subprocess.Popen[bytes]:
    """A process that keeps ``cpus`` busy until killed."""
    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    _pin(burner.pid, cpus)
    return burner


async def test_a_node_beside_a_cpu_burner_gets_fewer_reads(cluster: ProcCluster) -> None:
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("needs two CPUs: one for the burner and its node, one for the rest")
    address = cluster.balancer_address
    leader = await cluster.leader()
    busy, calm = (i for i in sorted(cluster.ports) if i != leader)
    hot, rest = {cpus[0]}, set(cpus[1:])
    _pin(cluster.procs[busy].pid, hot)
    for i, proc in cluster.procs.items():
        if i != busy:
            _pin(proc.pid, rest)
    assert cluster.balancer is not None
    _pin(cluster.balancer.pid, rest)
    burner = _burner(hot)
    mine = os.sched_getaffinity(0)
    # This test's client joins the hot CPU too, so the calm one stays calm.
    _pin(os.getpid(), hot)
    try:
        async with Client(address, look_aside=False, timeout_s=5) as c:
            await c.create_queue("q")
            # What an operator sees: the busy node's weight drops within a
            # few probes. (A single reading may lag: a 2-vCPU VM's per-CPU
            # accounting is coarse, so poll rather than read once.)
            deadline = time.monotonic() + 15
            while True:
                status = await balancer_status(address)
                if row(status, busy)["weight"] < row(status, calm)["weight"]:
                    break
                if time.monotonic() > deadline:
                    await _explain(cluster, status, busy, calm, burner)
                await asyncio.sleep(0.2)
            before = {n: row(status, n)["reads"] for n in (busy, calm)}
            for _ in range(300):  # paced reads
                await c.stats("q")
                await asyncio.sleep(0.01)
        status = await balancer_status(address)
        reads = {n: row(status, n)["reads"] - before[n] for n in (busy, calm)}
        assert reads[busy] < 0.6 * reads[calm], (reads, status)
    finally:
        _pin(os.getpid(), mine)
        burner.kill()
        burner.wait()


async def test_a_leader_kill_resends_riding_keyed_enqueues_and_never_unkeyed_ones(
    cluster: ProcCluster,
) -> None:
    """Single enqueues of many clients ride in Submits (coalescing is on by
    default) when the leader is killed: the balancer resends the keyed ones
    (none fails), never an unkeyed one whose Submit met a plain UNAVAILABLE
    (it fails, maybe applied: never applied twice), and loses nothing
    acknowledged."""
    address = cluster.balancer_address
    async with Client(address, look_aside=False, timeout_s=10) as c:
        await c.create_queue("kill")
    acked: dict[bool, set[bytes]] = {True: set(), False: set()}
    failed: dict[bool, list[grpc.StatusCode]] = {True: [], False: []}
    stop = asyncio.Event()

    async def producer(k: int, keyed: bool) -> None:
        # A raw stub: one single call at a time, no retries but the balancer's.
        async with grpc.aio.insecure_channel(address) as channel:
            stub = pbg.QueueStub(channel)
            i = 0
            while not stop.is_set():
                i += 1
                payload = f"{'k' if keyed else 'u'}{k}-{i}".encode()
                job = pb.JobSpec(payload=payload, idempotency_key=payload.decode() if keyed else "")
                try:
                    await stub.Enqueue(pb.EnqueueRequest(queue="kill", job=job), timeout=10)
                except grpc.aio.AioRpcError as exc:
                    failed[keyed].append(exc.code())
                    continue
                acked[keyed].add(payload)

    producers = [asyncio.create_task(producer(k, k % 2 == 0)) for k in range(16)]
    try:
        await asyncio.sleep(1.5)
        old = await cluster.leader()
        cluster.kill9(old)
        await cluster.leader(among=[i for i in cluster.ports if i != old])
        await asyncio.sleep(1.5)
        cluster.launch(old)
        await asyncio.sleep(0.5)
    finally:
        stop.set()
        await asyncio.gather(*producers)
    delivered: dict[bytes, int] = {}
    async with Client(address, look_aside=False, timeout_s=10, max_retries=6) as c:
        while jobs := await c.lease("kill", max_jobs=500, lease_ms=60_000):
            for job in jobs:
                delivered[job.payload] = delivered.get(job.payload, 0) + 1
        [stats] = await c.stats("kill", consistent=True)
    print(f"\nacked {[len(a) for a in acked.values()]}, failed {failed}")
    assert stats.ready + stats.delayed == 0
    assert failed[True] == []  # the balancer absorbed the kill for every keyed call
    # Unkeyed calls may fail (their outcome unknown), only as UNAVAILABLE.
    assert set(failed[False]) <= {grpc.StatusCode.UNAVAILABLE}
    assert all(n == 1 for n in delivered.values()), "an enqueue was applied twice"
    for keyed in (True, False):
        assert acked[keyed] <= delivered.keys(), "an acknowledged enqueue was lost"
        assert len(acked[keyed]) > 100  # the load really ran


def _launch_balancer_again(cluster: ProcCluster, probe_interval_s: float) -> None:
    cmd = [sys.executable, "-m", "pqueue.cli", "balancer", "run"]
    cmd += ["--listen", cluster.balancer_address, "--probe-interval-s", str(probe_interval_s)]
    cmd += ["--backends", ",".join(cluster.address(i) for i in sorted(cluster.ports))]
    with (cluster.root / "balancer.log").open("ab") as log:
        cluster.balancer = subprocess.Popen(cmd, stdout=log, stderr=log)


async def relaunch_balancer(cluster: ProcCluster, probe_interval_s: float = 0.5) -> None:
    """``pq balancer run`` again on the address it had (clients reconnect
    there); returns once it knows the leader."""
    _launch_balancer_again(cluster, probe_interval_s)
    assert cluster.balancer is not None
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        code = cluster.balancer.poll()
        assert code is None, f"the balancer exited ({code}): see {cluster.root}/balancer.log"
        with contextlib.suppress(PQueueError):
            async with Client(
                cluster.balancer_address, look_aside=False, timeout_s=0.5, max_retries=0
            ) as c:
                if (await c.balancer_status()).leader_address:
                    return
        await asyncio.sleep(0.1)
    raise AssertionError("the balancer did not learn the leader again")


async def test_a_balancer_killed_under_a_worker_loses_nothing_and_takes_no_stale_ack(
    cluster: ProcCluster,
) -> None:
    """A Worker streams (``Consume``) through a ``pq balancer`` process that
    is killed (kill -9) mid-stream and started again on its address after
    longer than a lease: the Worker reconnects its stream through it, every
    job is done once, and a stale ack is refused. Slow jobs make stale acks happen: their leases
    lapse while the balancer is down, they are delivered again, and their
    first handlers ack, with the old lease, while the new holder works: the
    job must stay leased to the new holder (a stale ack accepted would have
    completed it)."""
    jobs, lease_ms = 200, 1500
    async with Client(cluster.endpoint, timeout_s=10) as producer:
        await producer.create_queue("work")
        for start in range(0, jobs, 100):
            batch = [pb.JobSpec(payload=f"job-{i}".encode()) for i in range(start, start + 100)]
            await producer.enqueue_batch("work", batch)
    deliveries: dict[int, list[int]] = {}  # job id -> lease ids it was delivered under
    handled: set[bytes] = set()
    first_done: dict[int, asyncio.Event] = {}
    stale_taken: list[str] = []
    checked = slow_running = 0
    reader = Client(cluster.endpoint, timeout_s=5, max_retries=6)

    async def handler(job: pb.LeasedJob) -> None:
        nonlocal slow_running, checked
        deliveries.setdefault(job.job_id, []).append(job.lease_id)
        handled.add(job.payload)
        if job.job_id % 8:
            await asyncio.sleep(random.uniform(0.0, 0.05))
            return
        if len(deliveries[job.job_id]) == 1:
            first_done[job.job_id] = asyncio.Event()
            slow_running += 1
            try:
                await asyncio.sleep(6.0)  # outlives the outage and its lease
            finally:
                slow_running -= 1
                first_done[job.job_id].set()
            return  # then the Worker acks with a lease no longer current
        await first_done[job.job_id].wait()
        await asyncio.sleep(1.0)  # meanwhile the first handler's stale ack was answered
        checked += 1
        try:
            now = await reader.get_job("work", job.job_id, consistent=True)
            if now.state != pb.JOB_STATE_LEASED:
                stale_taken.append(f"job {job.job_id}: {pb.JobState.Name(now.state)}")
        except NotFoundError:
            stale_taken.append(f"job {job.job_id} completed by a stale ack")

    client = Client(cluster.balancer_address, look_aside=False, timeout_s=3, max_retries=3)
    config = WorkerConfig(concurrency=16, lease_ms=lease_ms, wait_ms=500)
    worker = Worker(client, "work", handler, config=config)
    running = asyncio.create_task(worker.run())
    log_file = cluster.root / "balancer.log"
    try:
        # Mid-stream, and the stream's request line written: the balancer's
        # log thread writes every 50 ms, and a kill -9 loses what it had not.
        while (
            slow_running < 3
            or len(handled) < jobs // 8
            or "Received Consume request" not in log_file.read_text()
        ):
            assert not running.done(), running
            await asyncio.sleep(0.01)
        assert cluster.balancer is not None
        cluster.balancer.kill()  # kill -9, mid-stream
        cluster.balancer.wait()
        await asyncio.sleep(lease_ms / 1000 + 0.5)  # every lease held lapses meanwhile
        await relaunch_balancer(cluster)
        deadline = time.monotonic() + 90
        while True:
            assert time.monotonic() < deadline, f"{len(handled)} of {jobs} handled"
            assert not running.done(), running
            [stats] = await reader.stats("work", consistent=True)
            if stats.ready + stats.delayed + stats.leased == 0:
                break
            await asyncio.sleep(0.2)
    finally:
        worker.stop()
        await running
        await client.close()
        await reader.close()
    redelivered = sum(len(v) - 1 for v in deliveries.values())
    print(f"\nworker {worker.stats}, redelivered {redelivered}, stale acks checked {checked}")
    assert handled == {f"job-{i}".encode() for i in range(jobs)}  # nothing lost
    assert stats.acked_total == jobs  # each job completed once
    assert stats.dead == 0
    assert checked >= 1  # a stale ack was sent while a newer lease held the job
    assert stale_taken == []  # and none was accepted
    assert worker.stats.lost >= 1  # stale acks were tried (and refused)
    assert worker.stats.acked > jobs // 2  # acks went through the restarted balancer
    # It streamed: one Consume before the kill, and one again after (the
    # balancer's request log, as an operator reads it).
    # Request lines are written by the balancer's log thread: wait for them.
    deadline = time.monotonic() + 10
    while log_file.read_text().count("Received Consume request") < 2:
        assert time.monotonic() < deadline, log_file.read_text()[-2000:]
        await asyncio.sleep(0.1)
    assert "Received Lease request" not in log_file.read_text()
