"""The SDK's adaptive batching: concurrent operations packed into ``Submit`` calls.

A ``SubmitBatcher`` sends the operations (enqueue, ack, nack, extend) handed
to it on one channel. It has no timer: the first operation of an idle
batcher goes out at once (on the event loop's next turn, with whatever else
was handed over in the same turn); operations arriving while
``max_in_flight`` Submit calls are out wait and go together in the next
one, at most ``MAX_SUBMIT_OPS`` operations and ``MAX_SUBMIT_BYTES`` per call,
oldest first. The more concurrent callers, the bigger the batches; a lone
caller pays one call per operation, as before.

Each operation's future gets exactly what its single call would give: its
result (an ``OpResult`` with status 0), or the ``PQueueError`` its status
stands for (``from_op_status``), or, when the whole call failed, the error
that call's status stands for (``from_rpc_error``; one new error per
operation, caused by the ``AioRpcError``). A server without ``Submit``
(UNIMPLEMENTED: nothing ran) gives every operation ``NoSubmitError`` and
marks ``SubmitCounts.supported`` false, so the caller sends its single call
instead. Retries and leader redirects are the caller's, per operation
(``pqueue.client.Client``): the batcher sends each operation once.

Operations of one Submit are applied in the order they were handed over.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import grpc

from pqueue.errors import RemoteError
from pqueue.v1 import queue_pb2 as pb
from pqueue.wire.serving import log_failure
from pqueue.wire.sizes import MAX_BATCH_JOBS, MAX_MESSAGE_BYTES
from pqueue.wire.status import from_op_status, from_rpc_error

#: Most operations in one Submit (the server's bound).
MAX_SUBMIT_OPS = MAX_BATCH_JOBS
#: Most encoded bytes of operations in one Submit: well under the message
#: limit, so a batch of large payloads never nears it. An operation bigger
#: than this goes alone, by its single call (``fits``).
MAX_SUBMIT_BYTES = MAX_MESSAGE_BYTES // 8
#: An operation's framing inside a ``SubmitRequest``: its field tag and a
#: length of up to five varint bytes.
FRAMING_BYTES = 6


class NoSubmitError(Exception):
    """The server has no ``Submit`` (UNIMPLEMENTED): nothing ran; send the
    operation by its single call. Not a ``PQueueError``: callers never see it."""


@dataclass
class SubmitCounts:
    """What the batchers of one client did, and whether its server has ``Submit``."""

    #: Submit calls sent (an answered UNIMPLEMENTED included).
    submits: int = 0
    #: Operations in those calls.
    ops: int = 0
    #: False once a server answered UNIMPLEMENTED: single calls from then on.
    supported: bool = True


def op_bytes(op: pb.Operation) -> int:
    """The most ``op`` adds to a ``SubmitRequest``'s encoded size."""
    return op.ByteSize() + FRAMING_BYTES


def fits(size: int) -> bool:
    """Whether an operation of ``size`` (``op_bytes``) may go in a Submit."""
    return size <= MAX_SUBMIT_BYTES


@dataclass
class Pending:
    """One operation waiting for its Submit, and its caller's future."""

    op: pb.Operation
    size: int
    future: asyncio.Future[pb.OpResult] = field(repr=False)


def take(
    pending: deque[Pending], max_ops: int = MAX_SUBMIT_OPS, max_bytes: int = MAX_SUBMIT_BYTES
) -> list[Pending]:
    """The next Submit's operations: the oldest pending ones, at most
    ``max_ops`` and ``max_bytes`` (one at least, if any); those whose caller
    gave up (a done future) are dropped unsent."""
    batch: list[Pending] = []
    size = 0
    while pending and len(batch) < max_ops:
        item = pending[0]
        if item.future.done():
            pending.popleft()
            continue
        if batch and size + item.size > max_bytes:
            break
        pending.popleft()
        batch.append(item)
        size += item.size
    return batch


def _fail(item: Pending, error: BaseException) -> None:
    if not item.future.done():
        item.future.set_exception(error)


class SubmitBatcher:
    """Packs the operations handed to ``submit`` into ``Submit`` calls on one
    channel, with at most ``max_in_flight`` calls out at once."""

    def __init__(
        self,
        send: Callable[[pb.SubmitRequest], Awaitable[pb.SubmitResponse | pb.SubmitStreamResponse]],
        counts: SubmitCounts,
        max_in_flight: int = 1,
    ) -> None:
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be at least 1, got {max_in_flight}")
        self._send_call = send
        self._counts = counts
        self._max_in_flight = max_in_flight
        self._pending: deque[Pending] = deque()
        #: Sender tasks running (each has at most one Submit out).
        self._senders = 0
        #: A sender was started and has not taken its first batch yet.
        self._starting = False
        self._tasks: set[asyncio.Task[None]] = set()

    def submit(self, op: pb.Operation, size: int) -> asyncio.Future[pb.OpResult]:
        """Hand ``op`` (of ``op_bytes`` ``size``) over; its result or error comes
        in the future. Cancelling the future before it is sent drops ``op``."""
        future: asyncio.Future[pb.OpResult] = asyncio.get_running_loop().create_future()
        self._pending.append(Pending(op, size, future))
        if not self._starting and self._senders < self._max_in_flight:
            self._senders += 1
            self._starting = True
            task = asyncio.create_task(self._send_loop(), name="pq-submit")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            task.add_done_callback(log_failure)
        return future

    def cancel_waiting(self) -> None:
        """Cancel the operations not sent yet (the client is closing: its
        calls out are cancelled with the channel, and so are these)."""
        while self._pending:
            self._pending.popleft().future.cancel()

    async def _send_loop(self) -> None:
        """Send batches while operations wait; end when none does."""
        try:
            while batch := self._take():
                await self._send(batch)
        except Exception as exc:  # a bug: fail the waiting callers, and say so (log_failure)
            while self._pending:
                _fail(self._pending.popleft(), exc)
            raise
        finally:
            self._senders -= 1

    def _take(self) -> list[Pending]:
        self._starting = False
        if not self._counts.supported:  # an older server: every waiting one goes single
            while self._pending:
                _fail(self._pending.popleft(), NoSubmitError())
            return []
        return take(self._pending)

    async def _send(self, batch: list[Pending]) -> None:
        """One Submit; every operation's future resolved, whatever happens."""
        self._counts.submits += 1
        self._counts.ops += len(batch)
        try:
            response = await self._send_call(pb.SubmitRequest(ops=[item.op for item in batch]))
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                self._counts.supported = False
                for item in batch:
                    _fail(item, NoSubmitError())
                return
            for item in batch:  # the whole call's error is each one's, as if sent alone
                whole = from_rpc_error(exc)
                whole.__cause__ = exc
                _fail(item, whole)
            return
        except asyncio.CancelledError:
            # The channel closed under the call (its single call is cancelled
            # too), or this task is cancelled: either way, so are the callers.
            for item in batch:
                item.future.cancel()
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            return
        except Exception as exc:  # e.g. a closed channel's UsageError, as the single call raises
            for item in batch:
                _fail(item, exc)
            return
        if len(response.results) != len(batch):
            for item in batch:
                _fail(
                    item,
                    RemoteError(
                        f"Submit answered {len(response.results)} results"
                        f" for {len(batch)} operations",
                        "INTERNAL",
                    ),
                )
            return
        for item, result in zip(batch, response.results, strict=True):
            if item.future.done():
                continue  # its caller gave up while the call was out
            error = from_op_status(result.status)
            if error is None:
                item.future.set_result(result)
            else:
                item.future.set_exception(error)
