"""``Watch`` on a real 3-node cluster: a watcher on a follower sees every
event of a workload in log order, and resumes on another node when its node
stops, missing nothing and repeating nothing; a slow watcher is cut off."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from pqueue.client import Client, SyncClient
from pqueue.errors import FailedPreconditionError, InvalidArgumentError, PermissionDeniedError
from pqueue.node.auth import Verifier, issue
from pqueue.v1 import queue_pb2 as pb
from pqueue.v1 import queue_pb2_grpc as pbg
from tests.inproc import Cluster, one_node
from tests.integration.test_balancer import balanced

E = pb.WatchEvent


def key(e: pb.WatchEvent) -> tuple[int, int, int]:
    return (e.log_index, e.kind, e.job_id)


async def until(check: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def read_on(call: grpc.aio.UnaryStreamCall[pb.WatchRequest, pb.WatchEvent]) -> None:
    """Read until the stream fails."""
    while True:
        await asyncio.wait_for(call.read(), 10)


async def workload(c: Client, queue: str) -> None:
    """Enqueue, lease, ack, nack, cancel, pause and resume."""
    ids = [(await c.enqueue(queue, f"job {i}", priority=i)).job_id for i in range(4)]
    leased = await c.lease(queue, max_jobs=3, lease_ms=60_000)
    await c.ack(queue, leased[0].job_id, leased[0].lease_id, result=b"done")
    await c.nack(queue, leased[1].job_id, leased[1].lease_id, delay_ms=0, reason="retry me")
    await c.cancel_job(queue, ids[3])
    await c.pause_queue(queue)
    await c.resume_queue(queue)


async def test_a_follower_watcher_sees_everything_and_resumes_elsewhere(cluster: Cluster) -> None:
    leader = await cluster.leader()
    first, second = (i for i in cluster.addresses if i != leader)
    producer = Client(cluster.addresses[leader])
    watcher = Client(cluster.addresses[first], max_retries=5)
    seen: list[pb.WatchEvent] = []

    async def watch() -> None:
        async for event in watcher.watch(["w"], also=[cluster.addresses[second]]):
            seen.append(event)

    task = asyncio.create_task(watch())
    try:
        await until(lambda: cluster.servers[first].node.watchers.subscriptions != set())
        start = cluster.servers[first].node.machine.applied_index
        await producer.create_queue("w", pb.QueueConfig(max_attempts=3))
        await workload(producer, "w")
        await until(lambda: bool(seen) and seen[-1].kind == E.QUEUE_RESUMED)
        await cluster.stop_node(first)  # the watcher resumes on `second`
        await workload(producer, "w")
        await until(lambda: sum(e.kind == E.QUEUE_RESUMED for e in seen) == 2)
        await cluster.same_state()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert watcher.retries >= 1

    # The reference: every event of those entries, replayed from `second`'s ring.
    reference: list[pb.WatchEvent] = []
    end = cluster.servers[second].node.machine.applied_index
    async with Client(cluster.addresses[second]) as reader:
        async for event in reader.watch(["w"], from_index=start):
            reference.append(event)
            if event.log_index >= end and event.kind == E.QUEUE_RESUMED:
                break
    reference = [e for e in reference if e.log_index <= seen[-1].log_index]
    assert [key(e) for e in seen] == [key(e) for e in reference]
    assert [e.log_index for e in seen] == sorted(e.log_index for e in seen)
    kinds = [E.Kind.Name(e.kind) for e in seen]
    for kind in ("ENQUEUED", "LEASED", "COMPLETED", "NACKED", "CANCELLED", "QUEUE_PAUSED"):
        assert kinds.count(kind) >= 2, (kind, kinds)
    completed = next(e for e in seen if e.kind == E.COMPLETED)
    assert completed.result_bytes == len(b"done")
    assert completed.queue == "w"
    await producer.close()
    await watcher.close()


async def test_one_job_stats_and_refusals(cluster: Cluster) -> None:
    leader = await cluster.leader()
    follower = next(i for i in cluster.addresses if i != leader)
    async with Client(cluster.addresses[leader]) as producer:
        job_id = (await producer.enqueue("j", "x")).job_id
        await producer.enqueue("j", "other")
        [leased] = await producer.lease("j", max_jobs=1, lease_ms=60_000)
        assert leased.job_id == job_id
        await producer.ack("j", job_id, leased.lease_id)
        at = producer.last_log_index
    async with Client(cluster.addresses[follower]) as c:
        got = []
        async for event in c.watch(["j"], job_id=job_id, from_index=0, stats_interval_ms=1000):
            got.append(event)
            if event.kind == E.QUEUE_STATS:
                break
        kinds = [E.Kind.Name(e.kind) for e in got]
        assert kinds == ["ENQUEUED", "LEASED", "COMPLETED", "QUEUE_STATS"]
        assert got[-1].log_index >= at
        assert got[-1].stats.queue == "j"
        with pytest.raises(Exception, match="job_id"):
            async for _ in c.watch(["j", "k"], job_id=1):
                pass

        def sync_read(address: str) -> list[pb.WatchEvent.Kind.ValueType]:
            with SyncClient(address) as sc:
                events = sc.watch(["j"], job_id=job_id, from_index=0)
                kinds = [next(events).kind for _ in range(3)]
                events.close()
                return kinds

        sync_kinds = await asyncio.to_thread(sync_read, cluster.addresses[follower])
        assert sync_kinds == [E.ENQUEUED, E.LEASED, E.COMPLETED]
        cluster.servers[follower].node.watchers.covered_after = 3  # as if the ring had moved on
        with pytest.raises(FailedPreconditionError, match="oldest it can resume from is 3"):
            async for _ in c.watch(["j"], from_index=1):
                pass


async def test_a_slow_watcher_is_cut_off_with_its_resume_index(cluster: Cluster) -> None:
    leader = await cluster.leader()
    follower = next(i for i in cluster.addresses if i != leader)
    cluster.servers[follower].node.watchers.buffer = 50
    async with grpc.aio.insecure_channel(cluster.addresses[follower]) as channel:
        call = pbg.QueueStub(channel).Watch(pb.WatchRequest(queues=["s"]))
        first = await call.read()
        assert isinstance(first, pb.WatchEvent)
        assert first.kind == E.WATCHING
        # More events than the watcher may have unsent, at once: the node
        # ends the stream instead of holding them.
        async with Client(cluster.addresses[leader]) as producer:
            await producer.enqueue_batch("s", [pb.JobSpec(payload=b"x")] * 20)
            await producer.enqueue_batch("s", [pb.JobSpec(payload=b"x")] * 100)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await read_on(call)
        assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        details = raised.value.details() or ""
        assert "resume with from_index=" in details
        resume = int(details.rsplit("=", 1)[1])
    async with Client(cluster.addresses[follower]) as c:
        cluster.servers[follower].node.watchers.buffer = 1000
        got = []
        async for event in c.watch(["s"], from_index=resume):
            got.append(event)
            if len(got) == 100:
                break
        assert {e.kind for e in got} == {E.ENQUEUED}
        assert len({e.job_id for e in got}) == 100
    await cluster.same_state()


async def test_pq_watch_prints_json_lines_and_stops_on_ctrl_c(cluster: Cluster) -> None:
    leader = await cluster.leader()
    follower = next(i for i in cluster.addresses if i != leader)
    run = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pqueue.cli", "--endpoint", cluster.addresses[follower],
        "-o", "json", "watch", "cli", "--stats-s", "1",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert run.stdout is not None
    try:
        await until(lambda: cluster.servers[follower].node.watchers.subscriptions != set())
        async with Client(cluster.addresses[leader]) as producer:
            job_id = (await producer.enqueue("cli", "x")).job_id
        rows: list[dict[str, Any]] = []
        while not any(r["kind"] == "queue_stats" for r in rows):
            line = await asyncio.wait_for(run.stdout.readline(), 10)
            rows.append(json.loads(line))
        assert rows[0]["kind"] == "enqueued"
        assert rows[0]["job_id"] == job_id
        assert rows[0]["state"] == "ready"
        assert rows[-1]["stats"]["ready"] == 1
    finally:
        run.send_signal(signal.SIGINT)
        _, err = await asyncio.wait_for(run.communicate(), 10)
    assert run.returncode == 130
    assert b"Traceback" not in err


async def test_the_balancer_carries_a_watch_and_its_refusals(tmp_path: Path) -> None:
    async with balanced(tmp_path) as s, Client(s.balancer.address) as c:
        got: list[pb.WatchEvent] = []

        async def watch() -> None:
            async for event in c.watch(["b"]):
                got.append(event)

        task = asyncio.create_task(watch())
        try:
            await until(
                lambda: any(srv.node.watchers.subscriptions for srv in s.cluster.servers.values())
            )
            job_id = (await c.enqueue("b", "x")).job_id
            await until(lambda: bool(got))
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        assert [(e.kind, e.job_id) for e in got] == [(E.ENQUEUED, job_id)]
        with pytest.raises(InvalidArgumentError, match="queues"):
            async for _ in c.watch([]):
                pass


async def test_a_tenant_watches_its_own_queues_only(tmp_path: Path) -> None:
    secret = b"w" * 32
    async with one_node(tmp_path, verifier=Verifier(secret)) as srv:
        acme = Client(srv.address, max_retries=0, token=issue(secret, "acme", ["producer"], 600))
        other = Client(srv.address, max_retries=0, token=issue(secret, "other", ["producer"], 600))
        got: list[pb.WatchEvent] = []

        async def watch() -> None:
            async for event in acme.watch(all_queues=True):
                got.append(event)

        task = asyncio.create_task(watch())
        try:
            await until(lambda: srv.node.watchers.subscriptions != set())
            await other.enqueue("jobs", "theirs")
            job_id = (await acme.enqueue("jobs", "mine")).job_id
            await until(lambda: bool(got))
            with pytest.raises(PermissionDeniedError):
                async for _ in acme.watch(["other/jobs"]):
                    pass
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await acme.close()
            await other.close()
        assert [(e.queue, e.job_id) for e in got] == [("jobs", job_id)]
