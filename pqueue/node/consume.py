"""Serving ``Consume``: a streaming consumer, one stream for as long as it runs.

The first request names the queue (``start``); then the consumer grants
credits and settles jobs on the same stream while the node pushes jobs.

- **Opened** once authenticated (by the servicer, once per stream): the
  ``start`` is checked as ``Lease`` checks its fields (role ``consumer``, the
  name scoped to the tenant, ``lease_ms``, ``consumer_id``). A queue that
  does not exist yet is waited for like an empty one: its producer's first
  enqueue wakes the stream. A bad start ends the stream with its status.
  The token is checked again every second while the stream lives.
- **Pushes.** A task leases through the node's long-poll path
  (``LongPolls.lease``): the ``lease`` log command, with its fencing, expiry,
  attempts, priority order, tenant fairness and quotas, exactly as ``Lease``.
  It asks for the credits left (at most 1000 outstanding) and pushes each
  lease's jobs in one response; with none left it waits out of line.
- **Settles.** Each request's ``settle`` runs through ``QueueService.run_ops``
  (as ``Submit``) and is answered with its ``settle_id``, one result per
  operation. Requests are read by a task of their own, so a settle never
  waits behind a parked lease; at most ``MAX_SETTLES`` run at once (then
  reading waits, and HTTP/2 flow control holds the consumer back).
- **Ends.** The consumer half-closes (OK); a bad request (INVALID_ARGUMENT);
  the token lapses (UNAUTHENTICATED); the
  node drains or stops leading (UNAVAILABLE, within ``WATCH_INTERVAL_S``).
  Reading stops first, running settles are answered (for up to
  ``END_GRACE_S``), then the status goes out: an UNAVAILABLE carries
  NOT_TAKEN when every settle read was answered (what was not read was not
  taken), unless a lease of its own may have committed unseen (then the
  log's reason, e.g. COMMIT_UNKNOWN). Leases already pushed outlive the
  stream and expire, as a lost long poll's do; a parked waiter leaves its
  line, handing on any wake-up.
- **Followers** relay the whole stream to the leader in one hop
  (``Forwarder.relay``), ending it NOT_TAKEN when they drain.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import grpc

from pqueue.core import limits
from pqueue.errors import (
    InvalidArgumentError,
    NotLeaderError,
    NotTakenError,
    PQueueError,
    ResourceExhaustedError,
    UnavailableError,
)
from pqueue.node.access import credentials
from pqueue.node.forward import Forwarder
from pqueue.node.queue_node import QueueNode
from pqueue.v1 import log_pb2 as logpb
from pqueue.v1 import queue_pb2 as pb
from pqueue.wire.admission import check_known_fields
from pqueue.wire.keys import DIRECT_KEY, FORWARDED_KEY, marked
from pqueue.wire.logs import describe
from pqueue.wire.serving import log_failure
from pqueue.wire.status import to_op_status

logger = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]
RunOps = Callable[[Sequence[pb.Operation]], Awaitable[tuple[list[pb.OpResult], int]]]

#: Credits a stream may hold outstanding (granted, not yet used by a push).
MAX_CREDITS = limits.MAX_LEASE_JOBS
#: Settles of one stream run at once; further requests wait unread.
MAX_SETTLES = 8
#: How often open streams look whether their node still leads or drains.
WATCH_INTERVAL_S = 0.2
#: How often a stream's token is checked again (expiry, revocation).
AUTH_RECHECK_S = 1.0
#: How long an ending stream waits for its running settles and lease.
END_GRACE_S = 2.0
#: Responses queued while the writer waits ride along in one, up to this size.
MERGE_BYTES = 4 << 20
#: How long a new stream may take to send its first request.
START_TIMEOUT_S = 30.0


class Credits:
    """How many more jobs a stream may push (pure)."""

    __slots__ = ("left",)

    def __init__(self) -> None:
        self.left = 0

    def grant(self, n: int) -> None:
        """``n`` more; INVALID_ARGUMENT past ``MAX_CREDITS`` outstanding."""
        if self.left + n > MAX_CREDITS:
            raise InvalidArgumentError(
                "credits",
                f"at most {MAX_CREDITS} outstanding: {self.left} left, {n} more granted",
            )
        self.left += n

    def use(self, n: int) -> None:
        """``n`` jobs pushed (never more than are left)."""
        if n > self.left:
            raise ValueError(f"{n} jobs pushed with {self.left} credits left")
        self.left -= n


#: What the writer is handed: a response (and whether it answers a settle), or the end.
_Out = tuple[pb.ConsumeResponse, bool] | None


class Consumers:
    """The ``Consume`` streams of one node: served here, or relayed to the leader."""

    def __init__(
        self,
        node: QueueNode,
        forwarder: Forwarder,
        service: str,
        *,
        scope: Callable[[str], str],
        bound: Callable[[str], logpb.TenantLimits | None],
        run_ops: RunOps,
        authenticate: Callable[[Context], object],
    ) -> None:
        self.node = node
        self.forwarder = forwarder
        self.service = service
        #: The stored name of a queue the caller names, if it may consume it.
        self.scope = scope
        #: The tenant limits a lease is stamped with.
        self.bound = bound
        self.run_ops = run_ops
        #: Checks the caller's token again (raises while it is not valid).
        self.authenticate = authenticate
        self.streams: set[_Stream] = set()
        #: Relayed streams' stop signals (done: this node drains).
        self.relays: set[asyncio.Future[None]] = set()
        self._watch: asyncio.Task[None] | None = None

    async def serve(self, requests: AsyncIterator[pb.ConsumeRequest], context: Context) -> None:
        """Serve one stream (its caller authenticated); raises the status to end it with."""
        node = self.node
        node.consume_streams += 1
        try:
            if not node.log.is_leader:
                await self._relay(requests, context)
                return
            if node.draining:
                raise NotTakenError("node is draining", retry_after_s=1.0, cause="DRAINING")
            iterator = aiter(requests)
            try:
                async with asyncio.timeout(START_TIMEOUT_S):
                    first = await anext(iterator, None)
            except TimeoutError:
                raise InvalidArgumentError(
                    "start", f"no first request within {START_TIMEOUT_S:.0f} s"
                ) from None
            if first is None:
                return  # closed before it started: nothing to do
            stream = await self._open(first, context)
            self.streams.add(stream)
            self._watching()
            try:
                await stream.run(first, iterator)
            finally:
                self.streams.discard(stream)
        finally:
            node.consume_streams -= 1

    async def _open(self, first: pb.ConsumeRequest, context: Context) -> _Stream:
        """The stream ``first`` starts, its ``start`` checked as ``Lease`` checks its fields."""
        if not first.HasField("start"):
            raise InvalidArgumentError("start", "the first request must carry it")
        start = first.start
        try:
            stored = self.scope(start.queue)
        except InvalidArgumentError as exc:
            raise InvalidArgumentError(f"start.{exc.field}", exc.reason) from exc
        limits.check_duration(start.lease_ms, "start.lease_ms")
        limits.check_text(start.consumer_id, "start.consumer_id")
        # A queue not created yet is waited for like an empty one (its
        # producer's first enqueue wakes the stream): ``LongPolls.lease``.
        return _Stream(self, context, start, stored)

    async def _relay(self, requests: AsyncIterator[pb.ConsumeRequest], context: Context) -> None:
        """A follower's part: the whole stream to the leader and back, in one hop."""
        node = self.node
        metadata = context.invocation_metadata() or ()
        if marked(metadata, FORWARDED_KEY) or marked(metadata, DIRECT_KEY):
            # Forwarded once already (no second hop), or a look-aside client's
            # (it moves on to the leader named).
            raise node.log.not_leader_error()
        _, address = node.log.leader_hint()
        if not address:
            raise node.log.not_leader_error()
        stop: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.relays.add(stop)
        self._watching()
        try:
            async for response in self.forwarder.relay(
                address,
                self.service,
                "Consume",
                requests,
                node.config.node_id,
                credentials(metadata),
                stop,
            ):
                await context.write(response)
        finally:
            self.relays.discard(stop)
        if stop.done():  # the leader answered what it read; the rest was not read
            raise NotTakenError("node is draining", retry_after_s=0.2, cause="DRAINING")

    def _watching(self) -> None:
        if self._watch is None or self._watch.done():
            self._watch = asyncio.create_task(self._watch_loop(), name="pq-consume-watch")
            self._watch.add_done_callback(log_failure)

    async def _watch_loop(self) -> None:
        """End streams when the node drains or stops leading; check their tokens."""
        node = self.node
        recheck = max(1, round(AUTH_RECHECK_S / WATCH_INTERVAL_S))
        tick = 0
        while self.streams or self.relays:
            await asyncio.sleep(WATCH_INTERVAL_S)
            tick += 1
            why: PQueueError | None = None
            if node.draining:
                why = NotTakenError("node is draining", retry_after_s=0.2, cause="DRAINING")
                for stop in self.relays:
                    if not stop.done():
                        stop.set_result(None)
            elif not node.log.is_leader:
                leader, address = node.log.leader_hint()
                who = f"node {leader} ({address}) leads" if leader else "no leader yet"
                why = NotTakenError(
                    f"this node stopped leading; {who}", retry_after_s=0.2, cause="STOPPED_LEADING"
                )
            for stream in list(self.streams):
                if why is not None:
                    stream.end(why)
                elif tick % recheck == 0:
                    stream.check_token()


