"""``pqueue.batching``: how operations are packed into Submit calls, on a
``send`` that answers like a node (each operation's own status), no sockets.
The real thing over gRPC: tests/integration/test_sdk_batching.py."""

from __future__ import annotations

import asyncio
from collections import deque

import grpc
import pytest

from pqueue.batching import (
    FRAMING_BYTES,
    MAX_SUBMIT_BYTES,
    MAX_SUBMIT_OPS,
    NoSubmitError,
    Pending,
    SubmitBatcher,
    SubmitCounts,
    fits,
    op_bytes,
    take,
)
from pqueue.errors import InvalidArgumentError, RemoteError, UnavailableError
from pqueue.v1 import queue_pb2 as pb
from pqueue.wire.sizes import MAX_MESSAGE_BYTES
from pqueue.wire.status import to_op_status, to_status


def enqueue(payload: bytes, queue: str = "q") -> pb.Operation:
    return pb.Operation(enqueue=pb.EnqueueRequest(queue=queue, job=pb.JobSpec(payload=payload)))


class Node:
    """Answers Submit calls as a node does: job ids in order, a bad queue
    name refused alone. Records each call's size; ``gate`` holds answers."""

    def __init__(self) -> None:
        self.calls: list[int] = []
        self.next_id = 1
        self.gate = asyncio.Event()
        self.gate.set()
        self.in_flight = 0
        self.most_in_flight = 0
        self.error: grpc.aio.AioRpcError | None = None

    async def send(self, request: pb.SubmitRequest) -> pb.SubmitResponse:
        self.calls.append(len(request.ops))
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await self.gate.wait()
            if self.error is not None:
                raise self.error
            results = []
            for op in request.ops:
                if op.enqueue.queue == "bad":
                    error = InvalidArgumentError("queue", "bad name")
                    results.append(pb.OpResult(status=to_op_status(error)))
                else:
                    results.append(pb.OpResult(enqueue=pb.EnqueueResponse(job_id=self.next_id)))
                    self.next_id += 1
            return pb.SubmitResponse(results=results)
        finally:
            self.in_flight -= 1


def rpc_error(code: grpc.StatusCode, status: grpc.Status | None = None) -> grpc.aio.AioRpcError:
    trailers = grpc.aio.Metadata(*(status.trailing_metadata if status else ()))
    return grpc.aio.AioRpcError(
        code, grpc.aio.Metadata(), trailers, status.details if status else ""
    )


def test_op_bytes_bounds_the_encoded_request() -> None:
    ops = [enqueue(b"x" * n) for n in (0, 1, 200, 70_000, 3 << 20)]
    request = pb.SubmitRequest(ops=ops)
    assert request.ByteSize() <= sum(op_bytes(op) for op in ops)
    assert all(op_bytes(op) - op.ByteSize() == FRAMING_BYTES for op in ops)
    assert MAX_SUBMIT_BYTES * 4 <= MAX_MESSAGE_BYTES  # well under the server's cap
    assert fits(MAX_SUBMIT_BYTES)
    assert not fits(MAX_SUBMIT_BYTES + 1)


async def test_take_packs_the_oldest_within_the_bounds() -> None:
    loop = asyncio.get_running_loop()

    def item(size: int) -> Pending:
        return Pending(enqueue(b""), size, loop.create_future())

    pending = deque(item(10) for _ in range(MAX_SUBMIT_OPS + 5))
    first = take(pending)
    assert len(first) == MAX_SUBMIT_OPS
    assert len(pending) == 5

    pending = deque([item(60), item(50), item(10)])
    assert [p.size for p in take(pending, max_bytes=100)] == [60]  # 60 + 50 > 100
    assert [p.size for p in take(pending, max_bytes=100)] == [50, 10]

    pending = deque([item(500), item(1)])
    assert [p.size for p in take(pending, max_bytes=100)] == [500]  # one, whatever its size

    gone, kept = item(1), item(2)
    gone.future.cancel()  # its caller gave up before it was sent
    pending = deque([gone, kept])
    assert take(pending) == [kept]
    assert not pending


async def test_an_idle_batcher_sends_at_once_and_busy_ones_pack() -> None:
    node = Node()
    batcher = SubmitBatcher(node.send, SubmitCounts())
    first = await batcher.submit(enqueue(b"a"), 10)
    assert first.enqueue.job_id == 1
    assert node.calls == [1]

    node.gate.clear()  # the next call stays out while more come
    lone = batcher.submit(enqueue(b"b"), 10)
    await asyncio.sleep(0)
    assert node.calls == [1, 1]
    later = [batcher.submit(enqueue(b"c"), 10) for _ in range(5)]
    await asyncio.sleep(0.01)
    assert node.calls == [1, 1]  # nothing else is sent while one is out
    node.gate.set()
    results = await asyncio.gather(lone, *later)
    assert node.calls == [1, 1, 5]
    assert [r.enqueue.job_id for r in results] == [2, 3, 4, 5, 6, 7]  # in call order


