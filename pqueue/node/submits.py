"""Serving ``SubmitStream``: ``Submit`` on one open stream.

A unary ``Submit`` costs a call at both ends (a new HTTP/2 stream, a handler
task, its context and metadata, more thread wake-ups on a busy machine);
on an open stream each batch is one message each way. The SDK keeps one
per batcher (``pqueue.submitstream``) and sends its ``Submit`` batches on it.

- **Opened** once authenticated (by the servicer, once per stream), on the
  leader only: a follower or a draining node ends it at once, before reading
  anything (NOT_LEADER naming the leader, FAILED_PRECONDITION; or
  NOT_TAKEN, UNAVAILABLE): nothing ran, and the caller sends ``Submit``
  instead, which a follower forwards. The leader says it took the stream in
  its initial metadata (``pq-stream-open``), and the SDK writes only after:
  a write racing a refusal could turn its status into INTERNAL
  (grpc/grpc#36066), which would no longer say that nothing ran.
- **Requests.** Each is checked and run exactly as a ``Submit`` is
  (unknown fields, which admission leaves to a stream's server; then
  ``QueueService.submit_ops``: size, count, every
  operation alone, in order; operations a leader that lost the lead never
  ran are forwarded to the new one, as ``Submit``'s are) and answered with
  its ``submit_id`` as soon as it completes; up to ``MAX_RUNNING`` run at
  once (then reading waits, and HTTP/2 flow control holds the sender back),
  so answers may come out of request order. A request refused whole (bad
  input, the node drains) is answered with that refusal for each operation,
  as the ``Submit`` call's status would be; an unexpected failure, with
  UNAVAILABLE ``SUBMIT_FAILED`` for each ("may have run"), and logged. A
  request's room is freed once its answer is written, so a caller that
  writes and does not read holds at most ``MAX_RUNNING`` answers here. The token is checked again
  at most every ``AUTH_RECHECK_S``, when a request arrives. Every request
  gets a request log line, as a call does.
- **Ends.** The caller half-closes (OK); a request reuses a ``submit_id``
  still out (INVALID_ARGUMENT); the token lapses (UNAUTHENTICATED); the
  node drains or stops leading (NOT_TAKEN or NOT_LEADER), seen by a request
  or by the watch every ``WATCH_INTERVAL_S``, so an idle stream never holds
  a stopping node up. Reading stops first, the requests read are answered
  (for up to ``END_GRACE_S``), then the status goes out: it is the status
  of every request the caller has no answer to, and none of them ran
  (past the grace, UNAVAILABLE: some may have).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from pqueue.errors import InvalidArgumentError, NotTakenError, PQueueError, UnavailableError

# How often a token is checked again, how often open streams look whether
# their node still leads, how long an ending one waits: as ``Consume``'s.
from pqueue.node.consume import AUTH_RECHECK_S, END_GRACE_S, WATCH_INTERVAL_S
from pqueue.node.queue_node import QueueNode
from pqueue.v1 import queue_pb2 as pb
from pqueue.wire.admission import check_known_fields
from pqueue.wire.keys import STREAM_OPEN
from pqueue.wire.logs import describe
from pqueue.wire.observe import log_stream_request
from pqueue.wire.serving import log_failure
from pqueue.wire.status import to_op_status

logger = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]
#: Runs one request's operations as ``Submit`` does: (results, log index).
SubmitOps = Callable[[pb.SubmitStreamRequest, Context], Awaitable[tuple[list[pb.OpResult], int]]]

#: Requests of one stream running at once; further ones wait unread.
MAX_RUNNING = 8


class SubmitStreams:
    """The ``SubmitStream`` streams of one node (see the module docstring)."""

    def __init__(
        self,
        node: QueueNode,
        submit_ops: SubmitOps,
        authenticate: Callable[[Context], object],
    ) -> None:
        self.node = node
        self.submit_ops = submit_ops
        #: Checks the caller's token again (raises while it is not valid).
        self.authenticate = authenticate
        self.streams: set[_Stream] = set()
        self._watch: asyncio.Task[None] | None = None

    def refusal(self) -> PQueueError | None:
        """Why this node takes no request now (None: it does)."""
        node = self.node
        if node.draining:
            return NotTakenError("node is draining", retry_after_s=0.2, cause="DRAINING")
        if not node.log.is_leader:
            return node.log.not_leader_error()
        return None

    async def serve(
        self, requests: AsyncIterator[pb.SubmitStreamRequest], context: Context
    ) -> None:
        """Serve one stream (its caller authenticated); raises the status to end it with."""
        why = self.refusal()
        if why is not None:
            raise why
        # Taken: the caller writes from here (never into a refusal).
        await context.send_initial_metadata(STREAM_OPEN)
        stream = _Stream(self, context)
        self.streams.add(stream)
        self.node.submit_streams += 1
        if self._watch is None or self._watch.done():
            self._watch = asyncio.create_task(self._watch_loop(), name="pq-submit-watch")
            self._watch.add_done_callback(log_failure)
        try:
            await stream.run(requests)
        finally:
            self.streams.discard(stream)
            self.node.submit_streams -= 1

    async def _watch_loop(self) -> None:
        """End the streams when the node drains or stops leading."""
        while self.streams:
            await asyncio.sleep(WATCH_INTERVAL_S)
            why = self.refusal()
            if why is not None:
                for stream in list(self.streams):
                    stream.end(why)


class _Stream:
    """One stream served on the leader."""

    def __init__(self, hub: SubmitStreams, context: Context) -> None:
        self.hub = hub
        self.context = context
        loop = asyncio.get_running_loop()
        #: Why the stream ends (None: the caller half-closed); the first reason wins.
        self.ending: asyncio.Future[PQueueError | None] = loop.create_future()
        #: submit_ids read and not answered yet.
        self.out: set[int] = set()
        self.running: set[asyncio.Task[None]] = set()
        self.room = asyncio.Semaphore(MAX_RUNNING)
        self.checked = time.monotonic()
        #: Responses for the writer, in the order they completed; None: the end.
        self.answers: asyncio.Queue[pb.SubmitStreamResponse | None] = asyncio.Queue()
        #: The status the stream ends with (None: OK).
        self.final: PQueueError | None = None

    def end(self, why: PQueueError | None) -> None:
        """Begin ending the stream (the first reason given wins)."""
        if not self.ending.done():
            self.ending.set_result(why)

    async def run(self, requests: AsyncIterator[pb.SubmitStreamRequest]) -> None:
        """Read and answer until the stream ends; raise its status (if not OK).
        Only this task writes (grpc.aio takes one write at a time)."""
        reader = asyncio.create_task(self._read(requests), name="pq-submit-read")
        ender = asyncio.create_task(self._finish(reader), name="pq-submit-end")
        for task in (reader, ender):
            task.add_done_callback(log_failure)
        try:
            while (response := await self.answers.get()) is not None:
                await self.context.write(response)
                self.room.release()  # written: another request may be read
        finally:
            tasks = {reader, ender, *self.running}
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks)
        if self.final is not None:
            raise self.final

    async def _read(self, requests: AsyncIterator[pb.SubmitStreamRequest]) -> None:
        try:
            async for request in requests:
                why = self._admit(request)
                if why is not None:
                    self.end(why)
                    return
                self.hub.node.submit_stream_requests += 1
                await self.room.acquire()
                self.out.add(request.submit_id)
                task = asyncio.create_task(self._answer(request), name="pq-submit-request")
                self.running.add(task)
                task.add_done_callback(self.running.discard)
                task.add_done_callback(log_failure)
        except Exception as exc:  # reading failed (not the caller's input): say so, end
            logger.exception("reading a SubmitStream failed")
            self.end(
                UnavailableError(
                    f"reading the stream failed: {exc!r}; requests out may or may not "
                    "have been applied",
                    reason="SUBMIT_FAILED",
                )
            )
            return
        self.end(None)  # the caller half-closed

    def _admit(self, request: pb.SubmitStreamRequest) -> PQueueError | None:
        """Why ``request`` ends the stream unrun (None: it runs)."""
        why = self.hub.refusal()
        if why is not None:
            return why
        now = time.monotonic()
        if now - self.checked >= AUTH_RECHECK_S:
            try:
                self.hub.authenticate(self.context)
            except PQueueError as exc:
                return exc
            self.checked = now
        if request.submit_id in self.out:
            return InvalidArgumentError(
                "submit_id", f"{request.submit_id} is already out on this stream"
            )
        return None

    async def _answer(self, request: pb.SubmitStreamRequest) -> None:
        log_stream_request("SubmitStream", request.submit_id, len(request.ops))
        node = self.hub.node
        node.calls_in_flight += 1  # load, as balancers see it
        try:
            try:
                check_known_fields(request)
                results, index = await self.hub.submit_ops(request, self.context)
            except PQueueError as exc:
                # Refused whole before anything ran (bad input; draining, or
                # not leading, with no other leader known to forward it to):
                # each operation's answer is the call's status.
                logger.debug("a SubmitStream request refused: %s", describe(exc))
                results, index = _each(request, exc), 0
            except Exception as exc:  # a bug or a failing store: it may have run
                logger.exception("a SubmitStream request failed")
                error = UnavailableError(
                    f"the request failed on the node and may or may not have been applied: {exc!r}",
                    reason="SUBMIT_FAILED",
                )
                results, index = _each(request, error), 0
            self.answers.put_nowait(
                pb.SubmitStreamResponse(
                    submit_id=request.submit_id, results=results, log_index=index
                )
            )
        finally:
            node.calls_in_flight -= 1
            self.out.discard(request.submit_id)

    async def _finish(self, reader: asyncio.Task[None]) -> None:
        """Once a reason to end comes: stop reading, let the requests read be
        answered, then hand the writer the end."""
        why = await self.ending
        # No read may be pending when the status goes out (gRPC would turn it
        # into INTERNAL), and what is not read did not run.
        reader.cancel()
        await asyncio.wait([reader])
        running = set(self.running)
        late: set[asyncio.Task[None]] = set()
        if running:
            _, late = await asyncio.wait(running, timeout=END_GRACE_S)
        for task in late:
            task.cancel()
        if late:
            await asyncio.wait(late)
            why = UnavailableError(
                f"{len(late)} request(s) got no answer within {END_GRACE_S:.0f} s and may "
                f"or may not have been applied"
                + (f" ({describe(why)})" if why is not None else ""),
                retry_after_s=0.2,
                reason="SUBMIT_UNANSWERED",
            )
        self.final = why
        self.answers.put_nowait(None)


def _each(request: pb.SubmitStreamRequest, error: PQueueError) -> list[pb.OpResult]:
    status = to_op_status(error)
    return [pb.OpResult(status=status) for _ in request.ops]