class _Stream:
    """One stream served on the leader."""

    def __init__(
        self, hub: Consumers, context: Context, start: pb.ConsumeStart, stored: str
    ) -> None:
        self.hub = hub
        self.context = context
        self.named = start.queue
        self.stored = stored
        self.lease_ms = start.lease_ms
        self.consumer_id = start.consumer_id
        self.credits = Credits()
        #: Set when credits are granted, or the stream ends.
        self.more = asyncio.Event()
        loop = asyncio.get_running_loop()
        #: Why the stream ends (None: the consumer half-closed); the first reason wins.
        self.ending: asyncio.Future[PQueueError | None] = loop.create_future()
        #: Done once pushing must stop: a parked lease leaves its line.
        self.stop_pushing: asyncio.Future[None] = loop.create_future()
        #: What the writer sends next, in order; None: the end.
        self.out: deque[_Out] = deque()
        self._out_ready = asyncio.Event()
        #: Jobs pushed and not yet taken by the writer: a consumer that grants
        #: credits but does not read holds up the writer, and the pusher
        #: leases no more once ``MAX_CREDITS`` wait here (memory stays bounded).
        self.unsent = 0
        #: Set when the writer takes pushes (or the stream ends).
        self.taken = asyncio.Event()
        self.slots = asyncio.Semaphore(MAX_SETTLES)
        self.settling: set[asyncio.Task[None]] = set()
        #: The status the stream ends with (None: OK).
        self.final: PQueueError | None = None
        self.pushed = 0
        self.settled = 0

    def end(self, why: PQueueError | None) -> None:
        """Begin ending the stream (the first reason given wins)."""
        if not self.ending.done():
            self.ending.set_result(why)

    def emit(self, item: _Out) -> None:
        """Hand the writer a response (and whether it answers a settle), or the end."""
        self.out.append(item)
        if item is not None:
            self.unsent += len(item[0].jobs)
        self._out_ready.set()

    async def _next_response(self) -> pb.ConsumeResponse | None:
        """The next response to write (None: the stream ends). What queued up
        meanwhile rides along: every push, in lease order, and one settle's
        answer (a response carries one ``settle_id``)."""
        while not self.out:
            self._out_ready.clear()
            await self._out_ready.wait()
        item = self.out.popleft()
        if item is None:
            return None
        response, answers = item
        size = response.ByteSize()
        while self.out and self.out[0] is not None:
            more, answer = self.out[0]
            extra = more.ByteSize()
            if (answer and answers) or size + extra > MERGE_BYTES:
                break
            size += extra
            self.out.popleft()
            response.jobs.extend(more.jobs)
            if answer:
                response.settle_id = more.settle_id
                response.settled.extend(more.settled)
                answers = True
        if answers:
            self.slots.release()  # its answer is on its way: another settle may run
        if response.jobs:
            self.unsent -= len(response.jobs)
            self.taken.set()
        return response

    def check_token(self) -> None:
        try:
            self.hub.authenticate(self.context)
        except PQueueError as exc:
            self.end(exc)

    async def run(
        self, first: pb.ConsumeRequest, requests: AsyncIterator[pb.ConsumeRequest]
    ) -> None:
        """Read, push and settle until the stream ends; raise its status (if not OK)."""
        logger.debug(
            "consume stream on %s opened by consumer %r (%d credits)",
            self.named,
            self.consumer_id,
            first.credits,
        )
        reader = asyncio.create_task(self._read(first, requests), name="pq-consume-read")
        pusher = asyncio.create_task(self._push(), name="pq-consume-push")
        ender = asyncio.create_task(self._finish(reader, pusher), name="pq-consume-end")
        for task in (reader, pusher, ender):
            task.add_done_callback(log_failure)
        try:
            while (response := await self._next_response()) is not None:
                await self.context.write(response)
        finally:
            tasks = {reader, pusher, ender, *self.settling}
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks)
            logger.debug(
                "consume stream on %s of consumer %r closed: %d jobs pushed, %d settles; %s",
                self.named,
                self.consumer_id,
                self.pushed,
                self.settled,
                describe(self.final) if self.final is not None else "OK",
            )
        if self.final is not None:
            raise self.final

    def _take(self, request: pb.ConsumeRequest, first: bool) -> None:
        """Check one request and add its credits; INVALID_ARGUMENT ends the stream."""
        if not first and request.HasField("start"):
            raise InvalidArgumentError("start", "only the first request may carry it")
        check_known_fields(request)
        if len(request.settle) > limits.MAX_BATCH_JOBS:
            raise InvalidArgumentError(
                "settle", f"at most {limits.MAX_BATCH_JOBS} per request, got {len(request.settle)}"
            )
        if request.credits:
            self.credits.grant(request.credits)
            self.more.set()

    async def _read(
        self, first: pb.ConsumeRequest, requests: AsyncIterator[pb.ConsumeRequest]
    ) -> None:
        """Take each request as it comes: credits at once, settles in tasks."""
        request = first
        try:
            while True:
                self._take(request, request is first)
                if request.settle or request.settle_id:
                    await self.slots.acquire()
                    task = asyncio.create_task(self._settle(request), name="pq-consume-settle")
                    self.settling.add(task)
                    task.add_done_callback(self.settling.discard)
                    task.add_done_callback(log_failure)
                nxt = await anext(requests, None)
                if nxt is None:
                    break
                request = nxt
        except PQueueError as exc:
            self.end(exc)
            return
        self.end(None)  # the consumer half-closed: it asks for nothing more

    async def _settle(self, request: pb.ConsumeRequest) -> None:
        node = self.hub.node
        node.calls_in_flight += 1
        try:
            results, _ = await self.hub.run_ops(request.settle)
        except PQueueError as exc:
            # Raised only for the whole request, before anything was proposed
            # (draining, not leading): nothing of it was taken. Every
            # operation is answered so (the stream then ends), as the
            # contract promises each settle an answer.
            error = (
                exc
                if isinstance(exc, NotTakenError)
                else NotTakenError(exc.message, 0.2, _cause_of(exc))
            )
            status = to_op_status(error)
            results = [pb.OpResult(status=status) for _ in request.settle]
            self.emit((pb.ConsumeResponse(settle_id=request.settle_id, settled=results), True))
            self.end(error)
            return
        finally:
            node.calls_in_flight -= 1
        self.settled += 1
        answer = pb.ConsumeResponse(settle_id=request.settle_id, settled=results)
        self.emit((answer, True))

    async def _push(self) -> None:
        """Lease as credits allow, through the node's long-poll path, and push."""
        node = self.hub.node
        while not self.stop_pushing.done():
            if self.credits.left == 0:
                self.more.clear()
                await self.more.wait()
                continue
            if self.unsent >= MAX_CREDITS:  # the consumer is not reading: wait for it
                self.taken.clear()
                await self.taken.wait()  # set by the writer, or by the end
                continue
            req = pb.LeaseRequest(
                queue=self.stored,
                max_jobs=self.credits.left,
                lease_ms=self.lease_ms,
                consumer_id=self.consumer_id,
            )
            node.calls_in_flight += 1  # parked, it counts as a waiting long poll instead
            try:
                response = await node.long_polls.lease(
                    req,
                    self.hub.bound(self.stored),
                    want=lambda: self.credits.left,
                    stop=self.stop_pushing,
                )
            except ResourceExhaustedError as exc:
                if not exc.retriable:
                    self.end(exc)
                    return
                await asyncio.wait([self.stop_pushing], timeout=exc.retry_after_s)
                continue  # the tenant's lease quota: try again when it says
            except (NotLeaderError, NotTakenError) as exc:
                self.end(
                    NotTakenError(
                        f"lease not taken: {exc.message}", retry_after_s=0.2, cause=_cause_of(exc)
                    )
                )
                return
            except UnavailableError as exc:
                # The lease may have committed (COMMIT_UNKNOWN, the log
                # failed...): never NOT_TAKEN; its reason goes on as it is.
                self.end(
                    UnavailableError(
                        f"a lease may have been taken: {exc.message}",
                        retry_after_s=0.2,
                        reason=exc.reason,
                        metadata=exc.metadata,
                    )
                )
                return
            except PQueueError as exc:
                self.end(exc)
                return
            finally:
                node.calls_in_flight -= 1
            if response.jobs:
                self.credits.use(len(response.jobs))
                self.pushed += len(response.jobs)
                for job in response.jobs:
                    job.queue = self.named
                self.emit(
                    (pb.ConsumeResponse(jobs=response.jobs, log_index=response.log_index), False)
                )
            elif node.draining:
                self.end(NotTakenError("node is draining", retry_after_s=0.2, cause="DRAINING"))
                return

    async def _finish(self, reader: asyncio.Task[None], pusher: asyncio.Task[None]) -> None:
        """Once a reason to end comes: stop reading, stop pushing, let running
        settles answer, then hand the writer the end."""
        why = await self.ending
        # No read may be pending when the status goes out (gRPC would turn it
        # into INTERNAL), and what is not read is not taken.
        reader.cancel()
        await asyncio.wait([reader])
        self.stop_pushing.set_result(None)
        self.more.set()
        self.taken.set()
        running = {pusher, *self.settling}
        _, late = await asyncio.wait(running, timeout=END_GRACE_S)
        for task in late:
            task.cancel()
        if late:
            await asyncio.wait(late)
        unanswered = len(late - {pusher})
        if unanswered and (why is None or isinstance(why, UnavailableError)):
            reason = "the consumer closed" if why is None else why.message
            why = UnavailableError(
                f"{reason}; {unanswered} settle request(s) got no answer in time "
                "and may or may not have applied",
                retry_after_s=0.2,
                reason="SETTLE_UNANSWERED",
            )
        self.final = why
        self.emit(None)


def _cause_of(error: PQueueError) -> str:
    """Why ``error`` left a call untaken, as a NOT_TAKEN ``cause``."""
    if isinstance(error, NotTakenError):
        return error.cause
    if isinstance(error, NotLeaderError):
        return "NOT_LEADER"
    return "REFUSED"  # the message says why