@pytest.mark.parametrize("max_in_flight", [1, 2, 3])
async def test_at_most_max_in_flight_calls_are_out(max_in_flight: int) -> None:
    node = Node()
    node.gate.clear()
    batcher = SubmitBatcher(node.send, SubmitCounts(), max_in_flight)
    futures = []
    for _ in range(6):  # one at a time, each in its own turn
        futures.append(batcher.submit(enqueue(b"x"), 10))
        await asyncio.sleep(0)
    await asyncio.sleep(0.01)
    assert node.in_flight == max_in_flight
    node.gate.set()
    await asyncio.gather(*futures)
    assert node.most_in_flight == max_in_flight
    assert sum(node.calls) == 6


async def test_each_operation_gets_its_own_error() -> None:
    node = Node()
    counts = SubmitCounts()
    batcher = SubmitBatcher(node.send, counts)
    futures = [batcher.submit(enqueue(b"x", q), 10) for q in ("q", "bad", "q")]
    outcomes = await asyncio.gather(*futures, return_exceptions=True)
    assert isinstance(outcomes[1], InvalidArgumentError)
    assert (outcomes[1].field, outcomes[1].reason) == ("queue", "bad name")
    assert [o.enqueue.job_id for o in outcomes if isinstance(o, pb.OpResult)] == [1, 2]
    assert (counts.submits, counts.ops) == (1, 3)


async def test_a_whole_call_error_is_each_operations_own_instance() -> None:
    node = Node()
    node.error = rpc_error(
        grpc.StatusCode.UNAVAILABLE, to_status(UnavailableError("gone", retry_after_s=0.5))
    )
    batcher = SubmitBatcher(node.send, SubmitCounts())
    outcomes = await asyncio.gather(
        *(batcher.submit(enqueue(b"x"), 10) for _ in range(3)), return_exceptions=True
    )
    assert all(type(o) is UnavailableError for o in outcomes)
    assert len({id(o) for o in outcomes}) == 3
    assert all(isinstance(o, UnavailableError) and o.retry_after_s == 0.5 for o in outcomes)
    assert all(isinstance(o, BaseException) and o.__cause__ is node.error for o in outcomes)


async def test_unimplemented_sends_every_waiting_operation_to_its_single_call() -> None:
    node = Node()
    node.gate.clear()
    node.error = rpc_error(grpc.StatusCode.UNIMPLEMENTED)
    counts = SubmitCounts()
    batcher = SubmitBatcher(node.send, counts)
    first = batcher.submit(enqueue(b"a"), 10)
    await asyncio.sleep(0)
    waiting = [batcher.submit(enqueue(b"b"), 10) for _ in range(3)]
    node.gate.set()
    outcomes = await asyncio.gather(first, *waiting, return_exceptions=True)
    assert all(isinstance(o, NoSubmitError) for o in outcomes)
    assert not counts.supported
    assert node.calls == [1]  # asked once; the waiting ones were never sent


async def test_a_caller_that_gives_up_leaves_the_others_answered() -> None:
    node = Node()
    node.gate.clear()
    batcher = SubmitBatcher(node.send, SubmitCounts())
    out = batcher.submit(enqueue(b"a"), 10)
    await asyncio.sleep(0)
    unsent, kept = batcher.submit(enqueue(b"b"), 10), batcher.submit(enqueue(b"c"), 10)
    unsent.cancel()
    out.cancel()  # already sent: its answer is dropped
    node.gate.set()
    assert (await kept).enqueue.job_id == 2
    assert node.calls == [1, 1]


async def test_an_answer_of_the_wrong_length_fails_every_operation() -> None:
    async def short(request: pb.SubmitRequest) -> pb.SubmitResponse:
        return pb.SubmitResponse(results=[pb.OpResult()])

    batcher = SubmitBatcher(short, SubmitCounts())
    outcomes = await asyncio.gather(
        batcher.submit(enqueue(b"a"), 10), batcher.submit(enqueue(b"b"), 10), return_exceptions=True
    )
    assert all(isinstance(o, RemoteError) for o in outcomes)


def test_max_in_flight_is_at_least_one() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        SubmitBatcher(Node().send, SubmitCounts(), 0)
