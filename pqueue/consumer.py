"""The client side of a ``Consume`` stream (the SDK's ``Worker`` uses it).

- ``Credits``: a consumer's slots, each free, promised to the stream (a
  credit granted, no job pushed for it yet) or held (a job in hand). Only
  free slots are granted, so the node never pushes more than the consumer
  can run. Pure.
- ``ConsumeStream``: one stream. ``open`` sends the start with a credit for
  every free slot; ``next_jobs`` returns each batch the node pushes;
  ``settle`` sends an ack, nack or extension on the stream and returns its
  own result. Whatever accumulates while the previous write is pending
  (settles, credits given back by ``refill``) goes out in the next message,
  so a busy consumer sends one message per write, not one per job; and the
  acks of one message for one queue go as one ``Ack`` of all their leases
  (one command for the node, not one per job). Ack is atomic: if the packed
  one is refused (a stale lease), each is sent again alone and answered
  alone, so every caller gets its own ack's result either way.
  A stream that ends fails the settles it did not answer with
  ``StreamEndedError`` (``taken`` says whether they may have applied), and
  its promised credits are forgotten: the node's leases of jobs it pushed
  and nobody received expire, as a lost long poll's do.

Imports only the kernel, the errors and the generated code (an SDK module).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc

from pqueue.batching import MAX_SUBMIT_BYTES, op_bytes
from pqueue.errors import NotTakenError, PQueueError, UnavailableError
from pqueue.v1 import queue_pb2 as pb
from pqueue.v1 import queue_pb2_grpc as pbg
from pqueue.wire.channels import channel_options
from pqueue.wire.sizes import KEEPALIVE_TIMEOUT_MS, MAX_BATCH_JOBS
from pqueue.wire.status import from_rpc_error
from pqueue.wire.tls import Tls, channel

if TYPE_CHECKING:
    from google.protobuf.internal.containers import RepeatedCompositeFieldContainer

logger = logging.getLogger(__name__)

#: Most credits a stream may hold outstanding (the node refuses more).
MAX_CREDITS = 1000

Metadata = tuple[tuple[str, str], ...]


def stream_channel(target: str, tls: Tls | None) -> grpc.aio.Channel:
    """A channel for streams: keepalive pings every 10 s, also while the
    stream is quiet, each answered within 5 s, so a silently dead connection
    (or a frozen node: a look-aside stream goes to the leader itself) ends
    the stream within 15 s (a stream, unlike a call, has no deadline to end
    it)."""
    options = [
        *channel_options(keepalive=True),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.http2.max_pings_without_data", 0),
    ]
    return channel(target, tls, options)


@dataclass
class Credits:
    """A consumer's ``slots``: each free, promised to the stream, or held."""

    slots: int
    #: Jobs in hand (pushed, their handler not finished).
    held: int = 0
    #: Credits granted on the stream and not yet used by a push.
    promised: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.slots <= MAX_CREDITS:
            raise ValueError(f"slots must be 1..{MAX_CREDITS}")

    def grant(self) -> int:
        """Promise every free slot; how many that is (credits to send)."""
        free = max(0, self.slots - self.held - self.promised)
        self.promised += free
        return free

    def pushed(self, n: int) -> int:
        """``n`` jobs arrived: promised slots become held. Returns how many came
        beyond the credits (a node's fault: they are held too, and given back)."""
        beyond = max(0, n - self.promised)
        self.promised -= n - beyond
        self.held += n
        return beyond

    def finished(self) -> None:
        """A held job's handler is done: its slot is free."""
        if self.held <= 0:
            raise ValueError("no job is held")
        self.held -= 1

    def lost(self) -> None:
        """The stream ended: nothing more will be pushed for its credits."""
        self.promised = 0


class StreamEndedError(UnavailableError):
    """A settle the stream did not answer. ``taken``: False when it surely did
    not apply (never sent, or the stream ended NOT_TAKEN), None when it may
    have. Either way the single call may be made instead (a repeated ack or
    nack is refused as stale; a repeated extension extends again)."""

    def __init__(self, message: str, taken: bool | None) -> None:
        super().__init__(message)
        self.taken = taken


class _Settle:
    """One ``settle`` call: its operation, its caller's future, and whether
    it may be packed with other acks (not after a packed ack failed)."""

    __slots__ = ("future", "op", "packable")

    def __init__(self, op: pb.Operation, future: asyncio.Future[pb.OpResult]) -> None:
        self.op = op
        self.future = future
        self.packable = op.HasField("ack")


def _fitting(unsent: Sequence[_Settle]) -> int:
    """How many of ``unsent`` go in one message: at most 1000 operations and
    ``MAX_SUBMIT_BYTES`` of them (acks may carry results), one at least."""
    size = 0
    for n, settle in enumerate(unsent[:MAX_BATCH_JOBS]):
        size += op_bytes(settle.op)
        if n and size > MAX_SUBMIT_BYTES:
            return n
    return min(len(unsent), MAX_BATCH_JOBS)


