"""``Submit``: independent operations in one call, each with its own result."""

from __future__ import annotations

import grpc
import pytest

from pqueue.client import Client
from pqueue.errors import InvalidArgumentError, LeaseLostError, NotFoundError
from pqueue.node.server import NodeServer
from pqueue.v1 import queue_pb2 as pb
from pqueue.v1 import queue_pb2_grpc as pbg
from pqueue.wire.status import from_op_status


def _enqueue(queue: str, payload: bytes, priority: int = 0) -> pb.Operation:
    return pb.Operation(
        enqueue=pb.EnqueueRequest(queue=queue, job=pb.JobSpec(payload=payload, priority=priority))
    )


async def test_each_operation_answers_alone(server: NodeServer, client: Client) -> None:
    await client.create_queue("q", pb.QueueConfig(min_priority=0, max_priority=9))
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = pbg.QueueStub(channel)
        resp = await stub.Submit(
            pb.SubmitRequest(
                ops=[
                    _enqueue("q", b"a"),
                    _enqueue("q", b"bad", priority=99),  # out of the queue's bounds
                    _enqueue("q", b"b", priority=1),
                    pb.Operation(ack=pb.AckRequest(queue="q", leases=[pb.JobLease(job_id=1)])),
                    pb.Operation(),  # no operation at all
                ]
            )
        )
    assert [r.status.code for r in resp.results] == [0, 3, 0, 10, 3]
    first, bad, second, stale, empty = resp.results
    assert first.enqueue.job_id
    assert second.enqueue.job_id == first.enqueue.job_id + 1
    assert first.enqueue.log_index <= second.enqueue.log_index == resp.log_index
    assert isinstance(from_op_status(bad.status), InvalidArgumentError)
    # The very error the single call gives, field named as it names it.
    with pytest.raises(InvalidArgumentError) as single:
        await client.enqueue("q", b"bad", priority=99)
    err = from_op_status(bad.status)
    assert isinstance(err, InvalidArgumentError)
    assert (err.field, err.reason) == (single.value.field, single.value.reason)
    assert err.field == "job.priority"  # the single call's field, not the machine's jobs[0]
    assert isinstance(from_op_status(stale.status), LeaseLostError)
    assert from_op_status(empty.status) is not None
    assert from_op_status(first.status) is None
    # The good jobs went in, in order; the bad one did not.
    jobs = await client.lease("q", max_jobs=10)
    assert [j.payload for j in jobs] == [b"a", b"b"]


async def test_settles_leases_of_several_queues(server: NodeServer, client: Client) -> None:
    for q in ("x", "y"):
        await client.enqueue(q, q)
    x = (await client.lease("x"))[0]
    y = (await client.lease("y"))[0]
    async with grpc.aio.insecure_channel(server.address) as channel:
        resp = await pbg.QueueStub(channel).Submit(
            pb.SubmitRequest(
                ops=[
                    pb.Operation(
                        ack=pb.AckRequest(
                            queue="x", leases=[pb.JobLease(job_id=x.job_id, lease_id=x.lease_id)]
                        )
                    ),
                    pb.Operation(
                        nack=pb.NackRequest(
                            queue="y", job_id=y.job_id, lease_id=y.lease_id, delay_ms=0
                        )
                    ),
                    pb.Operation(extend=pb.ExtendLeaseRequest(queue="nope", job_id=1, lease_id=1)),
                ]
            )
        )
    assert resp.results[0].ack.acked == 1
    assert resp.results[1].nack.state == pb.JOB_STATE_READY
    assert isinstance(from_op_status(resp.results[2].status), NotFoundError)
    (stats_x,) = await client.stats("x")
    assert stats_x.acked_total == 1


async def test_bounds_the_call(server: NodeServer) -> None:
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = pbg.QueueStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as empty:
            await stub.Submit(pb.SubmitRequest())
        assert empty.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.aio.AioRpcError) as many:
            await stub.Submit(pb.SubmitRequest(ops=[_enqueue("q", b"x")] * 1001))
        assert many.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_admin_writes_carry_their_log_index_so_reads_see_them(client: Client) -> None:
    # A queue created through a balancer must be visible to the next read,
    # whichever node serves it: the SDK sends the create's index as min_index.
    created = await client.create_queue("fresh")
    assert created.log_index > 0
    assert client.last_log_index == created.log_index
    purged = await client._call(lambda s: s.admin.PurgeQueue, pb.PurgeQueueRequest(queue="fresh"))
    assert purged.log_index > created.log_index
    (stats,) = await client.stats("fresh")
    assert stats.queue == "fresh"
