"""The proxy's resend rules and passthrough, against scripted backends.

A real node cannot be made to answer "unavailable" or "not leader" on cue,
so these backends are small gRPC servers that speak the node's probe and
health protocol truthfully and answer ``Queue`` calls from a script,
recording what reached them. Everything between client and backend is the
real balancer over real gRPC.

The plain proxy's rules are checked with coalescing off; the same rules for
single calls that ride in a ``Submit`` (``balancer.coalesce``) with it on:
the fake answers each operation of a ``Submit`` from ``op_script``.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from balancer.config import BalancerConfig
from balancer.pool import PoolConfig
from balancer.proxy import MAX_SENDS
from balancer.server import BalancerServer
from pqueue.client import Client
from pqueue.errors import (
    InvalidArgumentError,
    NotFoundError,
    NotLeaderError,
    NotTakenError,
    PQueueError,
    ResourceExhaustedError,
    UnavailableError,
)
from pqueue.v1 import queue_pb2 as pb
from pqueue.v1 import queue_pb2_grpc as pbg
from pqueue.wire.status import from_rpc_error, to_op_status, to_status

Context = grpc.aio.ServicerContext[Any, Any]


@dataclass
class Seen:
    method: str
    metadata: dict[str, str | bytes]
    time_remaining: float | None


@dataclass
class FakeNode:
    node_id: int
    leader: bool
    ballot_round: int = 1
    #: What the next Queue calls get: None answers OK, an error aborts (a
    #: bare status code: aborts with it, as a stopping gRPC server does).
    script: deque[PQueueError | grpc.StatusCode | None] = field(default_factory=deque)
    #: What the next operations of a Submit get: None answers OK, an error is its status.
    op_script: deque[PQueueError | None] = field(default_factory=deque)
    #: Whether Submit is served (an older node answers UNIMPLEMENTED).
    serves_submit: bool = True
    #: Whether SubmitStream is taken without a word (a node from before
    #: ``pq-stream-open``); else it is UNIMPLEMENTED.
    silent_submit_stream: bool = False
    #: Messages read on those streams.
    stream_messages: list[bytes] = field(default_factory=list)
    #: How long each Submit takes.
    submit_delay_s: float = 0.0
    seen: list[Seen] = field(default_factory=list)
    #: The operations of each Submit received.
    submits: list[list[pb.Operation]] = field(default_factory=list)
    #: Consume streams open now.
    streams_open: int = 0
    #: Set once a Submit arrived.
    submitted: asyncio.Event = field(default_factory=asyncio.Event)
    cancelled: int = 0
    server: grpc.aio.Server | None = None
    address: str = ""

    async def start(self) -> None:
        server = grpc.aio.server()
        self.port = server.add_insecure_port("127.0.0.1:0")
        self.address = f"127.0.0.1:{self.port}"
        server.add_generic_rpc_handlers((_admin(self),))
        health = HealthServicer()
        await health.set("", health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        server.add_generic_rpc_handlers((_Queue(self),))
        await server.start()
        self.server = server

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(0)

    def calls(self, method: str) -> int:
        return sum(1 for s in self.seen if s.method == method)


def _admin(fake: FakeNode) -> grpc.GenericRpcHandler:
    """``Admin.NodeStatus`` only: what the balancer's probes ask."""

    async def node_status(request: pb.NodeStatusRequest, context: Context) -> pb.NodeStatusResponse:
        return pb.NodeStatusResponse(
            node_id=fake.node_id,
            role="leader" if fake.leader else "follower",
            ballot_round=fake.ballot_round,
        )

    handler = grpc.unary_unary_rpc_method_handler(
        node_status,
        request_deserializer=pb.NodeStatusRequest.FromString,
        response_serializer=pb.NodeStatusResponse.SerializeToString,
    )
    return grpc.method_handlers_generic_handler("pqueue.v1.Admin", {"NodeStatus": handler})


