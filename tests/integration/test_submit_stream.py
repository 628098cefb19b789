"""``SubmitStream``: Submit batches on one open stream, against real nodes.

The raw stream (what a client in another language sees), the SDK on it, a
follower's refusal and the SDK's fall back to ``Submit``, a balancer carrying
it to the leader, and a leader stopped with requests out.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from pqueue import submitstream
from pqueue.client import Client
from pqueue.errors import NotLeaderError, PQueueError, UnavailableError
from pqueue.node.server import NodeServer, ServerConfig
from pqueue.node.servicer import QueueService
from pqueue.storage.sqlite import SqliteStorage
from pqueue.v1 import queue_pb2 as pb
from pqueue.v1 import queue_pb2_grpc as pbg
from pqueue.wire.keys import LEADER_KEY, STREAM_OPEN_KEY, marked
from pqueue.wire.status import from_rpc_error
from tests.inproc import Cluster
from tests.integration.test_balancer_coalesce import balanced
from tests.integration.test_sdk_batching import served


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[NodeServer]:
    srv = NodeServer(SqliteStorage(tmp_path / "n1"), ServerConfig(listen="127.0.0.1:0"))
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop()


def _enqueue(queue: str, payload: bytes) -> pb.Operation:
    return pb.Operation(enqueue=pb.EnqueueRequest(queue=queue, job=pb.JobSpec(payload=payload)))


async def test_each_request_is_answered_by_its_id_with_per_operation_results(
    node: NodeServer,
) -> None:
    async with grpc.aio.insecure_channel(node.address) as channel:
        call = pbg.QueueStub(channel).SubmitStream()
        # The leader says it took the stream before anything is written.
        assert marked(await call.initial_metadata(), STREAM_OPEN_KEY)
        await call.write(pb.SubmitStreamRequest(submit_id=7, ops=[_enqueue("q", b"a")]))
        bad = _enqueue("", b"b")  # no queue named
        await call.write(
            pb.SubmitStreamRequest(submit_id=9, ops=[_enqueue("q", b"c"), bad, _enqueue("q", b"d")])
        )
        answers = {}
        for _ in range(2):
            answer = await call.read()
            assert isinstance(answer, pb.SubmitStreamResponse)
            answers[answer.submit_id] = answer
        await call.done_writing()
        assert await call.read() is grpc.aio.EOF
        assert await call.code() == grpc.StatusCode.OK
    assert set(answers) == {7, 9}
    [one] = answers[7].results
    assert one.enqueue.job_id > 0
    assert not one.HasField("status")
    good, refused, last = answers[9].results
    assert refused.status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "queue" in refused.status.message
    assert good.enqueue.job_id
    assert last.enqueue.job_id
    assert answers[9].log_index >= answers[7].log_index > 0
    assert node.node.submit_stream_requests == 2
    assert node.node.submit_streams == 0  # closed
    assert served(node, "SubmitStream") == 1


async def test_a_request_reusing_an_id_still_out_ends_the_stream_after_the_first_is_answered(
    node: NodeServer,
) -> None:
    async with grpc.aio.insecure_channel(node.address) as channel:
        call = pbg.QueueStub(channel).SubmitStream()
        ops = [_enqueue("q", f"{i}".encode()) for i in range(200)]
        await call.write(pb.SubmitStreamRequest(submit_id=1, ops=ops))
        await call.write(pb.SubmitStreamRequest(submit_id=1, ops=[_enqueue("q", b"again")]))
        answer = await call.read()
        assert isinstance(answer, pb.SubmitStreamResponse)
        assert answer.submit_id == 1
        assert len(answer.results) == 200
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await call.read()
    assert ended.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "submit_id" in (ended.value.details() or "")
    async with Client(node.address) as c:
        [stats] = await c.stats("q")
    assert stats.ready == 200  # the refused request never ran


async def test_the_sdk_sends_its_batches_on_one_stream(node: NodeServer) -> None:
    async with Client(node.address, max_retries=0) as c:
        results = await asyncio.gather(*(c.enqueue("q", f"{i}") for i in range(300)))
        jobs = await c.lease("q", max_jobs=300)
        await asyncio.gather(*(c.ack("q", j.job_id, j.lease_id) for j in jobs))
        assert len({r.job_id for r in results}) == 300
        [streamer] = c._stubs.streamers
        assert streamer.streamed == c.submits
        assert streamer.unary_sent == 0
        assert node.node.submit_streams == 1  # one stream for the client's life
    assert served(node, "Submit") == 0
    assert node.node.submit_stream_requests == c.submits < 600


async def test_stream_submits_off_sends_submit_calls(node: NodeServer) -> None:
    async with Client(node.address, max_retries=0, stream_submits=False) as c:
        await asyncio.gather(*(c.enqueue("q", f"{i}") for i in range(20)))
        assert not c._stubs.streamers
    assert served(node, "Submit") == c.submits
    assert node.node.submit_stream_requests == 0


async def test_a_follower_refuses_the_stream_and_the_sdk_sends_submit_instead(
    tmp_path: Path,
) -> None:
    cluster = Cluster(tmp_path)
    await cluster.start()
    try:
        leader = await cluster.leader()
        follower = next(i for i in cluster.servers if i != leader)
        address = cluster.addresses[follower]
        async with grpc.aio.insecure_channel(address) as channel:
            call = pbg.QueueStub(channel).SubmitStream()
            assert not marked(await call.initial_metadata(), STREAM_OPEN_KEY)  # not taken
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call.read()
        assert isinstance(from_rpc_error(refused.value), NotLeaderError)
        async with Client(address, max_retries=0) as c:
            results = await asyncio.gather(*(c.enqueue("q", f"{i}") for i in range(30)))
            more = await asyncio.gather(*(c.enqueue("q", f"more {i}") for i in range(30)))
            [streamer] = c._stubs.streamers
            assert streamer.streamed == 0  # refused once, then Submit for a while
            [stats] = await c.stats("q", consistent=True)
        assert len({r.job_id for r in (*results, *more)}) == 60
        assert stats.ready == 60  # the refused request ran once, by Submit
        assert served(cluster.servers[follower], "Submit") == c.submits  # forwarded
    finally:
        await cluster.stop()


async def test_a_balancer_carries_the_stream_to_the_leader(tmp_path: Path) -> None:
    async with balanced(tmp_path) as (cluster, balancer):
        leader = cluster.servers[await cluster.leader()]
        async with grpc.aio.insecure_channel(balancer.address) as channel:
            call = pbg.QueueStub(channel).SubmitStream()
            opened = await call.initial_metadata()  # the leader's, passed on, and its address
            assert marked(opened, STREAM_OPEN_KEY)
            assert marked(opened, LEADER_KEY)
            await call.done_writing()
            assert await call.read() is grpc.aio.EOF
        async with Client(balancer.address, look_aside=False, max_retries=0) as c:
            results = await asyncio.gather(*(c.enqueue("q", f"{i}") for i in range(100)))
            [streamer] = c._stubs.streamers
            assert streamer.streamed == c.submits
        assert len({r.job_id for r in results}) == 100
        assert leader.node.submit_stream_requests == c.submits
        assert served(leader, "Submit") == 0


async def test_a_leader_stopped_with_requests_out_loses_no_acknowledged_job(
    tmp_path: Path,
) -> None:
    # Keyed enqueues, sent while the leader stops: each caller either gets
    # its job id (then the job is there, on the new leader) or an error; a
    # retry with the same key never makes a second job.
    cluster = Cluster(tmp_path)
    await cluster.start()
    try:
        first = await cluster.leader()
        async with Client(cluster.addresses[first], max_retries=0, timeout_s=5) as c:
            await c.enqueue("q", b"warm")  # the stream is open

            async def one(i: int) -> int | None:
                try:
                    r = await c.enqueue("q", f"{i}", idempotency_key=f"k{i}")
                except Exception:
                    return None
                return r.job_id

            sent = [asyncio.create_task(one(i)) for i in range(200)]
            await asyncio.sleep(0.01)
            await cluster.stop_node(first)
            outcomes = await asyncio.gather(*sent)
        new = await cluster.leader()
        assert new != first
        async with Client(cluster.addresses[new], max_retries=5) as c:
            again = await asyncio.gather(
                *(c.enqueue("q", f"{i}", idempotency_key=f"k{i}") for i in range(200))
            )
            [stats] = await c.stats("q", consistent=True)
        for i, job_id in enumerate(outcomes):
            if job_id is not None:
                assert again[i].job_id == job_id  # acknowledged: kept, and not made twice
        assert stats.ready == 201
    finally:
        await cluster.stop()


async def test_an_unknown_field_is_refused_and_nothing_is_stored(node: NodeServer) -> None:
    # A job carrying field 999 (varint 1), encoded by hand: JobSpec is field
    # 2 of EnqueueRequest, which is field 1 of Operation.
    job = pb.JobSpec(payload=b"x").SerializeToString() + b"\xb8\x3e\x01"
    enqueue = pb.EnqueueRequest(queue="q").SerializeToString() + _field(2, job)
    raw = _field(1, enqueue)
    strange = pb.Operation.FromString(raw)
    async with grpc.aio.insecure_channel(node.address) as channel:
        call = pbg.QueueStub(channel).SubmitStream()
        await call.write(pb.SubmitStreamRequest(submit_id=1, ops=[strange, _enqueue("q", b"y")]))
        answer = await call.read()
        await call.done_writing()
        assert await call.read() is grpc.aio.EOF
    assert isinstance(answer, pb.SubmitStreamResponse)
    codes = [r.status.code for r in answer.results]
    assert codes == [grpc.StatusCode.INVALID_ARGUMENT.value[0]] * 2  # the request, whole
    assert "#999" in answer.results[0].status.message
    async with Client(node.address) as c:
        assert await c.stats() == []  # not even the queue


async def _write_and_read(call: Any, request: pb.SubmitStreamRequest) -> object:
    await call.write(request)
    return await call.read()


def _field(number: int, data: bytes) -> bytes:
    """A length-delimited protobuf field (numbers under 16, lengths under 128)."""
    assert number < 16
    assert len(data) < 128
    return bytes([number << 3 | 2, len(data)]) + data


async def test_a_request_that_fails_unexpectedly_is_answered_may_have_run(
    node: NodeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = QueueService.run_ops

    async def run_then_fail(self: QueueService, ops: Any, moved: Any = None) -> Any:
        await original(self, ops, moved)
        raise RuntimeError("the store fell over")

    monkeypatch.setattr(QueueService, "run_ops", run_then_fail)
    async with Client(node.address, max_retries=3) as c:
        with pytest.raises(UnavailableError) as failed:
            await c.enqueue("q", b"once")
        assert failed.value.reason == "SUBMIT_FAILED"  # not resent: it may have run
        monkeypatch.undo()
        [stats] = await c.stats("q")
    assert stats.ready == 1


async def test_a_stopping_node_ends_an_idle_stream_rather_than_waiting_it_out(
    node: NodeServer,
) -> None:
    async with Client(node.address) as c:
        await c.enqueue("q", b"x")  # the stream is open, and idle from here
        [streamer] = c._stubs.streamers
        assert streamer.streaming
        await node.stop()
        # The watch ended it NOT_TAKEN (DRAINING): an UNAVAILABLE the node
        # answered, not a stream cancelled when the stop's grace ran out.
        assert served(node, "SubmitStream", "UNAVAILABLE") == 1
        assert served(node, "SubmitStream", "CANCELLED") == 0


async def test_through_a_balancer_a_leader_change_loses_and_doubles_nothing(
    tmp_path: Path,
) -> None:
    # Producers on one client, through the balancer's stream to the leader,
    # while the leader stops (it hands over first). Each enqueue is keyed:
    # one that failed may have run, and is sent again by its caller.
    async with balanced(tmp_path) as (cluster, balancer):
        first = await cluster.leader()
        async with Client(balancer.address, look_aside=False, max_retries=5) as c:
            acked: dict[str, int] = {}
            stop = asyncio.Event()

            async def producer(p: int) -> None:
                i = 0
                while not stop.is_set():
                    key = f"p{p}-{i}"
                    while True:
                        try:
                            r = await c.enqueue("q", key, idempotency_key=key)
                            break
                        except PQueueError:
                            await asyncio.sleep(0.05)
                    acked[key] = r.job_id
                    i += 1

            tasks = [asyncio.create_task(producer(p)) for p in range(8)]
            await asyncio.sleep(0.5)
            await cluster.stop_node(first)
            await asyncio.sleep(1.0)
            stop.set()
            await asyncio.gather(*tasks)
            [stats] = await c.stats("q", consistent=True)
        assert await cluster.leader() != first
        assert len(set(acked.values())) == len(acked)  # one job per key
        assert stats.ready == len(acked)  # every acknowledged job is there, once


async def test_a_balancer_at_its_limit_of_streams_refuses_unrun_and_submit_calls_go(
    tmp_path: Path,
) -> None:
    async with (
        balanced(tmp_path, max_streams=1) as (cluster, balancer),
        grpc.aio.insecure_channel(balancer.address) as channel,
    ):
        leader = cluster.servers[await cluster.leader()]
        held = pbg.QueueStub(channel).SubmitStream()  # the one stream it carries
        await held.write(pb.SubmitStreamRequest(submit_id=1, ops=[_enqueue("other", b"x")]))
        assert isinstance(await held.read(), pb.SubmitStreamResponse)
        async with Client(balancer.address, look_aside=False, max_retries=0) as c:
            results = await asyncio.gather(*(c.enqueue("q", f"{i}") for i in range(20)))
            [streamer] = c._stubs.streamers
            assert streamer.streamed == 0
            assert streamer.unary_sent == c.submits  # each batch by a call, run once
            [stats] = await c.stats("q", consistent=True)
        assert len({r.job_id for r in results}) == 20
        assert stats.ready == 20
        assert leader.node.submit_stream_requests == 1  # the held stream's
        held.cancel()


class Unsaid(grpc.GenericRpcHandler):
    """A server that opens a ``SubmitStream`` without saying it took it (a
    server of another make, or a proxy that does not pass the leader's
    metadata on), reads whatever comes on it, and answers ``Submit`` calls."""

    def __init__(self, *, silent: bool = False) -> None:
        #: Not even initial metadata (a node from before ``pq-stream-open``).
        self.silent = silent
        self.streams = 0
        self.read: list[pb.SubmitStreamRequest] = []
        self.half_closed = asyncio.Event()
        self.submits = 0

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[Any, Any] | None:
        if details.method.endswith("/SubmitStream"):
            return grpc.stream_stream_rpc_method_handler(
                self._stream,
                request_deserializer=pb.SubmitStreamRequest.FromString,
                response_serializer=pb.SubmitStreamResponse.SerializeToString,
            )
        if details.method.endswith("/Submit"):
            return grpc.unary_unary_rpc_method_handler(
                self._submit,
                request_deserializer=pb.SubmitRequest.FromString,
                response_serializer=pb.SubmitResponse.SerializeToString,
            )
        return None

    async def _stream(self, requests: AsyncIterator[pb.SubmitStreamRequest], context: Any) -> None:
        self.streams += 1
        if not self.silent:
            await context.send_initial_metadata((("x-other", "1"),))
        async for request in requests:
            self.read.append(request)  # never answered
        self.half_closed.set()

    async def _submit(self, request: pb.SubmitRequest, context: Any) -> pb.SubmitResponse:
        self.submits += 1
        results = [
            pb.OpResult(enqueue=pb.EnqueueResponse(job_id=self.submits * 1000 + i))
            for i in range(len(request.ops))
        ]
        return pb.SubmitResponse(results=results, log_index=self.submits)


async def test_the_sdk_writes_nothing_on_a_stream_the_server_did_not_say_it_took() -> None:
    # A refusal ends a stream at once; a write racing it would turn its
    # status (nothing ran) into INTERNAL in grpc.aio (grpc/grpc#36066). So
    # the SDK writes only once the server says it took the stream, and a
    # server that never says gets Submit calls instead, and its stream closed.
    fake = Unsaid()
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((fake,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with Client(f"127.0.0.1:{port}", max_retries=0, timeout_s=5) as c:
            first = await c.enqueue("q", b"a")
            await asyncio.wait_for(fake.half_closed.wait(), 5)
            second = await c.enqueue("q", b"b")
            [streamer] = c._stubs.streamers
            assert (streamer.streamed, streamer.unary_sent) == (0, 2)
        assert (first.job_id, second.job_id) == (1000, 2000)
        assert fake.read == []  # nothing written on it
        assert fake.streams == 1  # and not opened again at once
    finally:
        await server.stop(None)


async def _unsaid_server(fake: Unsaid) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((fake,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


async def test_a_stream_never_taken_is_given_up_unwritten_and_calls_go(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(submitstream, "OPEN_WAIT_S", 0.3)
    fake = Unsaid(silent=True)
    server, address = await _unsaid_server(fake)
    try:
        async with Client(address, max_retries=0, timeout_s=5) as c:
            first = await c.enqueue("q", b"a")  # by call, once the wait ran out
            second = await c.enqueue("q", b"b")
            [streamer] = c._stubs.streamers
            assert (streamer.streamed, streamer.unary_sent) == (0, 2)
        assert (first.job_id, second.job_id) == (1000, 2000)
        assert fake.read == []
        assert fake.streams == 1
    finally:
        await server.stop(None)


async def test_a_batch_waits_at_most_half_its_deadline_for_a_stream_to_be_taken(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A deadline shorter than OPEN_WAIT_S: the first batch gives the stream
    # up (never written) in time to go by call; the next go by call too,
    # not each on a new stream that is never taken either.
    fake = Unsaid(silent=True)
    server, address = await _unsaid_server(fake)
    try:
        async with Client(address, max_retries=0, timeout_s=0.6) as c:
            first = await c.enqueue("q", b"a")
            [streamer] = c._stubs.streamers
            assert not streamer.streaming  # given up
            second = await c.enqueue("q", b"b")
            assert (streamer.streamed, streamer.unary_sent) == (0, 2)
        assert (first.job_id, second.job_id) == (1000, 2000)
        assert fake.read == []
        assert fake.streams == 1
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    finally:
        await server.stop(None)
