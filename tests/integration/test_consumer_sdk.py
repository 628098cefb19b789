"""``pqueue.consumer.ConsumeStream``, the SDK's side of a stream, against a real node."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import grpc
import pytest

from pqueue.client import Client
from pqueue.consumer import ConsumeStream, Credits, StreamEndedError
from pqueue.errors import LeaseLostError
from pqueue.node.server import NodeServer
from pqueue.v1 import queue_pb2 as pb
from pqueue.wire.status import from_op_status


@pytest.fixture
async def channel(server: NodeServer) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(server.address) as ch:
        yield ch


def _ack(job: pb.LeasedJob, lease_id: int | None = None) -> pb.Operation:
    lease = pb.JobLease(job_id=job.job_id, lease_id=job.lease_id if lease_id is None else lease_id)
    return pb.Operation(ack=pb.AckRequest(queue="q", leases=[lease]))


async def test_packed_acks_with_a_stale_lease_answer_each_alone(
    client: Client, channel: grpc.aio.Channel
) -> None:
    await client.enqueue_batch("q", [pb.JobSpec(payload=b"%d" % i) for i in range(3)])
    credits = Credits(3)
    stream = ConsumeStream(channel, (), "q", credits)
    stream.open()
    try:
        jobs = await stream.next_jobs()
        assert len(jobs) == 3
        assert (credits.held, credits.promised) == (3, 0)
        a, b, c = jobs
        results = await asyncio.gather(
            stream.settle(_ack(a)), stream.settle(_ack(b, b.lease_id + 7)), stream.settle(_ack(c))
        )
        errors = [from_op_status(r.status) for r in results]
        assert errors[0] is None
        assert errors[2] is None
        assert isinstance(errors[1], LeaseLostError)
        assert (results[0].ack.acked, results[2].ack.acked) == (1, 1)
        # Sent packed once (refused whole: one lease was stale), then one by one.
        assert stream.ops_sent == 1 + 3
        [stats] = await client.stats("q")
        assert (stats.leased, stats.acked_total) == (1, 2)
    finally:
        await stream.close(5.0)


async def test_refill_grants_only_free_slots_and_close_hands_back_what_came(
    server: NodeServer, client: Client, channel: grpc.aio.Channel
) -> None:
    await client.enqueue_batch("q", [pb.JobSpec(payload=b"%d" % i) for i in range(6)])
    credits = Credits(2)
    stream = ConsumeStream(channel, (), "q", credits, lease_ms=60_000)
    stream.open()
    first = await stream.next_jobs()
    assert len(first) == 2
    stream.refill()  # nothing is free: nothing granted
    assert credits.promised == 0
    credits.finished()
    stream.refill()  # one finished: one granted
    assert credits.promised == 1
    await _until(lambda: bool(stream._batches))  # pushed, not handed out
    left = await stream.close(5.0)
    assert [j.payload for j in left] == [b"2"]
    with pytest.raises(StreamEndedError) as ended:
        await stream.settle(_ack(first[0]))
    assert ended.value.taken is False  # never sent: surely not applied
    assert credits.promised == 0  # the closed stream's promises are gone
    await _until(lambda: server.node.consume_streams == 0)


async def _until(check: Callable[[], bool], timeout_s: float = 10) -> None:
    async with asyncio.timeout(timeout_s):
        while True:
            if check():
                return
            await asyncio.sleep(0.01)
