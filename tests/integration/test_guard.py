"""``Guard``: services registered on it are served observed and admitted, as
behind the two interceptors: logged, counted, capped, token-checked before
parsing; an unknown method is UNIMPLEMENTED and leaves no trace."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any, cast

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from prometheus_client import CollectorRegistry

from pqueue.errors import UnauthenticatedError
from pqueue.v1 import queue_pb2 as pb
from pqueue.v1 import queue_pb2_grpc as pbg
from pqueue.wire.admission import Admission, AdmissionConfig, request_caps
from pqueue.wire.guard import Guard
from pqueue.wire.observe import GrpcMetrics, Observer, served_methods

STATS_CAP_BYTES = 64


class Tokens:
    """Takes one token."""

    def verify(self, token: str) -> object:
        if token != "good":
            raise UnauthenticatedError("not a token of ours")
        return token


class Stats(pbg.QueueServicer):
    async def Stats(self, request: pb.StatsRequest, context: Any) -> pb.StatsResponse:
        return pb.StatsResponse(queues=[pb.QueueStats(queue=request.queue)])


@pytest.fixture
async def served() -> AsyncIterator[tuple[str, CollectorRegistry]]:
    registry = CollectorRegistry()
    observer = Observer("t1", lambda: address, GrpcMetrics(registry), served_methods(pb.DESCRIPTOR))
    caps = {**request_caps(), "/pqueue.v1.Queue/Stats": STATS_CAP_BYTES}
    guard = Guard(observer, Admission(AdmissionConfig(caps=caps), Tokens()))
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((guard,))
    pbg.add_QueueServicer_to_server(Stats(), cast(grpc.aio.Server, guard))  # type: ignore[abstract]
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, cast(grpc.aio.Server, guard))
    address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    await server.start()
    try:
        yield address, registry
    finally:
        await server.stop(0)


def handled(registry: CollectorRegistry, method: str, code: str) -> float:
    labels = {"service": "pqueue.v1.Queue", "method": method, "code": code}
    return registry.get_sample_value("pq_grpc_server_handled_total", labels) or 0.0


async def test_a_guarded_call_is_admitted_logged_and_counted(
    served: tuple[str, CollectorRegistry], caplog: pytest.LogCaptureFixture
) -> None:
    address, registry = served
    caplog.set_level(logging.INFO, logger="pqueue.requests")
    good = (("authorization", "Bearer good"),)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pbg.QueueStub(channel)
        answer = await stub.Stats(pb.StatsRequest(queue="q"), metadata=good)
        assert answer.queues[0].queue == "q"
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Stats(pb.StatsRequest(queue="q"))
        assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.aio.AioRpcError) as big:
            await stub.Stats(pb.StatsRequest(queue="q" * STATS_CAP_BYTES), metadata=good)
        assert big.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        unknown: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
            "/pqueue.v1.Queue/Nothing"
        )
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await unknown(b"", metadata=good)
        assert missing.value.code() is grpc.StatusCode.UNIMPLEMENTED
        health = health_pb2_grpc.HealthStub(channel)
        check = await health.Check(health_pb2.HealthCheckRequest())
        assert check.status == health_pb2.HealthCheckResponse.SERVING
    received = [r for r in caplog.records if r.getMessage().startswith("Received Stats")]
    assert len(received) == 3  # every call of the method, refused ones too
    assert all(getattr(r, "route", "") == "t1/pqueue.v1.Queue/Stats" for r in received)
    assert [handled(registry, "Stats", code) for code in ("OK", "UNAUTHENTICATED")] == [1, 1]
    assert handled(registry, "Stats", "RESOURCE_EXHAUSTED") == 1
    assert not [r for r in caplog.records if "Nothing" in r.getMessage()]
