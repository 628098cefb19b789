"""The SDK's batching: concurrent calls on one ``Client`` packed into ``Submit``.

Against real node servers. Where a node cannot be made to answer something
on cue (no ``Submit`` at all, a whole-call UNAVAILABLE, one operation not
taken), a real gRPC server stands in front of a real node and passes every
call through as bytes, except what its script says for ``Submit``: the
client is never touched.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from pqueue.client import Client, SyncClient
from pqueue.errors import (
    DeadlineExceededError,
    InvalidArgumentError,
    LeaseLostError,
    NotLeaderError,
    NotTakenError,
    PQueueError,
    ResourceExhaustedError,
    UnavailableError,
)
from pqueue.node.server import NodeServer, ServerConfig
from pqueue.storage.sqlite import SqliteStorage
from pqueue.v1 import queue_pb2 as pb
from pqueue.wire.keys import FORWARDED_KEY
from pqueue.wire.status import to_op_status, to_status
from tests.inproc import Cluster

Context = grpc.aio.ServicerContext[Any, Any]
SUBMIT = "/pqueue.v1.Queue/Submit"


def served(server: NodeServer, method: str, code: str = "OK") -> int:
    """Calls of ``method`` the node answered with ``code``."""
    value = server.metrics.registry.get_sample_value(
        "pq_grpc_server_handled_total",
        {"service": "pqueue.v1.Queue", "method": method, "code": code},
    )
    return int(value or 0)


def batches(server: NodeServer) -> int:
    """Submit batches the node took: calls, and requests on ``SubmitStream``."""
    return served(server, "Submit") + server.node.submit_stream_requests


# ------------------------------------------------------------ a scripted front


class NotLeaderFor:
    """Script step: pass the Submit on without operation ``index``, and answer
    that one NOT_LEADER naming ``leader`` (as a node that lost the lead while
    it held it does: it never ran)."""

    def __init__(self, index: int, leader: str) -> None:
        self.index = index
        self.leader = leader


class Slow:
    """Script step: pass the Submit on after ``seconds`` (past the client's deadline)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds


Step = PQueueError | NotLeaderFor | Slow | None


class Front(grpc.GenericRpcHandler):
    """Passes every call on to ``target`` as bytes. ``Submit``: UNIMPLEMENTED
    (an older node) when ``has_submit`` is false; else the next script step
    (an error for the whole call, ``NotLeaderFor``, ``Slow``), or passed on."""

    def __init__(self, target: str, *, has_submit: bool = True) -> None:
        self.target = target
        self.has_submit = has_submit
        self.script: deque[Step] = deque()
        #: Submit calls that reached this front (refused ones included).
        self.submits = 0
        #: The requests of those with ``has_submit``.
        self.requests: list[pb.SubmitRequest] = []
        #: Operations of the Submit calls passed on.
        self.ops_passed = 0
        #: Slow Submit calls still to be passed on.
        self.late: set[asyncio.Task[bytes]] = set()
        self.channel: grpc.aio.Channel | None = None

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[Any, Any] | None:
        method = details.method
        if method.endswith("/SubmitStream"):
            return None  # UNIMPLEMENTED: the client sends its Submits as calls, scripted here
        if method == SUBMIT:
            self.submits += 1
            if not self.has_submit:
                return None  # grpc answers UNIMPLEMENTED, as a server without the method
            return grpc.unary_unary_rpc_method_handler(
                self._submit,
                request_deserializer=pb.SubmitRequest.FromString,
                response_serializer=pb.SubmitResponse.SerializeToString,
            )

        async def passed(request: bytes, context: Context) -> bytes:
            return await self._pass(method, request, context)

        return grpc.unary_unary_rpc_method_handler(passed)

    async def _call(self, method: str, request: bytes, timeout_s: float | None) -> bytes:
        assert self.channel is not None
        call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = self.channel.unary_unary(method)
        response: bytes = await call(request, timeout=timeout_s)
        return response

    async def _pass(self, method: str, request: bytes, context: Context) -> bytes:
        try:
            return await self._call(method, request, context.time_remaining())
        except grpc.aio.AioRpcError as exc:
            trailers = tuple(exc.trailing_metadata() or ())
            await context.abort(exc.code(), exc.details() or "", trailers)
            raise  # abort raises

    async def _submit(self, request: pb.SubmitRequest, context: Context) -> pb.SubmitResponse:
        self.requests.append(request)
        step = self.script.popleft() if self.script else None
        if isinstance(step, PQueueError):
            await context.abort_with_status(to_status(step))
        if isinstance(step, Slow):
            # Passed on later in a task of its own: the client's deadline
            # ends this call, not the write it carries.
            self.ops_passed += len(request.ops)
            late = asyncio.create_task(self._late(step.seconds, request.SerializeToString()))
            self.late.add(late)
            return pb.SubmitResponse.FromString(await asyncio.shield(late))
        if isinstance(step, NotLeaderFor):
            kept = [op for i, op in enumerate(request.ops) if i != step.index]
            answer = await self._forward_submit(pb.SubmitRequest(ops=kept), context)
            results = list(answer.results)
            refused = NotLeaderError("node n9 lost the lead", "n1", step.leader)
            results.insert(step.index, pb.OpResult(status=to_op_status(refused)))
            return pb.SubmitResponse(results=results, log_index=answer.log_index)
        return await self._forward_submit(request, context)

    async def _late(self, seconds: float, request: bytes) -> bytes:
        await asyncio.sleep(seconds)
        return await self._call(SUBMIT, request, 10.0)

    async def _forward_submit(
        self, request: pb.SubmitRequest, context: Context
    ) -> pb.SubmitResponse:
        self.ops_passed += len(request.ops)
        raw = await self._pass(SUBMIT, request.SerializeToString(), context)
        return pb.SubmitResponse.FromString(raw)


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[NodeServer]:
    srv = NodeServer(SqliteStorage(tmp_path / "n1"), ServerConfig(listen="127.0.0.1:0"))
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop()


@pytest.fixture
async def front(node: NodeServer) -> AsyncIterator[tuple[Front, str]]:
    """A ``Front`` before ``node`` (with ``Submit``), and its address."""
    async for pair in _front(node, has_submit=True):
        yield pair


@pytest.fixture
async def old_front(node: NodeServer) -> AsyncIterator[tuple[Front, str]]:
    """A ``Front`` before ``node`` that has no ``Submit`` (an older node or balancer)."""
    async for pair in _front(node, has_submit=False):
        yield pair


async def _front(node: NodeServer, *, has_submit: bool) -> AsyncIterator[tuple[Front, str]]:
    handler = Front(node.address, has_submit=has_submit)
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    port = server.add_insecure_port("127.0.0.1:0")
    server.add_generic_rpc_handlers((handler,))
    handler.channel = grpc.aio.insecure_channel(node.address)
    await server.start()
    try:
        yield handler, f"127.0.0.1:{port}"
    finally:
        for late in handler.late:
            late.cancel()
        await asyncio.gather(*handler.late, return_exceptions=True)
        await server.stop(0)
        await handler.channel.close()


# ---------------------------------------------------------------- the basics


async def test_concurrent_enqueues_go_in_far_fewer_submits_and_all_land(node: NodeServer) -> None:
    async with Client(node.address, max_retries=0) as c:
        results = await asyncio.gather(*(c.enqueue("q", f"job {i}") for i in range(300)))
        assert all(isinstance(r, pb.EnqueueResponse) for r in results)
        assert len({r.job_id for r in results}) == 300
        assert all(r.log_index > 0 for r in results)  # each its own answer, read your writes too
        assert c.last_log_index == max(r.log_index for r in results)
        assert c.ops_submitted == 300
        assert c.submits <= 300 // 10
        assert batches(node) == c.submits
        assert served(node, "Submit") == 0  # all on one stream
        assert served(node, "Enqueue") == 0
        [stats] = await c.stats("q")
        assert stats.ready == 300


async def test_a_lone_call_goes_at_once_in_a_submit_of_its_own(node: NodeServer) -> None:
    async with Client(node.address, max_retries=0) as c:
        r = await c.enqueue("q", b"alone")
        assert (c.submits, c.ops_submitted) == (1, 1)  # nothing waited for company
        [job] = await c.lease("q")
        assert job.job_id == r.job_id
        extended = await c.extend("q", job.job_id, job.lease_id, 60_000)
        assert isinstance(extended, pb.ExtendLeaseResponse)
        await c.ack("q", job.job_id, job.lease_id)
        assert (c.submits, c.ops_submitted) == (3, 3)
    assert batches(node) == 3


async def test_batching_off_sends_one_call_per_operation(node: NodeServer) -> None:
    async with Client(node.address, max_retries=0, batching=False) as c:
        await asyncio.gather(*(c.enqueue("q", b"x") for _ in range(5)))
        jobs = await c.lease("q", max_jobs=5)
        await asyncio.gather(*(c.ack("q", j.job_id, j.lease_id) for j in jobs))
        assert c.submits == 0
    assert (served(node, "Enqueue"), served(node, "Ack"), served(node, "Submit")) == (5, 5, 0)


async def test_atomic_batches_stay_single_calls(node: NodeServer) -> None:
    async with Client(node.address, max_retries=0) as c:
        await c.create_queue("q", pb.QueueConfig(max_priority=5))
        with pytest.raises(InvalidArgumentError):
            await c.enqueue_batch("q", [pb.JobSpec(payload=b"a"), pb.JobSpec(priority=6)])
        await c.enqueue_batch("q", [pb.JobSpec(payload=b"a"), pb.JobSpec(payload=b"b")])
        jobs = await c.lease("q", max_jobs=2)
        with pytest.raises(LeaseLostError):  # one stale lease: none acked
            await c.ack_many("q", [(jobs[0].job_id, jobs[0].lease_id), (jobs[1].job_id, 99)])
        assert await c.ack_many("q", [(j.job_id, j.lease_id) for j in jobs]) == 2
        assert c.submits == 0
    assert (served(node, "EnqueueBatch"), served(node, "Ack")) == (1, 1)


async def test_calls_of_one_submit_apply_in_call_order(node: NodeServer) -> None:
    async with Client(node.address, max_retries=0) as c:
        await asyncio.gather(*(c.enqueue("q", f"{i}") for i in range(50)))
        assert c.submits == 1  # all called in the same turn: one Submit
        jobs = await c.lease("q", max_jobs=50)
    assert [j.payload for j in jobs] == [f"{i}".encode() for i in range(50)]


async def test_an_operation_too_big_to_pack_goes_by_its_single_call(node: NodeServer) -> None:
    async with Client(node.address, max_retries=0) as c:
        await c.create_queue("big", pb.QueueConfig(max_payload_bytes=8 << 20))
        big, small = await asyncio.gather(
            c.enqueue("big", b"x" * (5 << 20)), c.enqueue("big", b"small")
        )
        assert big.job_id != small.job_id
        assert (c.submits, c.ops_submitted) == (1, 1)
    assert (served(node, "Enqueue"), batches(node)) == (1, 1)


async def test_closing_cancels_calls_out_and_waiting_as_single_calls_are(
    node: NodeServer,
) -> None:
    c = Client(node.address, max_retries=0)
    await c.enqueue("q", b"first")
    out = [asyncio.ensure_future(c.enqueue("q", b"out")) for _ in range(3)]
    await asyncio.sleep(0)  # their Submit is sent
    waiting = [asyncio.ensure_future(c.enqueue("q", b"waiting")) for _ in range(3)]
    await asyncio.sleep(0)
    await c.close()
    outcomes = await asyncio.gather(*out, *waiting, return_exceptions=True)
    assert all(isinstance(o, asyncio.CancelledError) for o in outcomes)
    await asyncio.sleep(0.05)
    assert not [t for t in asyncio.all_tasks() if t.get_name() == "pq-submit"]


# ------------------------------------------------------------ per-item errors


async def _error_of(call: Any) -> PQueueError:
    try:
        await call
    except PQueueError as exc:
        return exc
    raise AssertionError("the call succeeded")


def same_error(batched: object, single: PQueueError) -> None:
    """The same class, message and fields."""
    assert type(batched) is type(single)
    assert isinstance(batched, PQueueError)
    assert vars(batched) == vars(single)
    assert str(batched) == str(single)


async def test_a_bad_job_among_good_ones_fails_alone_with_its_single_call_error(
    node: NodeServer,
) -> None:
    async with (
        Client(node.address, max_retries=0) as c,
        Client(node.address, max_retries=0, batching=False) as single,
    ):
        await c.create_queue("q", pb.QueueConfig(min_priority=0, max_priority=9))
        calls = [c.enqueue("q", f"good {i}", priority=i % 10) for i in range(20)]
        calls.insert(7, c.enqueue("q", b"bad", priority=99))
        calls.insert(12, c.enqueue("bad name!", b"x"))
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
        assert c.submits < len(calls)
        failed = [o for o in outcomes if isinstance(o, BaseException)]
        assert len(failed) == 2
        same_error(outcomes[7], await _error_of(single.enqueue("q", b"bad", priority=99)))
        same_error(outcomes[12], await _error_of(single.enqueue("bad name!", b"x")))
        assert isinstance(outcomes[7], InvalidArgumentError)
        assert outcomes[7].field.endswith("priority")  # as the single call names it
        [stats] = await c.stats("q")
        assert stats.ready == 20


async def test_a_stale_ack_among_good_settlements_fails_only_its_caller(node: NodeServer) -> None:
    async with (
        Client(node.address, max_retries=0) as c,
        Client(node.address, max_retries=0, batching=False) as single,
    ):
        await asyncio.gather(*(c.enqueue("q", f"{i}") for i in range(12)))
        jobs = await c.lease("q", max_jobs=12, lease_ms=60_000)
        acks, stale, nacked, extended = jobs[:9], jobs[9], jobs[10], jobs[11]
        before = c.submits
        outcomes = await asyncio.gather(
            *(c.ack("q", j.job_id, j.lease_id) for j in acks),
            c.ack("q", stale.job_id, stale.lease_id + 100),
            c.nack("q", nacked.job_id, nacked.lease_id, delay_ms=0, reason="boom"),
            c.extend("q", extended.job_id, extended.lease_id, 30_000),
            return_exceptions=True,
        )
        assert c.submits == before + 1  # twelve calls, one Submit
        assert outcomes[:9] == [None] * 9
        lost = outcomes[9]
        assert isinstance(lost, LeaseLostError)
        assert lost.job_id == stale.job_id
        same_error(lost, await _error_of(single.ack("q", stale.job_id, stale.lease_id + 100)))
        assert isinstance(outcomes[10], pb.NackResponse)
        assert outcomes[10].state == pb.JOB_STATE_READY
        assert isinstance(outcomes[11], pb.ExtendLeaseResponse)
        [stats] = await c.stats("q")
        assert (stats.acked_total, stats.ready, stats.leased) == (9, 1, 2)


# --------------------------------------------- whole-call failures and resends


async def test_a_whole_call_unavailable_resends_only_keyed_enqueues(
    front: tuple[Front, str], node: NodeServer
) -> None:
    handler, address = front
    handler.script.extend([UnavailableError("connection reset", retry_after_s=0.05)] * 2)
    async with Client(address, max_retries=2) as c:
        # Called in one turn: the keyed five in one Submit, the others in
        # another, both refused as a whole.
        outcomes = await asyncio.gather(
            *(c.enqueue("q", f"keyed {i}", idempotency_key=f"k{i}") for i in range(5)),
            *(c.enqueue("q", f"unkeyed {i}") for i in range(5)),
            return_exceptions=True,
        )
        keyed, unkeyed = outcomes[:5], outcomes[5:]
        assert all(isinstance(r, pb.EnqueueResponse) for r in keyed)
        for error in unkeyed:  # it may have run: said so, never sent twice
            assert type(error) is UnavailableError
            assert error.retry_after_s == pytest.approx(0.05)
        assert c.retries == 5  # each keyed one once
        [stats] = await c.stats("q")
    assert stats.ready == 5
    assert handler.ops_passed == 5
    first, second = (
        {bool(op.enqueue.job.idempotency_key) for op in r.ops} for r in handler.requests[:2]
    )
    # Never mixed: a balancer may send a Submit of keyed enqueues again.
    assert [first, second] in ([{True}, {False}], [{False}, {True}])


async def test_a_whole_call_not_taken_or_throttled_resends_everything(
    front: tuple[Front, str],
) -> None:
    handler, address = front
    handler.script.extend(
        [
            NotTakenError("node is draining", retry_after_s=0.05),
            ResourceExhaustedError("tenant t over its rate", retry_after_s=0.05),
        ]
    )
    async with Client(address, max_retries=2) as c:
        # The first Submit carries all ten and is not taken; the resent ones
        # (woken by their own timers, so maybe in more than one Submit) meet
        # the quota's refusal, then go through.
        await asyncio.gather(*(c.enqueue("q", f"{i}") for i in range(10)))
        [stats] = await c.stats("q")
        assert stats.ready == 10
        assert c.retries > 10
    assert handler.submits >= 3
    assert handler.ops_passed == 10  # the refused calls ran nothing; nothing doubled


async def test_retries_stop_at_max_retries_with_the_last_error(front: tuple[Front, str]) -> None:
    handler, address = front
    handler.script.extend([NotTakenError("no leader yet", retry_after_s=0.01)] * 3)
    async with Client(address, max_retries=1) as c:
        outcomes = await asyncio.gather(
            c.enqueue("q", b"a"), c.enqueue("q", b"b"), return_exceptions=True
        )
    assert all(type(o) is NotTakenError for o in outcomes)
    assert handler.submits >= 2
    assert handler.ops_passed == 0


async def test_one_operation_not_taken_by_a_former_leader_goes_to_the_leader_it_names(
    front: tuple[Front, str], node: NodeServer
) -> None:
    handler, address = front
    handler.script.append(NotLeaderFor(3, node.address))
    async with Client(address, max_retries=0) as c:
        results = await asyncio.gather(*(c.enqueue("q", f"{i}") for i in range(8)))
        assert len({r.job_id for r in results}) == 8
        assert list(c._leaders) == [node.address]  # the one redirected went there
        [stats] = await c.stats("q")
    assert stats.ready == 8
    assert handler.ops_passed == 7
    assert batches(node) == 2  # the front's seven, then the redirected one


async def test_a_deadline_on_the_whole_call_resends_only_keyed_enqueues(
    front: tuple[Front, str],
) -> None:
    handler, address = front
    handler.script.extend([Slow(1.0)] * 2)  # applied after the client stopped waiting
    async with Client(address, max_retries=3, timeout_s=0.3) as c:
        await c.create_queue("q")
        outcomes = await asyncio.gather(
            c.enqueue("q", b"keyed", idempotency_key="k"),
            c.enqueue("q", b"unkeyed"),
            c.extend("q", 1, 1),
            return_exceptions=True,
        )
        keyed, unkeyed, extend = outcomes
        assert isinstance(keyed, pb.EnqueueResponse)
        assert type(unkeyed) is DeadlineExceededError
        assert type(extend) is DeadlineExceededError
        assert c.retries == 1
        await asyncio.gather(*handler.late)  # the slow one lands late...
        [stats] = await c.stats("q")
    assert stats.ready == 2  # ...and the keyed job is there once
    assert handler.ops_passed == 4  # keyed twice, unkeyed and the extension once


# ---------------------------------------------------------- an older server


async def test_without_submit_it_falls_back_to_single_calls_for_good(
    old_front: tuple[Front, str], node: NodeServer
) -> None:
    handler, address = old_front
    async with Client(address, max_retries=0) as c:
        first = await asyncio.gather(*(c.enqueue("q", f"{i}") for i in range(30)))
        assert len({r.job_id for r in first}) == 30
        assert (c.submits, handler.submits) == (1, 1)  # asked once, remembered
        await asyncio.gather(*(c.enqueue("q", f"more {i}") for i in range(10)))
        jobs = await c.lease("q", max_jobs=40)
        settled = await asyncio.gather(
            *(c.ack("q", j.job_id, j.lease_id) for j in jobs[:38]),
            c.nack("q", jobs[38].job_id, jobs[38].lease_id, delay_ms=0),
            c.extend("q", jobs[39].job_id, jobs[39].lease_id, 10_000),
            c.ack("q", jobs[0].job_id, jobs[0].lease_id),  # the same lease: one of two wins
            return_exceptions=True,
        )
        assert settled[1:38] == [None] * 37
        assert isinstance(settled[38], pb.NackResponse)
        assert isinstance(settled[39], pb.ExtendLeaseResponse)
        assert sorted(type(o).__name__ for o in (settled[0], settled[40])) == [
            "LeaseLostError",
            "NoneType",
        ]
        with pytest.raises(InvalidArgumentError) as bad:
            await c.enqueue("bad name!", b"x")
        assert bad.value.field == "queue"
        assert (c.submits, handler.submits) == (1, 1)
        [stats] = await c.stats("q")
    assert (stats.acked_total, stats.ready, stats.leased) == (38, 1, 1)  # none lost, none twice
    assert served(node, "Enqueue") == 40
    assert served(node, "Submit") == 0


# ----------------------------------------------------------------- a cluster


async def test_calls_at_a_follower_are_forwarded_and_a_refused_hop_is_redirected(
    tmp_path: Path,
) -> None:
    cluster = Cluster(tmp_path)
    await cluster.start()
    try:
        leader = await cluster.leader()
        follower = next(i for i in cluster.servers if i != leader)
        async with Client(cluster.addresses[follower], max_retries=0) as c:
            results = await asyncio.gather(*(c.enqueue("q", f"{i}") for i in range(40)))
            jobs = await c.lease("q", max_jobs=40)
            await asyncio.gather(*(c.ack("q", j.job_id, j.lease_id) for j in jobs))
            assert c.submits < 80
            assert len({r.job_id for r in results}) == 40
            assert served(cluster.servers[follower], "Submit") == c.submits  # forwarded
        # A follower that may not forward (the call already took its one hop)
        # answers NOT_LEADER naming the leader, and every operation goes there.
        async with Client(cluster.addresses[follower], max_retries=0) as c:
            c._metadata = ((FORWARDED_KEY, "n9"),)
            more = await asyncio.gather(*(c.enqueue("q", f"more {i}") for i in range(20)))
            assert len({r.job_id for r in more}) == 20
            assert c.ops_submitted == 40  # each refused once, then taken by the leader
            assert list(c._leaders) == [cluster.addresses[leader]]
            [stats] = await c.stats("q", consistent=True)
        assert (stats.acked_total, stats.ready) == (40, 20)
    finally:
        await cluster.stop()


# -------------------------------------------------------------- SyncClient


@pytest.fixture
def threaded_node(tmp_path: Path) -> Iterator[str]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    srv = NodeServer(SqliteStorage(tmp_path), ServerConfig(listen="127.0.0.1:0", grace_s=0.5))
    asyncio.run_coroutine_threadsafe(srv.start(), loop).result(10)
    try:
        yield srv.address
    finally:
        asyncio.run_coroutine_threadsafe(srv.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()


def test_a_sync_client_batches_calls_from_several_threads(threaded_node: str) -> None:
    threads, each = 8, 25
    errors: list[BaseException] = []
    ids: list[int] = []
    with SyncClient(threaded_node, max_retries=0) as c:
        start = threading.Barrier(threads)

        def produce(t: int) -> None:
            start.wait()
            try:
                for i in range(each):
                    ids.append(c.enqueue("q", f"{t}/{i}").job_id)
            except BaseException as exc:
                errors.append(exc)

        workers = [threading.Thread(target=produce, args=(t,)) for t in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        assert errors == []
        assert len(set(ids)) == threads * each
        assert c._client.ops_submitted == threads * each
        assert c._client.submits < threads * each  # calls of different threads shared Submits
        assert c.stats("q")[0].ready == threads * each
