"""The proxy's resend rules and passthrough, against scripted backends.

A real node cannot be made to answer "unavailable" or "not leader" on cue,
so these backends are small gRPC servers that speak the node's probe and
health protocol truthfully and answer ``Queue`` calls from a script,
recording what reached them. Everything between client and backend is the
real balancer over real gRPC.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from balancer.config import BalancerConfig
from balancer.pool import PoolConfig
from balancer.server import BalancerServer
from pqueue.client import Client
from pqueue.errors import (
    NotLeaderError,
    NotTakenError,
    PQueueError,
    UnavailableError,
)
from pqueue.v1 import queue_pb2 as pb
from pqueue.v1 import queue_pb2_grpc as pbg
from pqueue.wire.status import to_status

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
    #: What the next Queue calls get: None answers OK, an error aborts.
    script: deque[PQueueError | None] = field(default_factory=deque)
    seen: list[Seen] = field(default_factory=list)
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
        if not method.startswith("/pqueue.v1.Queue/"):
            return None

        async def handle(request: bytes, context: Context) -> bytes:
            f = self.fake
            f.seen.append(
                Seen(method, dict(context.invocation_metadata() or ()), context.time_remaining())
            )
            outcome = f.script.popleft() if f.script else None
            if isinstance(outcome, PQueueError):
                await context.abort_with_status(to_status(outcome))
            await context.send_initial_metadata((("x-served-by", str(f.node_id)),))
            context.set_trailing_metadata((("x-trailer", "yes"),))
            if method.endswith("/Stall"):
                try:
                    await asyncio.sleep(30)
                except asyncio.CancelledError:
                    f.cancelled += 1
                    raise
            return b""

        return grpc.unary_unary_rpc_method_handler(handle)


@dataclass
class Rig:
    leader: FakeNode
    follower: FakeNode
    balancer: BalancerServer


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
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


ENQUEUE = "/pqueue.v1.Queue/Enqueue"
LEASE = "/pqueue.v1.Queue/Lease"
STATS = "/pqueue.v1.Queue/Stats"


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


async def test_a_lease_that_was_not_taken_is_sent_again(rig: Rig) -> None:
    rig.leader.script.append(NotTakenError("no leader yet", retry_after_s=0.1))
    async with Client(rig.balancer.address, max_retries=0) as c:
        assert await c.lease("q") == []
    assert rig.leader.calls(LEASE) == 2


async def test_a_not_leader_answer_is_followed_once_and_never_leaks_an_address(rig: Rig) -> None:
    rig.leader.script.append(NotLeaderError("node 2 leads", "2", rig.follower.address))
    rig.follower.script.append(NotLeaderError("node 1 leads", "1", rig.leader.address))
    async with Client(rig.balancer.address, max_retries=0) as c:
        with pytest.raises(NotTakenError):  # not FAILED_PRECONDITION with a node address
            await c.lease("q")
    assert (rig.leader.calls(LEASE), rig.follower.calls(LEASE)) == (1, 1)  # the hint was taken


async def test_the_sdk_resends_any_call_not_taken(rig: Rig) -> None:
    rig.leader.script.extend([NotTakenError("draining"), NotTakenError("draining")])
    async with Client(rig.balancer.address, max_retries=1) as c:
        assert await c.lease("q") == []  # a lease: no idempotency key, yet safe
        assert c.retries == 1
    assert rig.leader.calls(LEASE) == 3  # balancer once, SDK once


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
