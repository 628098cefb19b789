"""``Submit``: independent operations in one call, each with its own result."""

from __future__ import annotations

import grpc
import pytest

from pqueue.client import Client
from pqueue.errors import InvalidArgumentError, LeaseLostError, NotFoundError
from pqueue.node.server import NodeServer
from pqueue.v1 import log_pb2 as logpb
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
    # The call answered OK; each operation is counted with its own outcome.
    counted = {
        (sample.labels["op"], sample.labels["code"]): sample.value
        for family in server.metrics.registry.collect()
        if family.name == "pq_operations"
        for sample in family.samples
        if sample.name == "pq_operations_total"
    }
    assert counted == {
        ("enqueue", "OK"): 2,
        ("enqueue", "INVALID_ARGUMENT"): 2,  # the SDK's single call above is a Submit too
        ("ack", "ABORTED"): 1,
        ("none", "INVALID_ARGUMENT"): 1,
    }


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


async def _entry_at(server: NodeServer, index: int) -> logpb.LogEntry:
    """The log entry at ``index``, as the node's store holds it."""
    state = await server.node.storage.load_acceptor()
    [record] = [r for r in state.records if r.slot == index]
    return logpb.LogEntry.FromString(record.value)


async def test_the_trailing_enqueues_of_one_queue_go_in_as_one_command(
    server: NodeServer, client: Client
) -> None:
    await client.create_queue("q")
    keyed = pb.JobSpec(payload=b"k1", idempotency_key="k")
    ops = [
        pb.Operation(enqueue=pb.EnqueueRequest(queue="other", job=pb.JobSpec(payload=b"o"))),
        _enqueue("q", b"a"),
        pb.Operation(enqueue=pb.EnqueueRequest(queue="q", job=keyed)),
        _enqueue("q", b"b", priority=2),
        pb.Operation(
            enqueue=pb.EnqueueRequest(queue="q", job=pb.JobSpec(payload=b"k2", idempotency_key="k"))
        ),
    ]
    async with grpc.aio.insecure_channel(server.address) as channel:
        resp = await pbg.QueueStub(channel).Submit(pb.SubmitRequest(ops=ops))
    assert [r.status.code for r in resp.results] == [0, 0, 0, 0, 0]
    other, a, k1, b, k2 = (r.enqueue for r in resp.results)
    assert other.job_id == a.job_id - 1
    assert [k1.job_id, b.job_id] == [a.job_id + 1, a.job_id + 2]
    assert (k2.job_id, k2.duplicate, k1.duplicate) == (k1.job_id, True, False)  # as two commands
    assert a.log_index == k1.log_index == b.log_index == k2.log_index == resp.log_index
    entry = await _entry_at(server, resp.log_index)
    enqueues = [c.enqueue for c in entry.commands if c.WhichOneof("kind") == "enqueue"]
    assert [(e.queue, [j.payload for j in e.jobs]) for e in enqueues] == [
        ("other", [b"o"]),  # not of the trailing run: alone
        ("q", [b"a", b"k1", b"b", b"k2"]),  # one command
    ]
    jobs = await client.lease("q", max_jobs=10)
    assert [j.payload for j in jobs] == [b"a", b"k1", b"b"]  # priority 0 first, in order


async def test_a_packed_run_the_machine_refuses_is_answered_one_by_one(
    server: NodeServer, client: Client
) -> None:
    await client.create_queue("q", pb.QueueConfig(min_priority=0, max_priority=9))
    ops = [_enqueue("q", b"a"), _enqueue("q", b"bad", priority=99), _enqueue("q", b"b")]
    async with grpc.aio.insecure_channel(server.address) as channel:
        resp = await pbg.QueueStub(channel).Submit(pb.SubmitRequest(ops=ops))
    # The machine's max_priority check refused the packed command whole; each
    # was proposed again alone and answers as its single call would.
    assert [r.status.code for r in resp.results] == [0, 3, 0]
    err = from_op_status(resp.results[1].status)
    assert isinstance(err, InvalidArgumentError)
    assert err.field == "job.priority"
    first, second = resp.results[0].enqueue, resp.results[2].enqueue
    assert second.job_id == first.job_id + 1  # the refused command took no id
    state = await server.node.storage.load_acceptor()
    tried = [
        r.slot
        for r in state.records
        if any(len(c.enqueue.jobs) == 3 for c in logpb.LogEntry.FromString(r.value).commands)
    ]
    assert len(tried) == 1  # tried packed, once...
    assert tried[0] < first.log_index  # ...before each went in alone
    jobs = await client.lease("q", max_jobs=10)
    assert [j.payload for j in jobs] == [b"a", b"b"]