class _Queue(grpc.GenericRpcHandler):
    def __init__(self, fake: FakeNode) -> None:
        self.fake = fake

    def service(
        self, details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[bytes, bytes] | None:
        method = details.method
        if method == SUBMIT_STREAM and self.fake.silent_submit_stream:
            return grpc.stream_stream_rpc_method_handler(self.silent)
        if not method.startswith("/pqueue.v1.Queue/") or method == SUBMIT_STREAM:
            return None  # (a stream it does not serve: UNIMPLEMENTED, as an older node)
        if method == CONSUME:
            return grpc.stream_stream_rpc_method_handler(self.consume)

        async def handle(request: bytes, context: Context) -> bytes:
            f = self.fake
            f.seen.append(
                Seen(method, dict(context.invocation_metadata() or ()), context.time_remaining())
            )
            delay_s = f.submit_delay_s  # as it was when the call came
            if method == SUBMIT:
                if not f.serves_submit:
                    await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")
                f.submits.append(list(pb.SubmitRequest.FromString(request).ops))
                f.submitted.set()
            outcome = f.script.popleft() if f.script else None
            if isinstance(outcome, PQueueError):
                await context.abort_with_status(to_status(outcome))
            if isinstance(outcome, grpc.StatusCode):
                await context.abort(outcome, outcome.name)
            await context.send_initial_metadata((("x-served-by", str(f.node_id)),))
            context.set_trailing_metadata((("x-trailer", "yes"),))
            if method == SUBMIT:
                return await _submit(f, request, delay_s)
            if method.endswith("/Stall"):
                try:
                    await asyncio.sleep(30)
                except asyncio.CancelledError:
                    f.cancelled += 1
                    raise
            return b""

        return grpc.unary_unary_rpc_method_handler(handle)

    async def silent(self, requests: AsyncIterator[bytes], context: Context) -> None:
        """Takes the stream and says nothing until it ends: no initial
        metadata, no answer (a node from before ``pq-stream-open`` sends
        its initial metadata with its first answer)."""
        self.fake.seen.append(
            Seen(SUBMIT_STREAM, dict(context.invocation_metadata() or ()), context.time_remaining())
        )
        async for message in requests:
            self.fake.stream_messages.append(message)

    async def consume(
        self, requests: AsyncIterator[bytes], context: Context
    ) -> AsyncIterator[bytes]:
        """An echo: ``b"echo:" + m`` for each message ``m``; ``bye`` ends the
        stream OK, ``abort:<text>`` with INVALID_ARGUMENT and a trailer."""
        f = self.fake
        f.seen.append(
            Seen(CONSUME, dict(context.invocation_metadata() or ()), context.time_remaining())
        )
        f.streams_open += 1
        try:
            async for message in requests:
                if message == b"bye":
                    return
                if message.startswith(b"abort:"):
                    await context.abort(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        message[6:].decode(),
                        (("x-why", "asked"),),
                    )
                yield b"echo:" + message
        finally:
            f.streams_open -= 1


async def _submit(f: FakeNode, request: bytes, delay_s: float) -> bytes:
    """Each operation answered from ``op_script``, after ``delay_s``."""
    ops = list(pb.SubmitRequest.FromString(request).ops)
    await asyncio.sleep(delay_s)
    results = []
    for op in ops:
        outcome = f.op_script.popleft() if f.op_script else None
        kind = op.WhichOneof("op")
        assert kind is not None
        if outcome is None:
            response = {"enqueue": pb.EnqueueResponse(job_id=7, log_index=9)}.get(kind)
            result = pb.OpResult()
            getattr(result, kind).SetInParent()
            if response is not None:
                getattr(result, kind).CopyFrom(response)
            results.append(result)
        else:
            results.append(pb.OpResult(status=to_op_status(outcome)))
    return pb.SubmitResponse(results=results, log_index=9).SerializeToString()


@dataclass
class Rig:
    leader: FakeNode
    follower: FakeNode
    balancer: BalancerServer


@pytest.fixture
def options() -> dict[str, Any]:
    """More ``BalancerConfig`` fields for the rig's balancer."""
    return {}


@pytest.fixture
async def rig(coalesce: bool, options: dict[str, Any]) -> AsyncIterator[Rig]:
    leader, follower = FakeNode(1, leader=True), FakeNode(2, leader=False)
    await leader.start()
    await follower.start()
    balancer = BalancerServer(
        BalancerConfig(
            backends=(leader.address, follower.address),
            probe_interval_s=0.1,
            probe_timeout_s=1.0,
            seed=3,
            grace_s=0.2,
            pool=PoolConfig(report_expiry_s=5.0, slow_start_s=0.0),
            coalesce=coalesce,
            **options,
        )
    )
    try:
        await balancer.start()
        pool = balancer.backends.pool
        for _ in range(250):  # both probed, the leader known
            if pool.leader() is not None and not any(b.ejected for b in pool.backends.values()):
                break
            await asyncio.sleep(0.02)
        yield Rig(leader, follower, balancer)
    finally:
        await balancer.stop()
        await leader.stop()
        await follower.stop()


@pytest.fixture
def coalesce() -> bool:
    """The plain proxy's rules: each call alone (tests of coalescing override it)."""
    return False


ENQUEUE = "/pqueue.v1.Queue/Enqueue"
LEASE = "/pqueue.v1.Queue/Lease"
STATS = "/pqueue.v1.Queue/Stats"
SUBMIT = "/pqueue.v1.Queue/Submit"
SUBMIT_STREAM = "/pqueue.v1.Queue/SubmitStream"
CONSUME = "/pqueue.v1.Queue/Consume"


async def test_an_unkeyed_enqueue_that_met_unavailable_is_sent_once(rig: Rig) -> None:
    rig.leader.script.append(UnavailableError("connection reset", retry_after_s=0.3))
    async with Client(rig.balancer.address, max_retries=0, batching=False) as c:
        with pytest.raises(UnavailableError) as err:
            await c.enqueue("q", b"no key")
    assert not isinstance(err.value, NotTakenError)  # its outcome is unknown: said so
    assert err.value.retry_after_s == pytest.approx(0.3)  # RetryInfo came through
    assert rig.leader.calls(ENQUEUE) + rig.follower.calls(ENQUEUE) == 1


async def test_a_keyed_enqueue_that_met_unavailable_is_sent_again(rig: Rig) -> None:
    rig.leader.script.append(UnavailableError("connection reset"))
    async with Client(rig.balancer.address, max_retries=0, batching=False) as c:
        await c.enqueue("q", b"keyed", idempotency_key="k1")
    assert rig.leader.calls(ENQUEUE) == 2  # the probe after the failure said it still leads


async def test_a_call_that_may_have_run_is_never_answered_ran_nowhere_later(rig: Rig) -> None:
    rig.leader.script.append(UnavailableError("connection reset"))  # may have run
    rig.leader.script.extend([NotTakenError("no leader yet")] * (MAX_SENDS - 1))
    async with Client(rig.balancer.address, max_retries=0, batching=False) as c:
        with pytest.raises(UnavailableError) as err:
            await c.enqueue("q", b"keyed", idempotency_key="k4")
    assert not isinstance(err.value, NotTakenError)  # the first send may have applied it
    assert rig.leader.calls(ENQUEUE) == MAX_SENDS


async def test_a_call_the_node_cancelled_is_unavailable_and_resent_only_if_keyed(
    rig: Rig,
) -> None:
    # A node's gRPC server that stops cancels the calls it had not begun:
    # CANCELLED would tell the client it cancelled; it may or may not have run.
    rig.leader.script.append(grpc.StatusCode.CANCELLED)
    async with Client(rig.balancer.address, max_retries=0, batching=False) as c:
        await c.enqueue("q", b"keyed", idempotency_key="k3")
        assert rig.leader.calls(ENQUEUE) == 2  # resent, as after a plain UNAVAILABLE
        rig.leader.script.append(grpc.StatusCode.CANCELLED)
        with pytest.raises(UnavailableError) as err:
            await c.enqueue("q", b"unkeyed")
    assert not isinstance(err.value, NotTakenError)
    assert "node cancelled" in err.value.message
    assert rig.leader.calls(ENQUEUE) == 3  # sent once


async def test_a_lease_that_was_not_taken_is_sent_again(rig: Rig) -> None:
    rig.leader.script.append(NotTakenError("no leader yet", retry_after_s=0.1))
    async with Client(rig.balancer.address, max_retries=0) as c:
        assert await c.lease("q") == []
    assert rig.leader.calls(LEASE) == 2


async def test_not_leader_answers_are_followed_and_never_leak_an_address(rig: Rig) -> None:
    rig.leader.script.extend(
        [NotLeaderError("node 2 leads", "2", rig.follower.address)] * MAX_SENDS
    )
    rig.follower.script.extend(
        [NotLeaderError("node 1 leads", "1", rig.leader.address)] * MAX_SENDS
    )
    async with Client(rig.balancer.address, max_retries=0) as c:
        with pytest.raises(NotTakenError):  # not FAILED_PRECONDITION with a node address
            await c.lease("q")
    assert rig.follower.calls(LEASE) >= 1  # the first hint was taken
    assert rig.leader.calls(LEASE) + rig.follower.calls(LEASE) == MAX_SENDS


async def test_a_call_not_taken_during_a_handover_is_sent_until_a_leader_takes_it(
    rig: Rig,
) -> None:
    # A leader's graceful stop: it refuses writes, then the others have no
    # leader for a moment. A client with no retries of its own sees no error.
    rig.leader.script.append(NotTakenError("node is not accepting writes", retry_after_s=1.0))
    rig.leader.script.extend([NotTakenError("no leader yet", retry_after_s=0.5)] * (MAX_SENDS - 2))
    async with Client(rig.balancer.address, max_retries=0, batching=False) as c:
        await c.enqueue("q", b"through a handover")
    assert rig.leader.calls(ENQUEUE) == MAX_SENDS
    assert rig.balancer.proxy.retries == MAX_SENDS - 1


async def test_a_call_not_taken_at_every_send_fails_after_max_sends(rig: Rig) -> None:
    rig.leader.script.extend([NotTakenError("draining", retry_after_s=0.1)] * MAX_SENDS)
    async with Client(rig.balancer.address, max_retries=0, batching=False) as c:
        with pytest.raises(NotTakenError):
            await c.enqueue("q", b"never taken")
    assert rig.leader.calls(ENQUEUE) == MAX_SENDS


async def test_a_keyed_enqueue_is_resent_once_after_unavailable_even_among_not_taken(
    rig: Rig,
) -> None:
    rig.leader.script.extend(
        [
            NotTakenError("no leader yet"),
            UnavailableError("connection reset"),
            UnavailableError("connection reset"),
        ]
    )
    async with Client(rig.balancer.address, max_retries=0, batching=False) as c:
        with pytest.raises(UnavailableError) as err:
            await c.enqueue("q", b"keyed", idempotency_key="k2")
    assert not isinstance(err.value, NotTakenError)
    assert rig.leader.calls(ENQUEUE) == 3  # ran nowhere, then maybe ran twice: once resent


async def test_the_sdk_resends_any_call_not_taken(rig: Rig) -> None:
    rig.leader.script.extend([NotTakenError("draining", retry_after_s=0.05)] * MAX_SENDS)
    async with Client(rig.balancer.address, max_retries=1) as c:
        assert await c.lease("q") == []  # a lease: no idempotency key, yet safe
        assert c.retries == 1
    assert rig.leader.calls(LEASE) == MAX_SENDS + 1  # the balancer's sends, then the SDK's


async def test_a_read_that_met_unavailable_goes_to_another_node(rig: Rig) -> None:
    for fake in (rig.leader, rig.follower):
        fake.script.append(UnavailableError("gone"))  # whichever is picked first fails
    async with Client(rig.balancer.address, max_retries=0) as c:
        with pytest.raises(UnavailableError):
            await c.stats("q")
    assert (rig.leader.calls(STATS), rig.follower.calls(STATS)) == (1, 1)


async def test_metadata_deadline_and_trailers_pass_through(rig: Rig) -> None:
    async with grpc.aio.insecure_channel(rig.balancer.address) as channel:
        stub = pbg.QueueStub(channel)
        call = stub.Enqueue(
            pb.EnqueueRequest(queue="q"), timeout=4.0, metadata=(("x-request-id", "r-1"),)
        )
        await call
        assert ("x-served-by", "1") in tuple(await call.initial_metadata())
        assert ("x-trailer", "yes") in tuple(await call.trailing_metadata())
        undated = stub.Enqueue(pb.EnqueueRequest(queue="q"))  # no deadline of its own
        await undated
        rig.leader.script.append(UnavailableError("busy", retry_after_s=0.25))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Enqueue(pb.EnqueueRequest(queue="q"), timeout=4.0)
        trailers = dict(err.value.trailing_metadata() or ())
        assert trailers["grpc-retry-pushback-ms"] == "250"
        assert "grpc-status-details-bin" in trailers
    first, second = rig.leader.seen[0], rig.leader.seen[1]
    assert first.metadata["x-request-id"] == "r-1"
    assert first.metadata["pq-forwarded-by"] == "balancer"  # so the node will not forward
    assert first.time_remaining is not None
    assert 0 < first.time_remaining <= 4.1  # the caller's (grpc-timeout rounds up a little)
    assert second.time_remaining is not None
    assert 60 < second.time_remaining <= 76.0  # never unbounded: 75 s


async def test_a_client_that_goes_away_cancels_the_call_on_the_node(rig: Rig) -> None:
    async with grpc.aio.insecure_channel(rig.balancer.address) as channel:
        stall: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
            "/pqueue.v1.Queue/Stall"  # an unknown method: leader route, passed on as is
        )
        call = stall(b"")
        for _ in range(250):
            if rig.leader.calls("/pqueue.v1.Queue/Stall"):
                break
            await asyncio.sleep(0.02)
        call.cancel()
    for _ in range(100):
        if rig.leader.cancelled:
            break
        await asyncio.sleep(0.02)
    assert rig.leader.cancelled == 1


