"""The life of a job through a real 3-node cluster: completed records with
results, force-complete, cancel, requeue and reprioritize, their refusals,
and every replica in the same state after each (docs/semantics.md "The life of a job")."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from pqueue.client import Client
from pqueue.errors import FailedPreconditionError, InvalidArgumentError, LeaseLostError
from pqueue.node.server import NodeServer
from pqueue.v1 import queue_pb2 as pb
from pqueue.worker import Worker, WorkerConfig
from tests.inproc import Cluster
from tests.integration.test_cli import pq, pq_json


async def _follower_client(cluster: Cluster) -> Client:
    leader = await cluster.leader()
    follower = next(i for i in cluster.servers if i != leader)
    return Client(cluster.addresses[follower], max_retries=3)


async def test_an_acked_job_is_kept_completed_with_its_result_on_every_node(
    cluster: Cluster,
) -> None:
    async with await _follower_client(cluster) as c:
        job_id = (await c.enqueue("emails", b"to: a@b")).job_id
        [job] = await c.lease("emails", consumer_id="w1")
        await c.ack("emails", job.job_id, job.lease_id, result="sent")
        done = await c.get_job("emails", job_id)
        assert (done.state, done.result, done.consumer_id) == (
            pb.JOB_STATE_COMPLETED,
            b"sent",
            "w1",
        )
        assert done.finished_at_ms >= done.enqueued_at_ms
        [stats] = await c.stats("emails")
        assert (stats.completed, stats.completed_total, stats.acked_total) == (1, 1, 1)
        with pytest.raises(InvalidArgumentError) as err:
            await c.ack("emails", job.job_id, job.lease_id, result=b"x" * (64 << 10 | 1))
        assert err.value.field == "leases[0].result"
    await cluster.same_state()
    for server in cluster.servers.values():
        assert server.node.machine.get_job("emails", job_id).result == b"sent"


async def test_operator_actions_and_their_refusals(cluster: Cluster) -> None:
    async with await _follower_client(cluster) as c:
        await c.create_queue("q", pb.QueueConfig(max_attempts=1))
        ready = (await c.enqueue("q", b"ready", priority=5)).job_id
        dying = (await c.enqueue("q", b"dying", priority=0)).job_id
        [leased] = await c.lease("q")
        assert leased.job_id == dying
        await c.nack("q", dying, leased.lease_id, reason="boom")

        # Force-complete the dead one, with a note; requeue it; cancel the ready one.
        done = await c.complete_job("q", dying, note="fixed by hand", result="ok")
        assert (done.state, done.reason, done.result) == (
            pb.JOB_STATE_COMPLETED,
            "fixed by hand",
            b"ok",
        )
        await cluster.same_state()
        again = await c.requeue_job("q", dying)
        assert (again.state, again.attempts, [e.reason for e in again.errors]) == (
            pb.JOB_STATE_READY,
            0,
            ["boom"],
        )
        cancelled = await c.cancel_job("q", ready, note="not needed")
        assert (cancelled.state, cancelled.reason) == (pb.JOB_STATE_CANCELLED, "not needed")
        await cluster.same_state()

        # A cancelled job cannot be cancelled again: the refusal names its state.
        with pytest.raises(FailedPreconditionError, match="is CANCELLED"):
            await c.cancel_job("q", ready)
        with pytest.raises(FailedPreconditionError, match="is READY"):
            await c.requeue_job("q", dying)

        # Reprioritize a waiting job into the future and back.
        later = (await c.enqueue("q", b"later", priority=9)).job_id
        moved = await c.reprioritize_job("q", later, priority=1, ready_at_ms=2**42)
        assert (moved.state, moved.priority) == (pb.JOB_STATE_DELAYED, 1)
        assert [j.job_id for j in await c.lease("q", max_jobs=5)] == [dying]
        back = await c.reprioritize_job("q", later, ready_at_ms=0)
        assert back.state == pb.JOB_STATE_READY
    await cluster.same_state()


async def test_cancelling_a_leased_job_fences_its_worker(cluster: Cluster) -> None:
    async with await _follower_client(cluster) as c:
        job_id = (await c.enqueue("q", b"slow")).job_id
        [job] = await c.lease("q")
        await c.cancel_job("q", job_id, note="operator")
        with pytest.raises(LeaseLostError):
            await c.ack("q", job.job_id, job.lease_id)
        with pytest.raises(LeaseLostError):
            await c.extend("q", job.job_id, job.lease_id)
        assert (await c.get_job("q", job_id)).state == pb.JOB_STATE_CANCELLED
    await cluster.same_state()


async def test_a_worker_handlers_return_value_is_the_jobs_result(cluster: Cluster) -> None:
    async with await _follower_client(cluster) as c:
        ids = [(await c.enqueue("resize", f"img-{k}")).job_id for k in range(5)]

        async def handler(job: pb.LeasedJob) -> str:
            return "thumb-" + job.payload.decode()

        worker = Worker(c, "resize", handler, config=WorkerConfig(concurrency=2, wait_ms=200))
        run = asyncio.create_task(worker.run())
        try:
            for _ in range(400):
                if worker.stats.acked == 5:
                    break
                await asyncio.sleep(0.05)
        finally:
            worker.stop()
            await run
        assert worker.stats.acked == 5
        results = {(await c.get_job("resize", i)).result for i in ids}
        assert results == {f"thumb-img-{k}".encode() for k in range(5)}
    await cluster.same_state()


async def test_cli_ack_with_a_result_then_job_shows_it(server: NodeServer) -> None:
    a = server.address
    await pq_json(a, "enqueue", "emails", "hello")
    [job] = await pq_json(a, "lease", "emails")
    await pq_json(a, "ack", "emails", str(job["job_id"]), str(job["lease_id"]), "--result", "ok")
    shown = await pq_json(a, "job", "emails", str(job["job_id"]))
    assert (shown["state"], shown["result"]) == ("completed", "ok")

    await pq_json(a, "queue", "create", "q", "--max-attempts", "1")
    await pq_json(a, "enqueue", "q", "x")
    [dead] = await pq_json(a, "lease", "q")
    await pq_json(a, "nack", "q", str(dead["job_id"]), str(dead["lease_id"]), "--reason", "bad")
    done = await pq_json(a, "job", "complete", "q", str(dead["job_id"]), "--note", "by hand")
    assert (done["state"], done["reason"]) == ("completed", "by hand")
    ready = (await pq_json(a, "enqueue", "q", "y"))["job_id"]
    assert (await pq_json(a, "job", "cancel", "q", str(ready)))["state"] == "cancelled"

    code, _, err = await pq(a, "job", "cancel", "q", str(ready))
    assert code == 1
    assert err.startswith("error: FAILED_PRECONDITION: ")
    assert "is CANCELLED" in err
    code, _, err = await pq(a, "job", "requeue", "q", str(ready), "--note", "x")
    assert code == 2  # refused before any call
    assert err.strip() == "error: INVALID_ARGUMENT: --note: does not go with `pq job requeue`"


async def test_a_result_the_queue_refuses_still_acks_the_job(server: NodeServer) -> None:
    async with Client(server.address, max_retries=0) as c:
        await c.create_queue("q", pb.QueueConfig(max_result_bytes=4))

        async def handler(job: pb.LeasedJob) -> Any:
            return "far too long" if job.payload == b"big" else 42

        for streaming in (True, False):  # acks on the stream, and as calls
            ids = [(await c.enqueue("q", payload)).job_id for payload in (b"big", b"odd")]
            worker = Worker(c, "q", handler, config=WorkerConfig(wait_ms=200, streaming=streaming))
            run = asyncio.create_task(worker.run())
            try:
                for _ in range(400):
                    if worker.stats.acked == 2:
                        break
                    await asyncio.sleep(0.05)
            finally:
                worker.stop()
                await run
            assert worker.stats.acked == 2
            for job_id in ids:
                done = await c.get_job("q", job_id)
                assert (done.state, done.result) == (pb.JOB_STATE_COMPLETED, b"")