def pack(settles: Sequence[_Settle]) -> tuple[list[pb.Operation], list[list[_Settle]]]:
    """The operations of one message, and which settles each answers: the
    packable acks of each queue become one ``Ack`` (up to 1000 leases)."""
    ops: list[pb.Operation] = []
    groups: list[list[_Settle]] = []
    #: Per queue: the leases of its packed ``Ack`` (the message's own), and their group.
    packed: dict[str, tuple[RepeatedCompositeFieldContainer[pb.JobLease], list[_Settle]]] = {}
    for settle in settles:
        if not settle.packable:
            ops.append(settle.op)
            groups.append([settle])
            continue
        ack = settle.op.ack
        queue, leases = ack.queue, ack.leases
        into = packed.get(queue)
        if into is None or len(into[0]) + len(leases) > MAX_BATCH_JOBS:
            op = pb.Operation()
            op.ack.queue = queue
            into = (op.ack.leases, [])
            packed[queue] = into
            ops.append(op)
            groups.append(into[1])
        into[0].extend(leases)
        into[1].append(settle)
    return ops, groups


class ConsumeStream:
    """One ``Consume`` stream on ``channel``, for jobs of ``queue``."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        metadata: Metadata,
        queue: str,
        credits: Credits,
        *,
        lease_ms: int = 0,
        consumer_id: str = "",
        on_metadata: Callable[[object], None] | None = None,
    ) -> None:
        self._channel = channel
        #: Given the stream's initial metadata (a balancer names the leader in it).
        self._on_metadata = on_metadata
        self._metadata = metadata
        self.queue = queue
        self.credits = credits
        self.start = pb.ConsumeStart(queue=queue, lease_ms=lease_ms, consumer_id=consumer_id)
        self._call: grpc.aio.StreamStreamCall[pb.ConsumeRequest, pb.ConsumeResponse] | None = None
        self._batches: deque[list[pb.LeasedJob]] = deque()
        self._arrived = asyncio.Event()
        self._unsent: list[_Settle] = []
        self._unsent_credits = 0
        self._answers: dict[int, list[list[_Settle]]] = {}
        self._next_settle_id = 1
        self._dirty = asyncio.Event()
        self._closing = False
        self._woken = False
        self._tasks: list[asyncio.Task[None]] = []
        #: Set once the stream has ended.
        self.ended = asyncio.Event()
        #: Why it ended (None: it ended OK, or has not ended).
        self.error: PQueueError | None = None
        #: Requests written, the operations in them (acks packed), and the
        #: settles answered (for tests and metrics).
        self.requests_sent = 0
        self.ops_sent = 0
        self.settled = 0
        #: Responses read; jobs pushed beyond the credits (a node's fault).
        self.responses = 0
        self.beyond_credits = 0
        #: The highest log index of a lease pushed (read your writes).
        self.last_log_index = 0

    @property
    def ended_unasked(self) -> bool:
        """Ended OK although this side never closed it: a node ends a stream OK
        only after its consumer half-closes, so whatever answered does not
        carry streams (a proxy that takes the call for a unary one)."""
        return self.ended.is_set() and self.error is None and not self._closing

    @property
    def open_for_settles(self) -> bool:
        """Whether ``settle`` may be called (open, not closing, not ended)."""
        return self._call is not None and not self._closing and not self.ended.is_set()

    def open(self) -> None:
        """Start the stream: the start, and a credit for every free slot."""
        if self._call is not None:
            raise RuntimeError("the stream is open already")
        stub = pbg.QueueStub(self._channel)
        self._call = stub.Consume(metadata=self._metadata)
        first = pb.ConsumeRequest(start=self.start, credits=self.credits.grant())
        self._tasks = [
            asyncio.create_task(self._write_loop(first), name="pq-consume-write"),
            asyncio.create_task(self._read_loop(), name="pq-consume-read"),
        ]

    def refill(self) -> None:
        """Grant the free slots (sent with the next message)."""
        if self._closing or self.ended.is_set():
            return
        n = self.credits.grant()
        if n:
            self._unsent_credits += n
            self._dirty.set()

    async def settle(self, op: pb.Operation) -> pb.OpResult:
        """Send ``op`` on the stream; its result. ``StreamEndedError`` if the
        stream ends (or is closing) before it answers."""
        if not self.open_for_settles:
            raise StreamEndedError("the stream is closed", taken=False)
        fut: asyncio.Future[pb.OpResult] = asyncio.get_running_loop().create_future()
        self._unsent.append(_Settle(op, fut))
        self._dirty.set()
        return await fut

    async def next_jobs(self) -> list[pb.LeasedJob]:
        """The next batch of jobs pushed (empty after a ``wake``); once the
        stream ended, its error (``StreamEndedError`` if it ended OK)."""
        while not self._batches:
            if self.ended.is_set():
                raise self.error or StreamEndedError("the stream ended", taken=False)
            if self._woken:
                self._woken = False
                return []
            self._arrived.clear()
            await self._arrived.wait()
        return self._batches.popleft()

    def wake(self) -> None:
        """Make a waiting ``next_jobs`` return (empty, if nothing came)."""
        self._woken = True
        self._arrived.set()

    async def close(self, timeout_s: float) -> list[pb.LeasedJob]:
        """Half-close (what is unsent goes first), wait up to ``timeout_s``
        for the node to answer and end the stream (else cancel it), and
        return the jobs pushed that ``next_jobs`` did not hand out."""
        if self._call is not None and not self.ended.is_set():
            self._closing = True
            self._dirty.set()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_s):
                    await self.ended.wait()
        await self.cancel()
        left = [job for batch in self._batches for job in batch]
        self._batches.clear()
        return left

    async def cancel(self) -> None:
        """End the stream now (the node's leases of pushed jobs expire)."""
        if self._call is not None:
            self._call.cancel()
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks)
        if not self.ended.is_set():
            self._closing = True  # ended by this side
            self._end(StreamEndedError("the stream was cancelled", taken=None))

    async def _write_loop(self, first: pb.ConsumeRequest) -> None:
        call = self._call
        assert call is not None
        try:
            await self._write(call, first)
            while True:
                await self._dirty.wait()
                self._dirty.clear()
                while self._unsent or self._unsent_credits:
                    settles = self._unsent[: _fitting(self._unsent)]
                    del self._unsent[: len(settles)]
                    request = pb.ConsumeRequest(credits=self._unsent_credits)
                    self._unsent_credits = 0
                    if settles:
                        ops, groups = pack(settles)
                        request.settle_id = self._next_settle_id
                        self._next_settle_id += 1
                        request.settle.extend(ops)
                        self._answers[request.settle_id] = groups
                    await self._write(call, request)
                if self._closing:
                    await call.done_writing()
                    return
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError, grpc.aio.UsageError) as exc:
            # The stream ended under the write; the reader learns its status.
            logger.debug("consume stream on %s: write failed: %s", self.queue, exc)

    async def _write(
        self,
        call: grpc.aio.StreamStreamCall[pb.ConsumeRequest, pb.ConsumeResponse],
        request: pb.ConsumeRequest,
    ) -> None:
        await call.write(request)
        self.requests_sent += 1
        self.ops_sent += len(request.settle)

    async def _read_loop(self) -> None:
        call = self._call
        assert call is not None
        error: PQueueError | None = None
        try:
            if self._on_metadata is not None:
                self._on_metadata(await call.initial_metadata())
            while True:
                response = await call.read()
                if response is grpc.aio.EOF:
                    break
                assert isinstance(response, pb.ConsumeResponse)
                self.responses += 1
                if response.jobs:
                    beyond = self.credits.pushed(len(response.jobs))
                    if beyond:
                        self.beyond_credits += beyond
                        logger.error(
                            "consume stream on %s: %d jobs pushed beyond the credits granted",
                            self.queue,
                            beyond,
                        )
                    self._batches.append(list(response.jobs))
                    self.last_log_index = max(self.last_log_index, response.log_index)
                    self._arrived.set()
                if response.settled or response.settle_id:
                    self._answer(response.settle_id, response.settled)
        except grpc.aio.AioRpcError as exc:
            error = from_rpc_error(exc)
        self._end(error)

    def _answer(self, settle_id: int, results: Sequence[pb.OpResult]) -> None:
        groups = self._answers.pop(settle_id, [])
        again: list[_Settle] = []
        for group, result in zip(groups, results, strict=False):
            if len(group) == 1:
                self._resolve(group[0], result)
            elif result.status.code == 0:  # a packed ack: all of its leases acked
                # Each settle's own answer, shared by those of as many leases
                # (a Worker's acks are one lease each): callers only read it.
                answers: dict[int, pb.OpResult] = {}
                for settle in group:
                    n = len(settle.op.ack.leases)
                    answer = answers.get(n)
                    if answer is None:
                        answer = pb.OpResult()
                        answer.ack.acked, answer.ack.log_index = n, result.ack.log_index
                        answers[n] = answer
                    self._resolve(settle, answer)
            else:  # refused as a whole: each alone, for its own answer
                for settle in group:
                    settle.packable = False
                again += group
        for group in groups[len(results) :]:  # a node answering short: not ours to guess
            for settle in group:
                if not settle.future.done():
                    settle.future.set_exception(
                        StreamEndedError("no result for this operation", None)
                    )
        if again:
            self._unsent[:0] = again
            self._dirty.set()

    def _resolve(self, settle: _Settle, result: pb.OpResult) -> None:
        self.settled += 1
        if not settle.future.done():
            settle.future.set_result(result)

    def _end(self, error: PQueueError | None) -> None:
        if self.ended.is_set():
            return
        self.error = error
        self.credits.lost()
        taken = False if isinstance(error, NotTakenError) else None
        why = f"the stream ended: {error.message}" if error else "the stream ended"
        for groups in self._answers.values():
            for group in groups:
                for settle in group:
                    if not settle.future.done():
                        settle.future.set_exception(StreamEndedError(why, taken))
        self._answers.clear()
        for settle in self._unsent:
            if not settle.future.done():
                settle.future.set_exception(StreamEndedError(why, taken=False))
        self._unsent.clear()
        self.ended.set()
        self._arrived.set()