async def test_the_balancer_is_not_serving_with_no_backend_up(rig: Rig) -> None:
    async with grpc.aio.insecure_channel(rig.balancer.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)

        async def status() -> int:
            reply = await health.Check(health_pb2.HealthCheckRequest())
            return int(reply.status)

        for _ in range(100):
            if await status() == health_pb2.HealthCheckResponse.SERVING:
                break
            await asyncio.sleep(0.02)
        assert await status() == health_pb2.HealthCheckResponse.SERVING
        await rig.leader.stop()
        await rig.follower.stop()
        for _ in range(100):  # their health streams break: ejected, and then it says so
            if await status() == health_pb2.HealthCheckResponse.NOT_SERVING:
                break
            await asyncio.sleep(0.02)
        assert await status() == health_pb2.HealthCheckResponse.NOT_SERVING
        async with Client(rig.balancer.address, max_retries=0, timeout_s=1.0) as c:
            with pytest.raises(NotTakenError):  # nothing to send it to: it ran nowhere
                await c.stats("q")


# ---------------------------------------------------------------- coalesced


async def single(rig: Rig, name: str, request: Any, timeout_s: float = 5.0) -> Any:
    """One single call through the balancer, as any client sends it (a raw stub:
    the SDK may pack its own calls into a Submit)."""
    async with grpc.aio.insecure_channel(rig.balancer.address) as channel:
        try:
            return await getattr(pbg.QueueStub(channel), name)(request, timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from exc


def _enqueue(payload: bytes = b"x", key: str = "") -> pb.EnqueueRequest:
    return pb.EnqueueRequest(queue="q", job=pb.JobSpec(payload=payload, idempotency_key=key))


def _ops(fake: FakeNode) -> list[str]:
    """Each operation the fake received in a Submit, by kind."""
    return [op.WhichOneof("op") or "" for ops in fake.submits for op in ops]


@pytest.mark.parametrize("coalesce", [True])
async def test_a_riding_call_goes_in_a_submit_and_gets_its_own_answer(rig: Rig) -> None:
    assert (await single(rig, "Enqueue", _enqueue())).job_id == 7
    assert (rig.leader.calls(SUBMIT), rig.leader.calls(ENQUEUE)) == (1, 0)
    [[op]] = rig.leader.submits
    assert op.enqueue.job.payload == b"x"  # its bytes, framed, unchanged
    seen = rig.leader.seen[0]
    assert seen.metadata["pq-forwarded-by"] == "balancer"


@pytest.mark.parametrize("coalesce", [True])
async def test_a_riding_unkeyed_enqueue_that_met_unavailable_is_sent_once(rig: Rig) -> None:
    rig.leader.op_script.append(UnavailableError("connection reset", retry_after_s=0.3))
    async with grpc.aio.insecure_channel(rig.balancer.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as raw:
            await pbg.QueueStub(channel).Enqueue(pb.EnqueueRequest(queue="q"), timeout=5)
    # The single call's status: code, message, details and pushback trailers.
    trailers = dict(raw.value.trailing_metadata() or ())
    assert raw.value.code() == grpc.StatusCode.UNAVAILABLE
    assert raw.value.details() == "connection reset"
    assert trailers["grpc-retry-pushback-ms"] == "300"
    single = to_status(UnavailableError("connection reset", retry_after_s=0.3))
    assert (
        trailers["grpc-status-details-bin"]
        == dict(single.trailing_metadata)["grpc-status-details-bin"]
    )
    assert _ops(rig.leader) == ["enqueue"]


@pytest.mark.parametrize("coalesce", [True])
async def test_a_riding_keyed_enqueue_that_met_unavailable_is_sent_again(rig: Rig) -> None:
    rig.leader.op_script.append(UnavailableError("connection reset"))
    await single(rig, "Enqueue", _enqueue(b"keyed", key="k1"))
    assert _ops(rig.leader) == ["enqueue", "enqueue"]


@pytest.mark.parametrize("coalesce", [True])
async def test_a_whole_submit_that_met_unavailable_resends_only_keyed_enqueues(rig: Rig) -> None:
    rig.leader.submit_delay_s = 0.3  # the second and third calls ride together
    first = asyncio.create_task(single(rig, "Enqueue", _enqueue(b"first")))
    await rig.leader.submitted.wait()
    rig.leader.script.append(UnavailableError("connection reset"))  # the second Submit
    rig.leader.submit_delay_s = 0.0
    keyed = asyncio.create_task(single(rig, "Enqueue", _enqueue(b"keyed", key="k")))
    await asyncio.sleep(0.05)  # in this order
    unkeyed = asyncio.create_task(single(rig, "Enqueue", _enqueue(b"unkeyed")))
    await first
    await keyed  # sent again, in a Submit of its own
    with pytest.raises(UnavailableError):
        await unkeyed
    payloads = [[op.enqueue.job.payload for op in ops] for ops in rig.leader.submits]
    assert payloads == [[b"first"], [b"keyed", b"unkeyed"], [b"keyed"]]


@pytest.mark.parametrize("coalesce", [True])
async def test_a_riding_ack_not_taken_is_sent_again(rig: Rig) -> None:
    rig.leader.op_script.append(NotTakenError("draining", retry_after_s=0.1))
    await single(rig, "Ack", pb.AckRequest(queue="q", leases=[pb.JobLease(job_id=1)]))
    assert _ops(rig.leader) == ["ack", "ack"]


@pytest.mark.parametrize("coalesce", [True])
async def test_a_riding_call_told_not_leader_at_every_send_never_leaks_an_address(
    rig: Rig,
) -> None:
    rig.leader.op_script.extend(
        [NotLeaderError("node 2 leads", "2", rig.follower.address)] * MAX_SENDS
    )
    rig.follower.op_script.extend(
        [NotLeaderError("node 1 leads", "1", rig.leader.address)] * MAX_SENDS
    )
    with pytest.raises(NotTakenError):
        await single(rig, "Nack", pb.NackRequest(queue="q", job_id=1, lease_id=2))
    assert _ops(rig.follower)  # the first hint was taken
    assert len(_ops(rig.leader)) + len(_ops(rig.follower)) == MAX_SENDS


@pytest.mark.parametrize("coalesce", [True])
async def test_a_riding_call_not_taken_during_a_handover_is_sent_until_taken(rig: Rig) -> None:
    rig.leader.op_script.extend([NotTakenError("no leader yet")] * (MAX_SENDS - 1))
    await single(rig, "Ack", pb.AckRequest(queue="q", leases=[pb.JobLease(job_id=1)]))
    assert _ops(rig.leader) == ["ack"] * MAX_SENDS


@pytest.mark.parametrize("coalesce", [True])
async def test_an_older_node_without_submit_gets_plain_calls(rig: Rig) -> None:
    rig.leader.serves_submit = False
    assert (await single(rig, "Enqueue", _enqueue())).job_id == 0  # the fake's plain answer
    await single(rig, "ExtendLease", pb.ExtendLeaseRequest(queue="q", job_id=1, lease_id=2))
    # One Submit refused; the call went alone, and so did the next, unasked.
    assert rig.leader.calls(SUBMIT) == 1
    assert (rig.leader.calls(ENQUEUE), rig.leader.calls("/pqueue.v1.Queue/ExtendLease")) == (1, 1)


@pytest.mark.parametrize("coalesce", [True])
async def test_a_submit_refused_whole_sends_each_call_alone(rig: Rig) -> None:
    rig.leader.script.append(InvalidArgumentError("ops[0].enqueue", "unknown field"))
    await single(rig, "Enqueue", _enqueue())  # its own single answer: OK
    assert (rig.leader.calls(SUBMIT), rig.leader.calls(ENQUEUE)) == (1, 1)


@pytest.mark.parametrize("coalesce", [True])
async def test_each_riding_call_keeps_its_own_deadline(rig: Rig) -> None:
    rig.leader.submit_delay_s = 0.6
    async with grpc.aio.insecure_channel(rig.balancer.address) as channel:
        stub = pbg.QueueStub(channel)
        blocker = stub.Enqueue(pb.EnqueueRequest(queue="q"), timeout=10)
        await rig.leader.submitted.wait()
        hasty = stub.Enqueue(pb.EnqueueRequest(queue="hasty"), timeout=0.2)
        patient = stub.Enqueue(pb.EnqueueRequest(queue="patient"), timeout=8)
        with pytest.raises(grpc.aio.AioRpcError) as late:
            await hasty
        assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await blocker
        await patient
    # The hasty call left before the second Submit went: only the patient one
    # rode it, with the patient one's deadline.
    assert [[op.enqueue.queue for op in ops] for ops in rig.leader.submits] == [["q"], ["patient"]]
    second = [s for s in rig.leader.seen if s.method == SUBMIT][1]
    assert second.time_remaining is not None
    assert 6 < second.time_remaining <= 8.1


# ---------------------------------------------------------------- streams


def _consume(channel: grpc.aio.Channel) -> grpc.aio.StreamStreamMultiCallable[bytes, bytes]:
    return channel.stream_stream(CONSUME)


async def _wait(check: Callable[[], bool], what: str) -> None:
    for _ in range(500):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


async def test_a_stream_is_carried_to_the_leader_message_for_message(rig: Rig) -> None:
    async with grpc.aio.insecure_channel(rig.balancer.address) as channel:
        call = _consume(channel)(metadata=(("authorization", "Bearer t"),))
        for m in (b"one", b"", b"\x00three"):
            await call.write(m)
            assert await call.read() == b"echo:" + m  # raw bytes, in order
        await call.write(b"bye")
        await call.done_writing()
        assert await call.read() is grpc.aio.EOF
        assert await call.code() == grpc.StatusCode.OK
    [seen] = [s for s in rig.leader.seen if s.method == CONSUME]
    assert seen.metadata["authorization"] == "Bearer t"
    assert seen.metadata["pq-forwarded-by"] == "balancer"
    assert seen.time_remaining is None  # a consumer's stream gets no deadline it did not set
    assert rig.follower.seen == []
    text = rig.balancer.metrics.registry.get_sample_value
    await _wait(lambda: text("pq_balancer_streams_total", {"end": "ok"}) == 1, "the count")
    assert text("pq_balancer_streams_open") == 0


async def test_a_stream_ends_with_the_leaders_status_and_trailers(rig: Rig) -> None:
    async with grpc.aio.insecure_channel(rig.balancer.address) as channel:
        call = _consume(channel)()
        await call.write(b"x")
        assert await call.read() == b"echo:x"
        await call.write(b"abort:bad start")
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await call.read()
    assert ended.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert ended.value.details() == "bad start"
    assert ("x-why", "asked") in tuple(ended.value.trailing_metadata() or ())


async def test_a_stream_ends_unavailable_when_another_node_leads(rig: Rig) -> None:
    async with grpc.aio.insecure_channel(rig.balancer.address) as channel:
        call = _consume(channel)()
        await call.write(b"x")
        assert await call.read() == b"echo:x"
        # The old leader says nothing (frozen); another claims a higher ballot.
        rig.follower.leader, rig.follower.ballot_round = True, 2
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await asyncio.wait_for(call.read(), 10)
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "another took over" in (ended.value.details() or "")
        await _wait(lambda: rig.leader.streams_open == 0, "the old leader's stream to end")
        # The consumer reconnects: to the new leader.
        again = _consume(channel)()
        await again.write(b"y")
        assert await again.read() == b"echo:y"
        assert rig.follower.streams_open == 1
        again.cancel()


async def test_a_stream_ends_unavailable_when_the_leader_goes(rig: Rig) -> None:
    async with grpc.aio.insecure_channel(rig.balancer.address) as channel:
        call = _consume(channel)()
        await call.write(b"x")
        assert await call.read() == b"echo:x"
        await rig.leader.stop()
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await asyncio.wait_for(call.read(), 10)
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
    error = from_rpc_error(ended.value)  # no node said why: the balancer does
    assert type(error) is UnavailableError, error
    assert error.reason == "NODE_UNREACHABLE"
    assert error.metadata == {"node_address": rig.leader.address}


async def test_a_client_that_leaves_ends_the_leader_stream(rig: Rig) -> None:
    async with grpc.aio.insecure_channel(rig.balancer.address) as channel:
        call = _consume(channel)()
        await call.write(b"x")
        assert await call.read() == b"echo:x"
        call.cancel()
    await _wait(lambda: rig.leader.streams_open == 0, "the leader stream to end")
    text = rig.balancer.metrics.registry.get_sample_value
    await _wait(lambda: text("pq_balancer_streams_open") == 0, "the gauge")


@pytest.mark.parametrize("options", [{"max_streams": 2}])
async def test_streams_are_bounded(rig: Rig) -> None:
    async with grpc.aio.insecure_channel(rig.balancer.address) as channel:
        first, second = _consume(channel)(), _consume(channel)()
        for call in (first, second):
            await call.write(b"x")
            assert await call.read() == b"echo:x"
        third = _consume(channel)()

        async def first_exchange() -> None:
            # The refusal may come before the write is taken, or after it.
            await third.write(b"x")
            await third.read()

        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await first_exchange()
        error = from_rpc_error(refused.value)
        assert isinstance(error, ResourceExhaustedError)
        assert error.retry_after_s > 0
        first.cancel()
        await _wait(lambda: rig.balancer.proxy.streams.open == 1, "a stream to end")
        fourth = _consume(channel)()
        await fourth.write(b"x")
        assert await fourth.read() == b"echo:x"
        second.cancel()
        fourth.cancel()


async def test_a_stopping_balancer_ends_its_streams_at_once(rig: Rig) -> None:
    async with grpc.aio.insecure_channel(rig.balancer.address) as channel:
        call = _consume(channel)()
        await call.write(b"x")
        assert await call.read() == b"echo:x"
        stopping = asyncio.create_task(rig.balancer.stop())
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await asyncio.wait_for(call.read(), 5)
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
        await stopping


def _submit_of(*payloads: bytes, keyed: bool = False) -> pb.SubmitRequest:
    return pb.SubmitRequest(
        ops=[pb.Operation(enqueue=_enqueue(p, key=p.decode() if keyed else "")) for p in payloads]
    )


@pytest.mark.parametrize("coalesce", [True])
async def test_client_submits_ride_together_and_each_gets_its_own_results(rig: Rig) -> None:
    rig.leader.submit_delay_s = 0.3  # the next calls ride together
    first = asyncio.create_task(single(rig, "Enqueue", _enqueue(b"first")))
    await rig.leader.submitted.wait()
    rig.leader.submit_delay_s = 0.0
    # The first Submit's operation, then the next's: a, b, the ack, c.
    rig.leader.op_script.extend([None, None, None, NotFoundError("no such lease"), None])
    two = asyncio.create_task(single(rig, "Submit", _submit_of(b"a", b"b")))
    await asyncio.sleep(0.05)  # in this order
    ack = asyncio.create_task(
        single(rig, "Ack", pb.AckRequest(queue="q", leases=[pb.JobLease(job_id=1)]))
    )
    await asyncio.sleep(0.05)
    one = asyncio.create_task(single(rig, "Submit", _submit_of(b"c")))
    await first
    both, alone = await two, await one
    with pytest.raises(NotFoundError):  # the third operation: the ack's own error
        await ack
    assert [[op.WhichOneof("op") for op in ops] for ops in rig.leader.submits] == [
        ["enqueue"],
        ["enqueue", "enqueue", "ack", "enqueue"],
    ]
    assert [r.enqueue.job_id for r in both.results] == [7, 7]
    assert both.log_index == 9  # its own results' highest
    assert [r.enqueue.job_id for r in alone.results] == [7]


@pytest.mark.parametrize("coalesce", [True])
async def test_a_client_submit_is_resent_after_unavailable_only_if_all_keyed(rig: Rig) -> None:
    rig.leader.submit_delay_s = 0.3
    first = asyncio.create_task(single(rig, "Enqueue", _enqueue(b"first")))
    await rig.leader.submitted.wait()
    rig.leader.script.append(UnavailableError("connection reset"))  # the merged Submit
    rig.leader.submit_delay_s = 0.0
    keyed = asyncio.create_task(single(rig, "Submit", _submit_of(b"k1", b"k2", keyed=True)))
    await asyncio.sleep(0.05)
    mixed = asyncio.create_task(single(rig, "Submit", _submit_of(b"u1")))
    await first
    assert len((await keyed).results) == 2  # sent again, alone
    with pytest.raises(UnavailableError):
        await mixed
    payloads = [[op.enqueue.job.payload for op in ops] for ops in rig.leader.submits]
    assert payloads == [[b"first"], [b"k1", b"k2", b"u1"], [b"k1", b"k2"]]


@pytest.mark.parametrize("coalesce", [True])
async def test_a_client_submit_that_holds_more_than_operations_goes_as_it_is(rig: Rig) -> None:
    async with grpc.aio.insecure_channel(rig.balancer.address) as channel:
        submit: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(SUBMIT)
        odd = _submit_of(b"a").SerializeToString() + b"\x10\x01"  # a field #2 as well
        await submit(odd, timeout=5)
        await submit(b"", timeout=5)  # no operation: the node will say why
    assert rig.leader.calls(SUBMIT) == 2
    assert rig.balancer.metrics.registry.get_sample_value("pq_balancer_coalesced_calls_total") == 0


@pytest.mark.parametrize("coalesce", [True, False])
async def test_a_client_submit_never_hands_back_a_node_address(rig: Rig) -> None:
    # A leader that lost the lead while it held an operation answers that one
    # NOT_LEADER naming the new leader (it never ran). A client of the
    # balancer may not reach that node: as for a single call, it must hear
    # "not taken" and send it again through the balancer, never to the node.
    rig.leader.op_script.append(NotLeaderError("node 2 leads", "2", rig.follower.address))
    async with Client(rig.balancer.address, max_retries=2) as c:
        await c.nack("q", 1, 2)  # the SDK sends it as a Submit of one
    assert rig.leader.calls(SUBMIT) + rig.follower.calls(SUBMIT) == 2  # sent again once
    for seen in (*rig.leader.seen, *rig.follower.seen):
        assert seen.metadata.get("pq-forwarded-by") == "balancer"  # never the node directly


async def test_a_leader_that_never_says_it_took_a_submit_stream_gets_submit_calls(
    rig: Rig,
) -> None:
    # The balancer waits a while for the leader's pq-stream-open, then
    # passes its metadata on without it: the SDK writes nothing on the
    # stream, ends it, and sends its batches by call for a while.
    rig.leader.silent_submit_stream = True
    async with Client(rig.balancer.address, look_aside=False, max_retries=0) as c:
        await c.nack("q", 1, 2)
        await c.nack("q", 1, 2)
        [streamer] = c._stubs.streamers
        assert (streamer.streamed, streamer.unary_sent) == (0, 2)
    assert rig.leader.calls(SUBMIT) == 2
    assert rig.leader.calls(SUBMIT_STREAM) == 1  # not opened again at once
    assert rig.leader.stream_messages == []  # nothing written on it


async def test_a_submit_stream_request_left_unanswered_makes_the_leader_suspect(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    # As a call unanswered for leader_stall_s does: the balancer probes every
    # node fast, so a frozen leader's successor is found (and the stream cut,
    # LEADER_MOVED) within about an election, not a probe interval.
    caplog.set_level(logging.INFO, logger="balancer.streams")
    rig.leader.silent_submit_stream = True
    async with grpc.aio.insecure_channel(rig.balancer.address) as channel:
        call = pbg.QueueStub(channel).SubmitStream()
        await call.initial_metadata()  # once the balancer gave up waiting for the leader's
        op = pb.Operation(enqueue=pb.EnqueueRequest(queue="q", job=pb.JobSpec(payload=b"x")))
        await call.write(pb.SubmitStreamRequest(submit_id=1, ops=[op]))
        await _wait(
            lambda: any("no answer" in r.getMessage() for r in caplog.records), "a suspicion"
        )
        call.cancel()
    assert len(rig.leader.stream_messages) == 1  # it reached the leader, which said nothing


async def test_a_node_that_dies_mid_call_is_named_in_the_unavailable(rig: Rig) -> None:
    # The node never answers: no pqueue server says why, so the balancer
    # does (the call may or may not have run).
    async with grpc.aio.insecure_channel(rig.balancer.address) as channel:
        stall: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
            "/pqueue.v1.Queue/Stall"
        )
        call = stall(b"", timeout=20)
        await _wait(lambda: rig.leader.calls("/pqueue.v1.Queue/Stall") == 1, "the call arrives")
        await rig.leader.stop()
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await call
    error = from_rpc_error(failed.value)
    assert type(error) is UnavailableError, error  # not NOT_TAKEN: it may have run
    assert error.reason == "NODE_UNREACHABLE"
    assert error.metadata == {"node_address": rig.leader.address}
