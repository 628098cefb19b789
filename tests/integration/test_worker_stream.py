"""The Worker on a ``Consume`` stream: credits, acks on the stream, reconnects, fallback."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from pqueue.client import Client
from pqueue.errors import NotLeaderError
from pqueue.node.server import NodeServer
from pqueue.v1 import queue_pb2 as pb
from pqueue.v1 import queue_pb2_grpc as pbg
from pqueue.wire.status import to_op_status
from pqueue.worker import Worker, WorkerConfig
from tests.inproc import Cluster


async def _until(what: str, check: Callable[[], bool], timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def running(worker: Worker) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(worker.run())
    try:
        yield task
    finally:
        worker.stop()
        await asyncio.wait_for(task, 30)


async def test_a_worker_streams_and_acks_on_the_stream(server: NodeServer, client: Client) -> None:
    await client.enqueue_batch("q", [pb.JobSpec(payload=b"%d" % i) for i in range(40)])
    running_now, most = 0, 0
    seen: list[bytes] = []
    barriers = [asyncio.Event()]

    async def handler(job: pb.LeasedJob) -> None:
        nonlocal running_now, most
        running_now += 1
        most = max(most, running_now)
        barrier = barriers[-1]
        seen.append(job.payload)
        if len(seen) % 10 == 0:  # ten arrived: release them together
            barriers.append(asyncio.Event())
            barrier.set()
        await barrier.wait()
        running_now -= 1

    single_calls = Counter[str]()
    for name in ("ack", "ack_many", "nack", "extend", "lease"):
        original = getattr(client, name)

        def counting(*args: Any, _name: str = name, _original: Any = original, **kw: Any) -> Any:
            single_calls[_name] += 1
            return _original(*args, **kw)

        setattr(client, name, counting)
    worker = Worker(client, "q", handler, config=WorkerConfig(concurrency=10, wait_ms=200))
    async with running(worker):
        await _until("a stream", lambda: worker._stream is not None)
        stream = worker._stream
        assert stream is not None
        await _until("40 acks", lambda: worker.stats.acked == 40)
        assert server.node.consume_streams == 1
    [stats] = await client.stats("q")
    assert (stats.ready, stats.leased, stats.acked_total) == (0, 0, 40)
    assert sorted(seen) == sorted(b"%d" % i for i in range(40))
    assert most <= 10  # never more jobs in hand than slots
    assert single_calls == {}  # every ack rode on the stream
    assert stream.settled == 40  # each ack answered on the stream
    # Acks that finished together went out together, packed into one Ack,
    # with the credits their slots freed.
    assert stream.ops_sent < 40
    assert stream.requests_sent < 40
    # Each Ack the stream settled is counted as one operation, answered OK.
    registry = server.metrics.registry
    assert registry.get_sample_value("pq_operations_total", {"op": "ack", "code": "OK"}) == (
        stream.ops_sent
    )
    assert (worker.streams_opened, worker.stats.leased) == (1, 40)


async def test_a_failed_job_is_nacked_on_the_stream_and_comes_back(
    server: NodeServer, client: Client
) -> None:
    await client.create_queue("q", pb.QueueConfig(backoff_base_ms=10, backoff_max_ms=20))
    r = await client.enqueue("q", b"flaky")
    attempts: list[int] = []

    async def handler(job: pb.LeasedJob) -> None:
        attempts.append(job.attempt)
        if job.attempt < 3:
            raise RuntimeError("not yet")

    worker = Worker(client, "q", handler, config=WorkerConfig(concurrency=2))
    async with running(worker):
        await _until("the third attempt to succeed", lambda: worker.stats.acked == 1)
    assert attempts == [1, 2, 3]
    assert worker.stats.failed == 2
    done = await client.get_job("q", r.job_id)
    assert (done.state, done.attempts) == (pb.JOB_STATE_COMPLETED, 3)


@contextlib.asynccontextmanager
async def older_node(backend: str) -> AsyncIterator[str]:
    """A node of a release before ``Consume``, as its clients see it: every
    unary method of the public services (a real node answers them), no
    ``Consume`` (gRPC answers UNIMPLEMENTED for a method nobody serves)."""
    channel = grpc.aio.insecure_channel(backend)

    def forward(path: str) -> grpc.RpcMethodHandler[bytes, bytes]:
        stub: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(path)

        async def call(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
            try:
                response: bytes = await stub(request, timeout=context.time_remaining())
            except grpc.aio.AioRpcError as exc:
                await context.abort(exc.code(), exc.details() or "", exc.trailing_metadata())
            return response

        return grpc.unary_unary_rpc_method_handler(call)

    server = grpc.aio.server()
    for service in pb.DESCRIPTOR.services_by_name.values():
        unary = {
            m.name: forward(f"/{service.full_name}/{m.name}")
            for m in service.methods
            if not (m.client_streaming or m.server_streaming)
        }
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(service.full_name, unary),)
        )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(0.5)
        await channel.close()


async def test_a_worker_falls_back_to_long_polls_against_an_older_node(
    server: NodeServer, client: Client
) -> None:
    await client.enqueue_batch("q", [pb.JobSpec(payload=b"%d" % i) for i in range(12)])
    async with older_node(server.address) as address, Client(address, max_retries=0) as old:
        async with grpc.aio.insecure_channel(address) as channel:
            from pqueue.v1 import queue_pb2_grpc as pbg

            call = pbg.QueueStub(channel).Consume()
            assert await call.code() == grpc.StatusCode.UNIMPLEMENTED  # as promised

        async def handler(job: pb.LeasedJob) -> None:
            await asyncio.sleep(0.01)

        worker = Worker(old, "q", handler, config=WorkerConfig(concurrency=3, wait_ms=100))
        async with running(worker):
            await _until("twelve acks", lambda: worker.stats.acked == 12)
        assert worker.streams_opened == 1  # tried once, then long polls
    [stats] = await client.stats("q")
    assert (stats.leased, stats.acked_total) == (0, 12)


async def test_long_polls_when_asked(server: NodeServer, client: Client) -> None:
    await client.enqueue_batch("q", [pb.JobSpec(payload=b"x")] * 5)

    async def handler(job: pb.LeasedJob) -> None:
        return None

    config = WorkerConfig(concurrency=2, wait_ms=100, streaming=False)
    worker = Worker(client, "q", handler, config=config)
    async with running(worker):
        await _until("five acks", lambda: worker.stats.acked == 5)
        assert server.node.consume_streams == 0
    assert worker.streams_opened == 0


async def _drain_through(
    cluster: Cluster, endpoint: str, stop_node: Callable[[int, int], int], jobs: int = 60
) -> Worker:
    """A worker on ``endpoint`` drains ``jobs`` jobs; a third of the way in,
    ``stop_node(leader, follower)`` names the node to stop. Every job is
    acked exactly once whatever the stream went through."""
    leader = await cluster.leader()
    async with Client(cluster.addresses[leader]) as c:
        await c.enqueue_batch("q", [pb.JobSpec(payload=b"%d" % i) for i in range(jobs)])
    handled: list[bytes] = []

    async def handler(job: pb.LeasedJob) -> None:
        await asyncio.sleep(0.05)  # jobs are in hand when the stream breaks
        handled.append(job.payload)

    async with Client(endpoint, timeout_s=5) as client:
        # Leases of 3 s (extended every second): a job pushed into a stream
        # as it broke comes back soon.
        config = WorkerConfig(concurrency=4, lease_ms=3_000, wait_ms=200)
        worker = Worker(client, "q", handler, config=config)
        async with running(worker):
            await _until("a third of the jobs", lambda: len(handled) >= jobs // 3)
            follower = next(i for i in cluster.addresses if i != leader)
            await cluster.stop_node(stop_node(leader, follower))
            await _until("every job acked", lambda: _acked(cluster) == jobs)
        [stats] = await client.stats("q", consistent=True)
    assert (stats.ready, stats.delayed, stats.leased, stats.dead) == (0, 0, 0, 0)
    assert stats.acked_total == jobs  # each job completed exactly once
    assert set(handled) == {b"%d" % i for i in range(jobs)}
    assert worker.streams_opened >= 2  # it opened a new stream
    return worker


def _acked(cluster: Cluster) -> int:
    """Jobs of ``q`` acked, as the leader has applied it (0 while none leads)."""
    for server in cluster.servers.values():
        queue = server.node.machine.queues.get("q")
        if server.node.log.is_leader and queue is not None:
            return queue.counters.acked
    return 0


async def test_a_worker_reconnects_when_the_follower_it_streams_through_drains(
    cluster: Cluster,
) -> None:
    leader = await cluster.leader()
    first, second = (i for i in sorted(cluster.addresses) if i != leader)
    endpoint = f"ipv4:{cluster.addresses[first]},{cluster.addresses[second]}"
    await _drain_through(cluster, endpoint, lambda leader, follower: first)


async def test_a_worker_follows_a_leader_change(cluster: Cluster) -> None:
    leader = await cluster.leader()
    follower = next(i for i in sorted(cluster.addresses) if i != leader)
    endpoint = f"ipv4:{cluster.addresses[leader]},{cluster.addresses[follower]}"
    await _drain_through(cluster, endpoint, lambda leader, follower: leader)


async def test_a_worker_through_the_balancer_consumes_every_job(tmp_path: Path) -> None:
    """Whether the balancer carries the stream or takes it for a unary call
    (then the worker falls back to long polls), every job is done once."""
    from tests.integration.test_balancer import balanced

    async with balanced(tmp_path) as setup, Client(setup.balancer.address) as client:
        await client.enqueue_batch("q", [pb.JobSpec(payload=b"%d" % i) for i in range(30)])
        handled: list[bytes] = []

        async def handler(job: pb.LeasedJob) -> None:
            handled.append(job.payload)

        worker = Worker(client, "q", handler, config=WorkerConfig(concurrency=4, wait_ms=200))
        async with running(worker):
            await _until("thirty acks", lambda: worker.stats.acked == 30)
        [stats] = await client.stats("q", consistent=True)
        assert (stats.ready, stats.leased, stats.acked_total) == (0, 0, 30)
        assert sorted(handled) == sorted(b"%d" % i for i in range(30))


@contextlib.asynccontextmanager
async def settles_refused_once(backend: str) -> AsyncIterator[tuple[str, list[int]]]:
    """A front of ``backend`` that passes every call on, and carries ``Consume``
    streams, but answers the first settle itself, each of its operations
    NOT_LEADER: what a leader answers for operations it held when it lost the
    lead (they never ran). Yields its address and the settle ids it refused."""
    channel = grpc.aio.insecure_channel(backend)
    refused: list[int] = []
    not_leader = to_op_status(NotLeaderError("node 9 leads", "9", backend))

    def forward(path: str) -> grpc.RpcMethodHandler[bytes, bytes]:
        stub: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(path)

        async def call(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
            try:
                response: bytes = await stub(request, timeout=context.time_remaining())
            except grpc.aio.AioRpcError as exc:
                await context.abort(exc.code(), exc.details() or "", exc.trailing_metadata())
            return response

        return grpc.unary_unary_rpc_method_handler(call)

    async def consume(
        requests: AsyncIterator[pb.ConsumeRequest],
        context: grpc.aio.ServicerContext[pb.ConsumeRequest, pb.ConsumeResponse],
    ) -> AsyncIterator[pb.ConsumeResponse]:
        call = pbg.QueueStub(channel).Consume(metadata=context.invocation_metadata())
        out: asyncio.Queue[pb.ConsumeResponse | None] = asyncio.Queue()

        async def pump() -> None:
            async for request in requests:
                if request.settle and not refused:
                    refused.append(request.settle_id)
                    answer = pb.ConsumeResponse(settle_id=request.settle_id)
                    answer.settled.extend(pb.OpResult(status=not_leader) for _ in request.settle)
                    await out.put(answer)
                    if not request.credits:
                        continue
                    request = pb.ConsumeRequest(credits=request.credits)
                await call.write(request)
            await call.done_writing()

        async def read() -> None:
            async for response in call:
                await out.put(response)
            await out.put(None)

        tasks = [asyncio.create_task(pump()), asyncio.create_task(read())]
        try:
            while (response := await out.get()) is not None:
                yield response
        finally:
            call.cancel()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    server = grpc.aio.server()
    unary: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
        m.name: forward(f"/pqueue.v1.Queue/{m.name}")
        for m in pb.DESCRIPTOR.services_by_name["Queue"].methods
        if not (m.client_streaming or m.server_streaming)
    }
    unary["Consume"] = grpc.stream_stream_rpc_method_handler(
        consume,
        request_deserializer=pb.ConsumeRequest.FromString,
        response_serializer=pb.ConsumeResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("pqueue.v1.Queue", unary),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}", refused
    finally:
        await server.stop(0.5)
        await channel.close()


async def test_an_ack_a_former_leader_did_not_take_is_sent_again_by_its_single_call(
    server: NodeServer, client: Client
) -> None:
    # An ack answered NOT_LEADER on the stream never ran: the job is still
    # leased to us. Its single call follows the leader and acks it, as it
    # would have had the ack gone by call; dropping it would leave the job
    # to run again once its (long) lease expires.
    await client.enqueue("q", b"once")

    async def handler(job: pb.LeasedJob) -> None:
        return None

    front = settles_refused_once(server.address)
    async with front as (address, refused), Client(address, timeout_s=5) as via:
        config = WorkerConfig(concurrency=1, lease_ms=120_000, wait_ms=200)
        worker = Worker(via, "q", handler, config=config)
        async with running(worker):
            await _until("the ack refused on the stream", lambda: bool(refused))
            await _until("the job acked", lambda: worker.stats.acked == 1, timeout_s=10)
    [stats] = await client.stats("q")
    assert (stats.leased, stats.acked_total) == (0, 1)


async def test_a_buffered_worker_holds_jobs_beyond_its_slots_but_runs_no_more_than_them(
    server: NodeServer, client: Client
) -> None:
    await client.enqueue_batch("q", [pb.JobSpec(payload=b"%d" % i) for i in range(30)])
    running_now, most = 0, 0
    go = asyncio.Event()

    async def handler(job: pb.LeasedJob) -> None:
        nonlocal running_now, most
        running_now += 1
        most = max(most, running_now)
        await go.wait()
        running_now -= 1

    config = WorkerConfig(concurrency=4, buffer=6, wait_ms=200)
    worker = Worker(client, "q", handler, config=config)
    async with running(worker):
        # Four run, six more wait in the worker: ten leased, no more.
        await _until("ten leased", lambda: worker.stats.leased == 10)
        await _until("four running", lambda: running_now == 4)
        await asyncio.sleep(0.3)
        [stats] = await client.stats("q")
        assert (stats.ready, stats.leased) == (20, 10)
        assert (running_now, worker.stats.leased) == (4, 10)
        go.set()
        await _until("30 acks", lambda: worker.stats.acked == 30)
    [stats] = await client.stats("q")
    assert (stats.ready, stats.leased, stats.acked_total) == (0, 0, 30)
    assert most == 4  # the buffer never ran a job beyond the slots
    assert worker.stats.lost == 0


@pytest.mark.parametrize("ending", ["stop", "cancel"])
async def test_buffered_jobs_go_back_at_once_and_never_run_however_the_worker_ends(
    server: NodeServer, client: Client, ending: str
) -> None:
    """``stop()``, or ``run()`` cancelled (as a refusal ends it too): the
    jobs waiting in the buffer go back at once, unrun, while the running
    ones have their grace."""
    await client.enqueue_batch("q", [pb.JobSpec(payload=b"%d" % i) for i in range(10)])
    ran: list[bytes] = []
    go = asyncio.Event()

    async def handler(job: pb.LeasedJob) -> None:
        ran.append(job.payload)
        await go.wait()

    config = WorkerConfig(concurrency=2, buffer=3, wait_ms=200, shutdown_grace_s=30)
    worker = Worker(client, "q", handler, config=config)
    task = asyncio.create_task(worker.run())
    try:
        await _until("five leased", lambda: worker.stats.leased == 5)
        await _until("two running", lambda: len(ran) == 2)
        if ending == "stop":
            worker.stop()
        else:
            task.cancel()
        # The three waiting go back now, not after the 30 s grace the two
        # running ones have: another worker can take them at once.
        deadline = time.monotonic() + 5
        while (await client.stats("q"))[0].ready != 8:
            assert time.monotonic() < deadline, "the buffered jobs were not given back"
            await asyncio.sleep(0.05)
        assert not task.done()  # the running two are still within their grace
        go.set()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 30)
    finally:
        go.set()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    assert len(ran) == 2  # a job given back from the buffer never ran
    assert (worker.stats.acked, worker.stats.released) == (2, 3)
    [stats] = await client.stats("q")
    assert (stats.ready, stats.leased, stats.acked_total) == (8, 0, 2)


async def test_a_buffered_jobs_lease_is_extended_while_it_waits(
    server: NodeServer, client: Client
) -> None:
    await client.enqueue_batch("q", [pb.JobSpec(payload=b"first"), pb.JobSpec(payload=b"second")])
    attempts: dict[bytes, int] = {}

    async def handler(job: pb.LeasedJob) -> None:
        attempts[job.payload] = job.attempt
        if job.payload == b"first":
            await asyncio.sleep(2.0)  # over three of the second's leases

    config = WorkerConfig(concurrency=1, buffer=1, lease_ms=600, wait_ms=200)
    worker = Worker(client, "q", handler, config=config)
    async with running(worker):
        await _until("two acks", lambda: worker.stats.acked == 2)
    assert attempts == {b"first": 1, b"second": 1}  # never expired, never came again
    [stats] = await client.stats("q")
    assert (stats.expired_total, stats.acked_total) == (0, 2)
    assert worker.stats.lost == 0


def test_a_buffer_is_bounded_by_the_credits_a_stream_may_hold() -> None:
    WorkerConfig(concurrency=2000)  # no buffer: as large a worker as before
    WorkerConfig(concurrency=600, buffer=400)
    for bad in ({"buffer": -1}, {"concurrency": 600, "buffer": 401}):
        with pytest.raises(ValueError, match="buffer"):
            WorkerConfig(**bad)  # type: ignore[arg-type]
