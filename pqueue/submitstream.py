"""The SDK's ``Submit`` batches on one open ``SubmitStream``, or by unary ``Submit``.

A ``SubmitStreamer`` is a ``SubmitBatcher``'s way to send (``send``): each
batch goes as one request on a stream it keeps open on its channel, with an
id of its own, and comes back as the response with that id. An open stream
saves the cost of a call per batch at both ends (``bench.hops``: about
165 µs of CPU and, on a busy machine, 0.6-0.7 ms a round trip).

What a caller sees is what a unary ``Submit`` gives it:

- an answered request is the ``Submit``'s answer (per-operation results);
- a request out when the stream breaks gets the stream's error (an
  ``AioRpcError``), which the batcher turns into each operation's error as
  it would a failed call's: a plain UNAVAILABLE may have run. A batch of
  keyed enqueues only (``resendable``) is sent once more by unary
  ``Submit`` then, as a balancer resends such a ``Submit`` itself (the
  stream it carries, it cannot);
- nothing is written on a stream before the server says it took it (its
  initial metadata carries ``pq-stream-open``; a balancer passes the
  leader's on): one refused at once (a follower's NOT_LEADER, a draining
  node's or a full balancer's NOT_TAKEN, an older server's UNIMPLEMENTED)
  is never raced by a write, which in grpc.aio would turn the status into
  INTERNAL (grpc/grpc#36066) and lose that nothing ran. A server that
  does not say so within ``OPEN_WAIT_S``, or half a waiting batch's
  deadline (a node from before), is taken to refuse, and the stream is
  given up unwritten. Its batches, and the next ones for
  ``RETRY_STREAM_S`` (doubling to
  ``MAX_RETRY_STREAM_S`` while refusals go on; ``UNIMPLEMENTED_RETRY_S``
  after UNIMPLEMENTED), go by unary ``Submit`` on the same channel, which
  a follower forwards to the leader;
- a stream the server ends later saying nothing it did not answer ran
  (NOT_LEADER, NOT_TAKEN: its node stopped leading or drains) has each
  unanswered request sent again by unary ``Submit``; so has a request whose
  write failed (it never left: the stream had ended). The next batch opens
  a new stream;
- no answer within ``timeout_s`` (writing the request included):
  DEADLINE_EXCEEDED, as the call's deadline would give (the request may
  still run). A request that could not even be written in that time (the
  server reads nothing: a frozen node) breaks the stream: the others out
  get UNAVAILABLE (may have run), and the next batch opens a new one.

Streams open lazily, on the first batch, and again after one ends. A
balancer carries the stream to the leader (and names the leader in its
initial metadata: ``on_open`` hears it, for look-aside); once the client
sends to the leader directly, the stream through the balancer is
half-closed (``idle``), so it holds none of the balancer's streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Awaitable, Callable
from typing import TypeAlias

import grpc

from pqueue.errors import NotLeaderError, NotTakenError
from pqueue.v1 import queue_pb2 as pb
from pqueue.wire.keys import STREAM_OPEN_KEY, marked
from pqueue.wire.serving import log_failure
from pqueue.wire.status import from_rpc_error

#: After a stream was refused before answering anything: unary ``Submit``
#: for this long, doubling with each refusal in a row up to the most.
RETRY_STREAM_S = 5.0
MAX_RETRY_STREAM_S = 300.0
#: After a stream was answered UNIMPLEMENTED: unary ``Submit`` for this long.
UNIMPLEMENTED_RETRY_S = 600.0
#: How long a new stream waits for its server to say it took it (a
#: batch's own wait: at most half its deadline); past it, the stream is
#: given up unwritten and its batches go by call. (A balancer waits 1 s for
#: the leader's word, ``balancer.streams``.)
OPEN_WAIT_S = 2.0

Answer = pb.SubmitResponse | pb.SubmitStreamResponse
StreamCall: TypeAlias = "grpc.aio.StreamStreamCall[pb.SubmitStreamRequest, pb.SubmitStreamResponse]"
OpenStream = Callable[[], StreamCall]


def _rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details)


class _Open:
    """One stream and the requests out on it."""

    __slots__ = ("answered", "broken", "call", "took", "waiting")

    def __init__(self, call: StreamCall) -> None:
        self.call = call
        #: Whether the server took the stream (its initial metadata said so):
        #: nothing is written before. False: it refused it, or never says.
        self.took: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        #: Requests out, by submit_id.
        self.waiting: dict[int, asyncio.Future[pb.SubmitStreamResponse]] = {}
        #: Whether the server answered any request on it.
        self.answered = False
        #: Why this side cancelled it ("": it did not).
        self.broken = ""

    def nothing_ran(self, exc: grpc.aio.AioRpcError) -> bool:
        """Whether, ended with ``exc``, it ran none of what it did not answer."""
        code = exc.code()
        if code == grpc.StatusCode.UNIMPLEMENTED:
            return True
        return isinstance(from_rpc_error(exc), NotLeaderError | NotTakenError)


class SubmitStreamer:
    """Sends ``Submit`` batches on one stream of a channel (see the module docstring)."""

    def __init__(
        self,
        open_stream: OpenStream,
        unary: Callable[[pb.SubmitRequest], Awaitable[pb.SubmitResponse]],
        timeout_s: float | None,
        on_open: Callable[[object], None] | None = None,
        resendable: bool = False,
    ) -> None:
        self._open_stream = open_stream
        #: Every operation it sends is an enqueue with an idempotency key.
        self._resendable = resendable
        self._unary = unary
        self._timeout_s = timeout_s
        #: How long a batch waits for a new stream to be taken (then by call).
        self._took_wait_s = min(OPEN_WAIT_S, timeout_s / 2) if timeout_s else OPEN_WAIT_S
        self._on_open = on_open
        self._ids = itertools.count(1)
        self._open: _Open | None = None
        self._write = asyncio.Lock()
        #: Unary ``Submit`` until this monotonic time.
        self._unary_until = 0.0
        #: Streams refused before answering anything, in a row.
        self._refusals = 0
        self._closing = False
        #: Its readers and half-closes, held while they run.
        self._tasks: set[asyncio.Task[None]] = set()
        #: Batches answered on a stream, and sent by unary ``Submit`` (tests, metrics).
        self.streamed = 0
        self.unary_sent = 0

    @property
    def streaming(self) -> bool:
        """Whether a stream is open now."""
        return self._open is not None

    async def send(self, request: pb.SubmitRequest) -> Answer:
        """``request``'s answer (raises ``AioRpcError`` as a failed call does)."""
        if time.monotonic() < self._unary_until:
            return await self._send_unary(request)
        submit_id = next(self._ids)
        future: asyncio.Future[pb.SubmitStreamResponse] = asyncio.get_running_loop().create_future()
        stream = self._stream()
        stream.waiting[submit_id] = future
        written = sent = False
        try:
            async with asyncio.timeout(self._timeout_s):
                async with self._write:
                    sent = await self._write_request(stream, submit_id, request)
                written = True
                if sent:
                    answer = await asyncio.shield(future)
        except grpc.aio.AioRpcError as exc:
            if stream.nothing_ran(exc):
                return await self._send_unary(request)  # nothing of it ran
            if self._resendable and exc.code() == grpc.StatusCode.UNAVAILABLE:
                # It may have run, and running it again changes nothing:
                # once more, by a call, as a balancer resends a keyed Submit.
                return await self._send_unary(request)
            raise
        except TimeoutError:
            # Else it waited for the stream: never written.
            taken = stream.took.done() and stream.took.result()
            if not written and not stream.broken:  # the server reads nothing: of no more use
                if not taken:  # as a refusal: by call for a while
                    self._back_off(stream)
                self._break(stream, "a request could not be written in time")
            raise _rpc_error(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                "Deadline Exceeded (no answer on the Submit stream in time)"
                if taken
                else "Deadline Exceeded (the Submit stream was not taken in time; "
                "the request was not sent)",
            ) from None
        finally:
            stream.waiting.pop(submit_id, None)
            if future.done() and not future.cancelled():
                future.exception()  # retrieved (the reader may have failed it meanwhile)
        if not sent:  # it never left: by a call (unless the client closes)
            if self._closing:
                raise asyncio.CancelledError
            return await self._send_unary(request)
        self.streamed += 1
        return answer

    async def _write_request(
        self, stream: _Open, submit_id: int, request: pb.SubmitRequest
    ) -> bool:
        """Write the request on ``stream``; False if it never left (the
        stream had ended or was given up, or gRPC refused the write)."""
        if self._open is not stream or stream.call.done():
            return False
        # Shielded: a writer's timeout must not cancel what every writer
        # waits for. Bounded: not taken by then, it is given up unwritten.
        try:
            took = (
                stream.took.result()
                if stream.took.done()  # (every batch after the first: no timer)
                else await asyncio.wait_for(asyncio.shield(stream.took), self._took_wait_s)
            )
        except TimeoutError:
            if not stream.broken:
                self._back_off(stream)
            self._break(stream, "the server did not say in time that it took the stream")
            return False
        if not took:
            return False
        try:
            await stream.call.write(pb.SubmitStreamRequest(submit_id=submit_id, ops=request.ops))
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            # A write to a call that ended (the server's status came first;
            # gRPC may even mark the call INTERNAL then: grpc/grpc#36066).
            return False
        return True

    async def _send_unary(self, request: pb.SubmitRequest) -> pb.SubmitResponse:
        self.unary_sent += 1
        return await self._unary(request)

    def _stream(self) -> _Open:
        """The open stream, opened now if none is."""
        if self._open is None:
            self._open = _Open(self._open_stream())
            reader = asyncio.create_task(self._read(self._open), name="pq-submit-stream")
            self._tasks.add(reader)
            reader.add_done_callback(self._tasks.discard)
            reader.add_done_callback(log_failure)
        return self._open

    def _break(self, stream: _Open, why: str) -> None:
        stream.broken = why
        if self._open is stream:
            self._open = None
        stream.call.cancel()

    async def _read(self, stream: _Open) -> None:
        """Resolve each request's future with its response, until the stream
        ends; then fail those still out with how it ended."""
        call = stream.call
        error: BaseException = _rpc_error(
            grpc.StatusCode.UNAVAILABLE, "the Submit stream ended with requests out"
        )
        cancelled = False
        try:
            # (A server silent here is given up by the batch waiting for it,
            # ``_write_request``: the cancel ends this wait.)
            opened = await call.initial_metadata()
            if self._on_open is not None:
                self._on_open(opened)
            took = marked(opened, STREAM_OPEN_KEY)
            if not stream.took.done():
                stream.took.set_result(took)
            if took:
                self._refusals = 0
            else:
                # Refused (its status follows), or a server that does not say
                # it took a stream: by call for a while. Nothing was written
                # on it: half-closed, it ends.
                if not stream.broken:  # (this side gave it up: it backed off then)
                    self._back_off(stream)
                await call.done_writing()
            while True:
                message = await call.read()
                if not isinstance(message, pb.SubmitStreamResponse):
                    break  # grpc.aio.EOF: ended OK, which only our half-close asks for
                stream.answered = True
                future = stream.waiting.get(message.submit_id)
                if future is not None and not future.done():
                    future.set_result(message)
        except grpc.aio.AioRpcError as exc:
            error = exc
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                # An older server: by call for longer. (Refused at once, by a
                # follower or a draining node, it never took the stream: the
                # reader backed off already.)
                self._unary_until = time.monotonic() + UNIMPLEMENTED_RETRY_S
            elif exc.code() == grpc.StatusCode.INTERNAL:
                # A status overwritten by a write racing the stream's end
                # (grpc/grpc#36066): what was out may have run, and a stream
                # that answered nothing is not tried again at once.
                error = _rpc_error(
                    grpc.StatusCode.UNAVAILABLE,
                    f"the Submit stream failed ({exc.details()}); requests out may or may "
                    "not have been applied",
                )
                taken = stream.took.done() and stream.took.result()
                if taken and not stream.answered and stream.waiting:
                    self._back_off(stream)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if self._closing or (task is not None and task.cancelling()):
                cancelled = True
                raise
            # This side cancelled the call (``_break``, or gRPC on a write
            # cut short): what was out may have run.
            error = _rpc_error(
                grpc.StatusCode.UNAVAILABLE,
                f"the Submit stream was given up ({stream.broken or 'cancelled'}); "
                "requests out may have applied",
            )
        finally:
            if not stream.took.done():
                stream.took.set_result(False)
            if self._open is stream:
                self._open = None
            if not call.done():
                call.cancel()
            for future in list(stream.waiting.values()):
                if future.done():
                    continue
                if cancelled:
                    future.cancel()
                else:
                    future.set_exception(error)

    def _back_off(self, stream: _Open) -> None:
        if self._open is not None and self._open is not stream:
            return  # a newer stream is open: it tells
        wait = min(RETRY_STREAM_S * 2**self._refusals, MAX_RETRY_STREAM_S)
        self._refusals += 1
        self._unary_until = time.monotonic() + wait

    def idle(self) -> None:
        """Half-close the open stream if no request is out on it (its batches
        go elsewhere now); the next batch opens a new one. A no-op otherwise."""
        stream = self._open
        if stream is None or stream.waiting:
            return
        self._open = None  # from here new batches open a new stream
        task = asyncio.create_task(self._half_close(stream), name="pq-submit-idle")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(log_failure)

    @staticmethod
    async def _half_close(stream: _Open) -> None:
        # The server ends it OK; its reader sees the end and leaves. (Failing,
        # the stream had ended already: nothing to close.)
        with contextlib.suppress(Exception):
            await stream.call.done_writing()

    def close(self) -> None:
        """Cancel the stream (the client closes: requests out are cancelled)."""
        self._closing = True
        stream, self._open = self._open, None
        if stream is not None:
            stream.call.cancel()
