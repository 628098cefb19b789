"""The Worker helper against a real node."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from pqueue.client import Client
from pqueue.v1 import queue_pb2 as pb
from pqueue.worker import Worker, WorkerConfig


async def _run_until(worker: Worker, done: asyncio.Event, timeout_s: float = 20) -> None:
    task = asyncio.create_task(worker.run())
    try:
        await asyncio.wait_for(done.wait(), timeout_s)
    finally:
        worker.stop()
        await asyncio.wait_for(task, timeout_s)


async def test_successful_jobs_are_acked_in_batches(client: Client) -> None:
    await client.enqueue_batch("q", [pb.JobSpec(payload=str(i).encode()) for i in range(40)])
    seen: list[bytes] = []
    done = asyncio.Event()
    barriers = [asyncio.Event()]

    async def handler(job: pb.LeasedJob) -> None:
        barrier = barriers[-1]
        seen.append(job.payload)
        if len(seen) % 10 == 0:  # ten arrived: release them together
            barriers.append(asyncio.Event())
            barrier.set()
        await barrier.wait()
        if len(seen) == 40:
            done.set()

    calls = 0
    ack_many = client.ack_many

    async def counting_ack_many(queue: str, leases):  # type: ignore[no-untyped-def]
        nonlocal calls
        calls += 1
        return await ack_many(queue, leases)

    client.ack_many = counting_ack_many  # type: ignore[method-assign]
    worker = Worker(client, "q", handler, config=WorkerConfig(concurrency=10, wait_ms=200))
    await _run_until(worker, done)
    await asyncio.sleep(0.1)
    [stats] = await client.stats("q")
    assert (stats.ready, stats.leased, stats.acked_total) == (0, 0, 40)
    assert sorted(seen) == sorted(str(i).encode() for i in range(40))
    assert worker.stats.acked == 40
    assert calls < 40  # acks that finished together shared calls


async def test_failing_jobs_become_dead_with_the_exception_text(client: Client) -> None:
    await client.create_queue(
        "q", pb.QueueConfig(max_attempts=3, backoff_base_ms=10, backoff_max_ms=20)
    )
    r = await client.enqueue("q", b"x")
    attempts: list[int] = []
    done = asyncio.Event()

    async def handler(job: pb.LeasedJob) -> None:
        attempts.append(job.attempt)
        if job.attempt == 3:
            asyncio.get_running_loop().call_later(0.2, done.set)
        raise ValueError(f"boom {job.attempt}")

    worker = Worker(client, "q", handler, config=WorkerConfig(concurrency=1, wait_ms=100))
    await _run_until(worker, done)
    assert attempts == [1, 2, 3]
    job = await client.get_job("q", r.job_id)
    assert job.state == pb.JOB_STATE_DEAD
    assert [e.reason for e in job.errors] == [
        "ValueError: boom 1",
        "ValueError: boom 2",
        "ValueError: boom 3",
    ]
    assert worker.stats.failed == 3


async def test_a_failing_handler_is_logged_once_with_its_traceback_and_hooks_see_each_job(
    client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    await client.create_queue("q", pb.QueueConfig(max_attempts=1))
    await client.enqueue_batch("q", [pb.JobSpec(payload=b"%d" % i) for i in range(6)])
    failed: list[tuple[bytes, str]] = []
    succeeded: list[tuple[bytes, object]] = []
    done = asyncio.Event()

    async def handler(job: pb.LeasedJob) -> str:
        if int(job.payload) % 2:
            raise KeyError(f"no template {job.payload.decode()}")
        return f"sent {job.payload.decode()}"

    async def on_error(job: pb.LeasedJob, exc: BaseException) -> None:
        failed.append((job.payload, repr(exc)))
        if len(failed) + len(succeeded) == 6:
            done.set()

    def on_success(job: pb.LeasedJob, result: object) -> None:
        succeeded.append((job.payload, result))
        if len(failed) + len(succeeded) == 6:
            done.set()

    caplog.set_level(logging.WARNING, logger="pqueue.worker")
    config = WorkerConfig(concurrency=1, wait_ms=100)
    worker = Worker(client, "q", handler, config=config, on_error=on_error, on_success=on_success)
    await _run_until(worker, done)
    assert sorted(failed) == [(b"%d" % i, f"KeyError('no template {i}')") for i in (1, 3, 5)]
    assert sorted(succeeded) == [(b"%d" % i, f"sent {i}") for i in (0, 2, 4)]
    # Three failures within a minute: one traceback, the others counted.
    [logged] = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert logged.levelno == logging.ERROR
    assert logged.getMessage().startswith("handler failed on job ")
    assert "KeyError: 'no template " in logged.getMessage()
    assert logged.exc_info is not None
    assert "in handler" in caplog.text  # the handler's own frame, in the traceback
    assert worker.failures.suppressed == 2
    [stats] = await client.stats("q")
    assert (stats.acked_total, stats.dead) == (3, 3)


async def test_slow_handler_keeps_its_lease_by_extending(client: Client) -> None:
    r = await client.enqueue("q", b"slow")
    done = asyncio.Event()

    async def handler(job: pb.LeasedJob) -> None:
        await asyncio.sleep(2.0)  # over twice the lease: only extending keeps it
        done.set()

    # Extended every 300 ms: a 900 ms lease leaves 600 ms of slack for a
    # loaded machine (a 300 ms lease lost it once in CI to a 200 ms stall).
    worker = Worker(
        client, "q", handler, config=WorkerConfig(concurrency=1, lease_ms=900, wait_ms=100)
    )
    await _run_until(worker, done)
    await asyncio.sleep(0.1)
    [stats] = await client.stats("q")
    assert (stats.acked_total, stats.expired_total) == (1, 0)
    assert worker.stats.acked == 1
    assert r.job_id > 0


async def test_stop_releases_unfinished_jobs_for_others(client: Client) -> None:
    # max_attempts=1: were the release counted as a failed attempt, the job
    # would be dead after one redeploy.
    await client.create_queue("q", pb.QueueConfig(max_attempts=1))
    r = await client.enqueue("q", b"stuck")
    started = asyncio.Event()

    async def handler(job: pb.LeasedJob) -> None:
        started.set()
        await asyncio.sleep(3600)

    worker = Worker(
        client, "q", handler, config=WorkerConfig(concurrency=1, wait_ms=100, shutdown_grace_s=0.2)
    )
    task = asyncio.create_task(worker.run())
    await asyncio.wait_for(started.wait(), 10)
    worker.stop()
    await asyncio.wait_for(task, 10)
    job = await client.get_job("q", r.job_id)
    assert (job.state, job.attempts, list(job.errors)) == (pb.JOB_STATE_READY, 0, [])
    assert worker.stats.released == 1


async def test_stop_lets_running_handlers_finish(client: Client) -> None:
    await client.enqueue("q", b"quick")
    started = asyncio.Event()

    async def handler(job: pb.LeasedJob) -> None:
        started.set()
        await asyncio.sleep(0.3)

    worker = Worker(client, "q", handler, config=WorkerConfig(concurrency=1, wait_ms=100))
    task = asyncio.create_task(worker.run())
    await asyncio.wait_for(started.wait(), 10)
    worker.stop()
    await asyncio.wait_for(task, 10)
    [stats] = await client.stats("q")
    assert stats.acked_total == 1


@pytest.mark.parametrize(
    "options",
    [
        {},  # a stream: the node waits for the queue
        {"streaming": False},  # long polls: the node waits for the queue
        {"streaming": False, "wait_ms": 0},  # NOT_FOUND at once: looked for again soon
    ],
)
async def test_a_worker_started_before_its_queue_exists_handles_its_first_job(
    client: Client, options: dict[str, Any]
) -> None:
    handled: list[bytes] = []
    indexes: list[int] = []
    states: list[int] = []
    done = asyncio.Event()

    async def handler(job: pb.LeasedJob) -> None:
        handled.append(job.payload)
        indexes.append(client.last_log_index)
        states.append((await client.get_job("later", job.job_id)).state)
        done.set()

    # The default wait (20 s): the worker must not sit out a whole one.
    config = WorkerConfig(concurrency=1, **options)
    worker = Worker(client, "later", handler, config=config)
    task = asyncio.create_task(worker.run())
    await asyncio.sleep(0.5)
    assert not task.done()  # a missing queue did not end it
    sent = await client.enqueue("later", b"x")
    try:
        await asyncio.wait_for(done.wait(), 10)  # the old 20 s NOT_FOUND sleep fails this
    finally:
        worker.stop()
        await asyncio.wait_for(task, 30)
    assert handled == [b"x"]
    # The lease is a write the client's reads wait for: its entry is the
    # enqueue's (the waiting lease rode behind it) or a later one, and a read
    # in the handler sees the job leased.
    assert indexes[0] >= sent.log_index
    assert states == [pb.JOB_STATE_LEASED]


async def test_a_worker_cancelled_mid_poll_leaves_no_call_pending(client: Client) -> None:
    # Cancelled from outside while its long poll waits on the node, the
    # worker cancels that poll too: nothing of it is left pending.
    await client.create_queue("idle")

    async def handler(job: pb.LeasedJob) -> None:
        return None

    worker = Worker(client, "idle", handler, config=WorkerConfig(wait_ms=30_000))
    before = asyncio.all_tasks()
    poll = asyncio.create_task(worker._lease(1))
    await asyncio.sleep(0.2)  # the long poll is parked on the node
    poll.cancel()
    with pytest.raises(asyncio.CancelledError):
        await poll
    await asyncio.sleep(0.05)
    left = [t for t in asyncio.all_tasks() - before if not t.done()]
    # (The in-process node's own handler of the call ends on its side.)
    assert [t for t in left if "Client.lease" in t.get_coro().__qualname__] == []  # type: ignore[union-attr]
