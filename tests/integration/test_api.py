"""Every RPC over real gRPC, and every error row of docs/semantics.md "Errors"
a node can produce."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from pqueue.client import Client, job_spec
from pqueue.errors import (
    AlreadyExistsError,
    InvalidArgumentError,
    LeaseLostError,
    NotFoundError,
    ResourceExhaustedError,
    UnavailableError,
)
from pqueue.node.server import NodeServer
from pqueue.v1 import queue_pb2 as pb


async def test_enqueue_lease_ack_round_trip(client: Client) -> None:
    r = await client.enqueue("emails", b"hello", priority=3)
    assert r.job_id > 0
    assert not r.duplicate
    [job] = await client.lease("emails", lease_ms=5000, consumer_id="w1")
    assert (job.job_id, job.payload, job.priority, job.attempt) == (r.job_id, b"hello", 3, 1)
    got = await client.get_job("emails", job.job_id)
    assert (got.state, got.consumer_id) == (pb.JOB_STATE_LEASED, "w1")
    await client.ack("emails", job.job_id, job.lease_id)
    [stats] = await client.stats("emails")
    assert (stats.ready, stats.leased, stats.acked_total) == (0, 0, 1)


async def test_priority_zero_is_leased_before_an_earlier_priority_five(client: Client) -> None:
    five = await client.enqueue("q", b"later", priority=5)
    zero = await client.enqueue("q", b"urgent", priority=0)
    jobs = await client.lease("q", max_jobs=2)
    assert [j.job_id for j in jobs] == [zero.job_id, five.job_id]


async def test_enqueue_batch_is_atomic(client: Client) -> None:
    await client.create_queue("q", pb.QueueConfig(max_priority=5))
    ok = await client.enqueue_batch("q", [job_spec(b"a"), job_spec(b"b", priority=5)])
    assert [r.job_id for r in ok] == [1, 2]
    with pytest.raises(InvalidArgumentError) as err:
        await client.enqueue_batch("q", [job_spec(b"c"), job_spec(b"d", priority=6)])
    assert err.value.field == "jobs[1].priority"
    [stats] = await client.stats("q")
    assert stats.ready == 2


async def test_idempotent_enqueue_returns_the_first_job(client: Client) -> None:
    first = await client.enqueue("q", b"x", idempotency_key="order-1")
    again = await client.enqueue("q", b"x", idempotency_key="order-1")
    assert (again.job_id, again.duplicate) == (first.job_id, True)


async def test_nack_extend_and_dead_letters(client: Client) -> None:
    await client.create_queue("q", pb.QueueConfig(max_attempts=2))
    r = await client.enqueue("q", b"x")
    [job] = await client.lease("q")
    ext = await client.extend("q", job.job_id, job.lease_id, 60_000)
    assert ext.lease_expires_at_ms > job.lease_expires_at_ms
    n = await client.nack("q", job.job_id, job.lease_id, delay_ms=0, reason="first")
    assert n.state == pb.JOB_STATE_READY
    [job] = await client.lease("q")
    n = await client.nack("q", job.job_id, job.lease_id, reason="second")
    assert n.state == pb.JOB_STATE_DEAD
    dead = await client.list_dead("q")
    assert [e.reason for e in dead.jobs[0].errors] == ["first", "second"]
    assert await client.redrive("q") == 1
    [job] = await client.lease("q")
    assert (job.job_id, job.attempt) == (r.job_id, 1)
    await client.nack("q", job.job_id, job.lease_id, delay_ms=0)
    [job] = await client.lease("q")
    await client.nack("q", job.job_id, job.lease_id)
    assert await client.delete_dead("q", [r.job_id]) == 1
    assert (await client.list_dead("q")).jobs == []


async def test_queue_admin(client: Client) -> None:
    created = await client.create_queue("q", pb.QueueConfig(aging_interval_ms=500))
    assert created.created
    assert created.config.max_attempts == 5
    assert not (await client.create_queue("q", pb.QueueConfig(aging_interval_ms=500))).created
    await client.enqueue("q", b"1")
    await client.enqueue("q", b"2", delay_ms=60_000)
    [info] = await client.list_queues()
    assert (info.queue, info.stats.ready, info.stats.delayed) == ("q", 1, 1)
    assert await client.purge("q") == 2
    await client.enqueue("q", b"3")
    assert await client.delete_queue("q") == 1
    assert await client.list_queues() == []


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda c: c.enqueue("", b"x"), "queue"),
        (lambda c: c.enqueue("x" * 129, b"x"), "queue"),
        (lambda c: c.enqueue("bad name!", b"x"), "queue"),
        (lambda c: c.enqueue("q", b"x" * ((1 << 20) + 1)), "job.payload"),
        (lambda c: c.enqueue("q", b"x", delay_ms=-5), "job.delay_ms"),
        (lambda c: c.enqueue("q", b"x", group="g" * 300), "job.group"),
        (lambda c: c.enqueue_batch("q", []), "jobs"),
        (lambda c: c.lease("q", wait_ms=60_001), "wait_ms"),
        (lambda c: c.lease("q", max_jobs=1001), "max_jobs"),
        (lambda c: c.ack_many("q", []), "leases"),
        (
            lambda c: c.create_queue("q", pb.QueueConfig(min_priority=3, max_priority=1)),
            "config.min_priority",
        ),
    ],
)
async def test_bad_input_is_invalid_argument_naming_the_field(
    client: Client, call: Callable[[Client], Awaitable[object]], field: str
) -> None:
    with pytest.raises(InvalidArgumentError) as err:
        await call(client)
    assert err.value.field == field
    assert await client.list_queues() == []  # nothing changed


async def test_priority_outside_queue_bounds(client: Client) -> None:
    await client.create_queue("q", pb.QueueConfig(min_priority=0, max_priority=9))
    with pytest.raises(InvalidArgumentError, match="above the queue's max_priority 9") as err:
        await client.enqueue("q", b"x", priority=10)
    assert err.value.field == "job.priority"
    with pytest.raises(InvalidArgumentError, match="below"):
        await client.enqueue("q", b"x", priority=-1)


async def test_unknown_queue_and_job_are_not_found(client: Client) -> None:
    with pytest.raises(NotFoundError):
        await client.lease("nope")
    with pytest.raises(NotFoundError):
        await client.stats("nope")
    with pytest.raises(NotFoundError):
        await client.list_dead("nope")
    await client.enqueue("q", b"x")
    with pytest.raises(NotFoundError):
        await client.get_job("q", 999)
    with pytest.raises(NotFoundError):
        await client.ack("q", 999, 1)


async def test_stale_lease_is_aborted_and_changes_nothing(client: Client) -> None:
    await client.enqueue("q", b"x")
    [job] = await client.lease("q", lease_ms=5000)
    for stale in (
        client.ack("q", job.job_id, job.lease_id + 1),
        client.nack("q", job.job_id, job.lease_id + 1),
        client.extend("q", job.job_id, job.lease_id + 1),
    ):
        with pytest.raises(LeaseLostError):
            await stale
    got = await client.get_job("q", job.job_id)
    assert (got.state, got.attempts, list(got.errors)) == (pb.JOB_STATE_LEASED, 1, [])
    await client.ack("q", job.job_id, job.lease_id)


async def test_create_queue_with_another_config_already_exists(client: Client) -> None:
    await client.create_queue("q", pb.QueueConfig(max_attempts=3))
    with pytest.raises(AlreadyExistsError):
        await client.create_queue("q", pb.QueueConfig(max_attempts=4))


async def test_draining_node_is_unavailable_with_a_retry_hint(
    server: NodeServer, client: Client
) -> None:
    server.node.begin_drain()
    with pytest.raises(UnavailableError) as err:
        await client.enqueue("q", b"x")
    assert err.value.retry_after_s == 1.0


async def test_unreachable_node_is_unavailable() -> None:
    async with Client("127.0.0.1:1", timeout_s=2.0, max_retries=0) as c:
        with pytest.raises(UnavailableError):
            await c.stats()


async def test_raw_grpc_status_carries_bad_request_details(server: NodeServer) -> None:
    from google.rpc import error_details_pb2, status_pb2

    from pqueue.v1 import queue_pb2_grpc as pbg

    async with grpc.aio.insecure_channel(server.address) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await pbg.QueueStub(ch).Enqueue(pb.EnqueueRequest(queue=""))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    trailers = dict(err.value.trailing_metadata() or ())
    status = status_pb2.Status.FromString(trailers["grpc-status-details-bin"])
    bad = error_details_pb2.BadRequest()
    status.details[0].Unpack(bad)
    assert bad.field_violations[0].field == "queue"


async def test_health_and_reflection(server: NodeServer) -> None:
    async with grpc.aio.insecure_channel(server.address) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for service in ("", "pqueue.v1.Queue", "pqueue.v1.Admin"):
            r = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert r.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        req = reflection_pb2.ServerReflectionRequest(list_services="")
        names: set[str] = set()
        async for resp in stub.ServerReflectionInfo(iter([req])):
            names |= {s.name for s in resp.list_services_response.service}
    assert {"pqueue.v1.Queue", "pqueue.v1.Admin", "grpc.health.v1.Health"} <= names


async def test_oversized_message_is_refused_by_grpc_and_the_node_keeps_serving(
    server: NodeServer, client: Client
) -> None:
    from pqueue.core import limits
    from pqueue.v1 import queue_pb2_grpc as pbg

    huge = pb.EnqueueRequest(
        queue="q", job=pb.JobSpec(payload=b"x" * (limits.MAX_PEER_MESSAGE_BYTES + 1))
    )
    options = [("grpc.max_send_message_length", -1)]
    applied = server.node.machine.applied_index
    async with grpc.aio.insecure_channel(server.address, options=options) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await pbg.QueueStub(ch).Enqueue(huge, timeout=30)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert server.node.machine.applied_index == applied  # never reached the log
    assert (await client.enqueue("q", b"fine")).job_id == 1


async def test_a_batch_over_the_client_limit_is_refused_unparsed(client: Client) -> None:
    from pqueue.client import _Stubs
    from pqueue.core import limits

    big = [job_spec(b"x" * (1 << 20)) for _ in range(limits.MAX_MESSAGE_BYTES // (1 << 20) + 2)]
    roomy = Client(client.endpoint, max_retries=0)  # lets a too-big request leave the client
    roomy._stubs = _Stubs(
        grpc.aio.insecure_channel(client.endpoint, options=[("grpc.max_send_message_length", -1)])
    )
    try:
        with pytest.raises(ResourceExhaustedError) as err:
            await roomy.enqueue_batch("q", big)
        assert "may be at most" in str(err.value)
        assert not err.value.retriable  # the same request fails the same way every time
    finally:
        await roomy._stubs.channel.close()
        await roomy.close()
    assert await client.list_queues() == []


async def test_writes_report_the_log_index_that_applied_them(client: Client) -> None:
    first = await client.enqueue("rw", b"a")
    assert first.log_index > 0
    assert client.last_log_index == first.log_index
    [batch] = await client.enqueue_batch("rw", [job_spec(b"b")])
    assert batch.log_index > first.log_index
    [job] = await client.lease("rw", lease_ms=5000)
    extended = await client.extend("rw", job.job_id, job.lease_id, 6000)
    nacked = await client.nack("rw", job.job_id, job.lease_id, delay_ms=0)
    assert batch.log_index < extended.log_index < nacked.log_index
    assert client.last_log_index == nacked.log_index
    # Reads carry it (min_index) and are answered at once where it is applied;
    # consistent and plain reads agree on a node alone.
    got = await client.get_job("rw", job.job_id, consistent=True)
    assert got.attempts == 1
    [stats] = await client.stats("rw")
    assert stats.enqueued_total == 2
    [consistent] = await client.stats("rw", consistent=True)
    assert (consistent.enqueued_total, consistent.nacked_total) == (2, 1)
    dead = await client.list_dead("rw", consistent=True)
    assert list(dead.jobs) == []


async def test_list_queues_waits_for_its_min_index(server: NodeServer, client: Client) -> None:
    await client.create_queue("first")
    ahead = server.node.machine.applied_index + 1  # the next write's index
    client.last_log_index = ahead  # as if this client had made that write
    listing = asyncio.create_task(client.list_queues())
    await asyncio.sleep(0.3)  # the call is at the node, waiting for the index
    assert not listing.done()  # answered at once, it would miss the write below
    await client.create_queue("second")  # index ``ahead``
    names = {q.queue for q in await asyncio.wait_for(listing, 10)}
    assert names == {"first", "second"}
