"""``Worker``: consume a queue and run a handler on each job.

- Streams (``Consume``, through ``pqueue.consumer``): grants the node a
  credit for each free slot, so the node pushes jobs as they become ready and
  never more than the worker can run. Acks, nacks and lease extensions ride
  on the same stream: whatever finished while the previous write was
  pending goes out in one message, with the slots it freed granted again.
  With ``buffer=N``, N more credits: pushed jobs wait in the worker (their
  leases extended) and start as slots free, so no slot idles for a push's
  round trip; a stop releases them unrun. A stream that breaks (the node
  drains, the leader changes, the connection drops) is opened again with
  backoff; jobs in hand keep their leases, and their acks go by the
  client's single calls while no stream is up. Against
  a node that serves no streams (UNIMPLEMENTED) it falls back to long polls;
  ``WorkerConfig(streaming=False)`` asks for them.
- Long polls: leases up to ``prefetch`` jobs per call, never more than free
  slots, so the worker holds no job it is not working on.
- Extends each lease while its handler runs (every third of the lease).
- Acks on success (on a stream, the acks of one message are packed into
  one ``Ack``; by calls, acks finishing in the same loop turn share one);
  nacks with the exception text on failure (the queue's backoff applies;
  a ``JobFailed``'s message is the reason as it is).
- Logs a failing handler at ERROR with its traceback, at most one per
  ``failure_log_interval_s`` (the rest counted, and the count told with
  the next one); calls the hooks ``on_success(job, result)`` and
  ``on_error(job, exc)`` after each ack or nack (``pqueue.hooks``).
- A queue that does not exist yet is waited for: the node parks a stream
  or long poll on it until its first enqueue (an older node's NOT_FOUND is
  retried within ``MISSING_QUEUE_MAX_S``).
- ``stop()`` (or SIGTERM/SIGINT under ``run_until_signal``) stops taking jobs,
  lets running handlers finish within ``shutdown_grace_s``, and releases the
  rest (a release: no attempt counted, no error recorded) so another worker
  can take them at once.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc

from pqueue.client import Client
from pqueue.consumer import MAX_CREDITS, ConsumeStream, Credits, StreamEndedError, stream_channel
from pqueue.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    LeaseLostError,
    NotFoundError,
    NotLeaderError,
    NotTakenError,
    PermissionDeniedError,
    PQueueError,
    RemoteError,
    ResourceExhaustedError,
    UnauthenticatedError,
)
from pqueue.heartbeats import Heartbeats, Held
from pqueue.hooks import FailureLog, OnError, OnSuccess, call_hook
from pqueue.hooks import JobFailed as JobFailed
from pqueue.lookaside import wrong_cluster
from pqueue.v1 import queue_pb2 as pb
from pqueue.wire.logs import describe
from pqueue.wire.status import from_op_status

logger = logging.getLogger(__name__)

#: Runs one job. What it returns is the job's result, kept on its COMPLETED
#: record: bytes as they are, a str as UTF-8, None for no result.
Handler = Callable[[pb.LeasedJob], Awaitable[bytes | str | None]]

#: A broken stream is opened again after this long, doubling up to the max
#: (a node's retry hint, when longer, wins).
RECONNECT_MIN_S = 0.1
RECONNECT_MAX_S = 5.0
#: A stream that lived this long (or delivered anything) worked: backoff resets.
STREAM_HEALTHY_S = 1.0
#: Streams in a row ended by an odd status before anything came: then long polls.
ODD_ENDS_BEFORE_FALLBACK = 3
#: How long a closing stream waits for its settles' answers.
CLOSE_TIMEOUT_S = 5.0
#: A queue that does not exist yet (a node that answers NOT_FOUND instead of
#: waiting for it, as nodes before waiting did; a lease with ``wait_ms`` 0):
#: looked for again after this long, doubling up to the max, so a worker
#: started before its producers notices the queue within about a second.
MISSING_QUEUE_MIN_S = 0.1
MISSING_QUEUE_MAX_S = 1.0
#: Refusals a worker cannot fix by trying again: they end ``run``.
_FATAL = (InvalidArgumentError, PermissionDeniedError, UnauthenticatedError)


@dataclass(frozen=True)
class WorkerConfig:
    """How a worker leases and shuts down."""

    concurrency: int = 4
    #: Jobs per lease call; 0 means ``concurrency``.
    prefetch: int = 0
    #: On a stream: jobs the node may push beyond the free slots. They wait
    #: in the worker (their leases extended) and start as slots free, so a
    #: slot never idles for a push's round trip; but each may run before a
    #: more urgent job enqueued after it was pushed. 0: the worker holds no
    #: job it is not running (strict priority order across workers).
    buffer: int = 0
    lease_ms: int = 30_000
    wait_ms: int = 20_000
    shutdown_grace_s: float = 30.0
    consumer_id: str = ""
    #: Consume on a stream (falling back to long polls against a node that
    #: serves none); False: long polls.
    streaming: bool = True
    #: A failing handler's traceback is logged at most once per this long;
    #: the failures in between are counted (0: every one).
    failure_log_interval_s: float = 60.0

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if self.prefetch < 0 or self.lease_ms < 3 or self.wait_ms < 0:
            raise ValueError("prefetch, lease_ms and wait_ms must be positive")
        if self.buffer < 0 or (self.buffer and self.concurrency + self.buffer > MAX_CREDITS):
            raise ValueError(f"buffer must be 0 or more, and at most {MAX_CREDITS} - concurrency")
        if self.failure_log_interval_s < 0:
            raise ValueError("failure_log_interval_s must not be negative")


@dataclass
class WorkerStats:
    """What a worker has done so far."""

    leased: int = 0
    acked: int = 0
    failed: int = 0
    released: int = 0
    lost: int = 0


class Worker:
    """Runs ``handler`` on jobs of ``queue`` with bounded concurrency.

    ``on_success(job, result)`` and ``on_error(job, exc)``, sync or async,
    are called after each job's ack or nack was sent (``pqueue.hooks``): to
    report errors to a tracker, count jobs, or test a handler. A hook that
    raises is logged and changes nothing. Failing handlers are also logged
    at ERROR with their traceback, rate-limited
    (``WorkerConfig.failure_log_interval_s``)::

        async def handle(job: pb.LeasedJob) -> None:
            await send_email(json.loads(job.payload))

        def report(job: pb.LeasedJob, exc: BaseException) -> None:
            sentry_sdk.capture_exception(exc)

        worker = Worker(client, "emails", handle, on_error=report)
        await worker.run_until_signal()
    """

    def __init__(
        self,
        client: Client,
        queue: str,
        handler: Handler,
        concurrency: int = 4,
        *,
        config: WorkerConfig | None = None,
        on_success: OnSuccess | None = None,
        on_error: OnError | None = None,
    ) -> None:
        self.client = client
        self.queue = queue
        self.handler = handler
        self.config = config or WorkerConfig(concurrency=concurrency)
        self.on_success = on_success
        self.on_error = on_error
        #: Failing handlers, logged with a traceback at most once per interval.
        self.failures = FailureLog(queue, self.config.failure_log_interval_s, time.monotonic)
        self.stats = WorkerStats()
        self._active: set[asyncio.Task[None]] = set()
        self._slot_free = asyncio.Event()
        self._stopping = asyncio.Event()
        self._acks: list[tuple[pb.LeasedJob, bytes, asyncio.Future[bool]]] = []
        #: Ack batches on their way; the newest still gathers acks until it runs.
        self._ack_flushes: set[asyncio.Task[None]] = set()
        self._ack_gathering = False
        #: The stream jobs come on, while one is up.
        self._stream: ConsumeStream | None = None
        self._credits = Credits(min(self.config.concurrency + self.config.buffer, MAX_CREDITS))
        #: With a buffer, streamed jobs take one of these to run (the rest wait).
        self._slots = asyncio.Semaphore(self.config.concurrency) if self.config.buffer else None
        self._channel: grpc.aio.Channel | None = None
        #: Where ``_channel`` goes: the client's endpoint, or the leader (look-aside).
        self._channel_target = ""
        #: Set when the client's look-aside has the leader ready: the stream
        #: on the endpoint closes and the next one goes to the leader.
        self._move_stream = False
        #: Streams opened so far (the first, and each reconnect).
        self.streams_opened = 0
        #: The next look for a queue not created yet (``MISSING_QUEUE_MIN_S``).
        self._missing_s = MISSING_QUEUE_MIN_S
        #: The leases of jobs held (waiting for a slot, or running), extended
        #: every third of ``lease_ms`` by one timer for all of them.
        self._heartbeats = Heartbeats(self.config.lease_ms / 3000, self._extend)

    def stop(self) -> None:
        """Ask the worker to stop; ``run`` returns once it has."""
        self._stopping.set()
        if self._stream is not None:
            self._stream.wake()

    async def run_until_signal(self) -> None:
        """``run`` until SIGTERM or SIGINT."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        try:
            await self.run()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)

    async def run(self) -> None:
        """Consume and process until ``stop``; then finish or release what is held."""
        try:
            if not (self.config.streaming and await self._consume()):
                await self._poll()
        finally:
            # However it ended (a stop, a refusal, a cancel): jobs waiting in
            # the buffer go back now, and no more start.
            self._stopping.set()
            await self._shutdown()

    async def _poll(self) -> None:
        """Long polls: lease up to the free slots, again and again."""
        while not self._stopping.is_set():
            free = self.config.concurrency - len(self._active)
            if free <= 0:
                await self._wait_for(self._slot_free)
                self._slot_free.clear()
                continue
            jobs = await self._lease(min(self.config.prefetch or free, free))
            for job in jobs:
                self._start(job, streamed=False)

    def _start(self, job: pb.LeasedJob, *, streamed: bool) -> None:
        task = asyncio.create_task(self._process(job, streamed), name=f"pq-job-{job.job_id}")
        self._active.add(task)
        task.add_done_callback(self._on_done)

    async def _consume(self) -> bool:
        """Streams, one after another, until stopped (True), or until the
        node says it serves none (False: long polls instead)."""
        loop = asyncio.get_running_loop()
        backoff_s = RECONNECT_MIN_S
        odd_in_a_row = 0
        while not self._stopping.is_set():
            # Look-aside: to the leader when the client has it ready, else the endpoint.
            target = self.client.leader_target()
            direct = target != self.client.endpoint
            if self._channel is not None and self._channel_target != target:
                await self._channel.close()
                self._channel = None
            if self._channel is None:
                self._channel = stream_channel(target, self.client.tls)
                self._channel_target = target
            stream = ConsumeStream(
                self._channel,
                self.client.call_metadata() + (self.client.direct_marks() if direct else ()),
                self.queue,
                self._credits,
                lease_ms=self.config.lease_ms,
                consumer_id=self.config.consumer_id,
                on_metadata=None if direct else self.client.note_leader,
            )
            stream.open()
            self._stream = stream
            self.streams_opened += 1
            opened = loop.time()
            self._move_stream = False
            moving = False
            undo = None if direct else self.client.on_leader_ready(self._leader_ready)
            try:
                error = await self._take_jobs(stream)
                moving = error is None and not self._stopping.is_set()
            finally:
                if undo is not None:
                    undo()
                self._stream = None
                for job in await stream.close(CLOSE_TIMEOUT_S):  # pushed as it closed
                    self.stats.leased += 1
                    if moving and not self._stopping.is_set():
                        # Moving to the leader, not stopping: the lease is
                        # ours, run the job (settled on the next stream or by a call).
                        self._start(job, streamed=True)
                    else:
                        await self._release_unstarted(job)
            if error is None:
                if self._stopping.is_set():
                    break
                continue  # the leader is ready (look-aside): the next stream goes there
            if direct and not isinstance(error, (*_FATAL, NotFoundError)):
                # The leader the balancer named ended it (it stopped leading,
                # or went away): the next stream goes through the endpoint.
                if stream.responses or loop.time() - opened >= STREAM_HEALTHY_S:
                    self.client.leader_worked(target)  # it served: no pattern to back off from
                if wrong_cluster(error):  # another cluster's node: never there again
                    self.client.refuse_leader(target, describe(error))
                else:
                    self.client.forget_leader(target, describe(error))
                backoff_s = RECONNECT_MIN_S
                await self._pause(RECONNECT_MIN_S)
                continue
            # A status no node ends a stream with (INTERNAL, UNKNOWN...), before
            # anything came: something on the way does not carry streams.
            odd = isinstance(error, RemoteError) and not stream.responses
            odd_in_a_row = odd_in_a_row + 1 if odd else 0
            if (
                stream.ended_unasked
                or (isinstance(error, RemoteError) and error.code == "UNIMPLEMENTED")
                or odd_in_a_row >= ODD_ENDS_BEFORE_FALLBACK
            ):
                endpoint = self.client.endpoint
                logger.info(
                    "%s serves no streams (%s): long polls on %s",
                    endpoint,
                    describe(error),
                    self.queue,
                )
                return False
            if isinstance(error, _FATAL):
                logger.warning("stream on %s refused: %s", self.queue, describe(error))
                raise error
            if stream.responses or loop.time() - opened >= STREAM_HEALTHY_S:
                backoff_s = RECONNECT_MIN_S  # it worked: this is news, not a pattern
            if isinstance(error, NotFoundError):
                await self._queue_missing()
                continue
            self._missing_s = MISSING_QUEUE_MIN_S
            delay_s = max(backoff_s, getattr(error, "retry_after_s", 0.0))
            log = logger.info if error.retriable else logger.warning
            log("stream on %s ended: %s; again in %.1f s", self.queue, describe(error), delay_s)
            await self._pause(delay_s)
            backoff_s = min(backoff_s * 2, RECONNECT_MAX_S)
        return True

    def _leader_ready(self, address: str) -> None:
        """The client has the leader ready (look-aside): move the stream there."""
        stream = self._stream
        if stream is not None:
            logger.debug("the leader at %s is ready: the stream on %s moves", address, self.queue)
            self._move_stream = True
            stream.wake()

    async def _take_jobs(self, stream: ConsumeStream) -> PQueueError | None:
        """Start each job the stream pushes; the error that ended it (None:
        stopping, or moving to the leader)."""
        while not self._stopping.is_set() and not self._move_stream:
            try:
                jobs = await stream.next_jobs()
            except PQueueError as exc:
                return exc
            self.stats.leased += len(jobs)
            # Read your writes: the client's reads wait for these leases too.
            self.client.last_log_index = max(self.client.last_log_index, stream.last_log_index)
            for job in jobs:
                if self._stopping.is_set():
                    await self._release_unstarted(job)
                else:
                    self._start(job, streamed=True)
        return None

    async def _release_unstarted(self, job: pb.LeasedJob) -> None:
        """A pushed job the worker will not run (stopping): give it back at once."""
        self._credits.finished()
        await self._give_back(job, None, "", release=True)
        self.stats.released += 1

    async def _pause(self, seconds: float) -> None:
        """Sleep ``seconds``, or less if a stop is requested."""
        pause = asyncio.create_task(asyncio.sleep(seconds))
        await self._race_stop(pause)
        pause.cancel()  # a stop came first: no sleep left pending

    async def _wait_for(self, event: asyncio.Event) -> None:
        """Wait for ``event`` or a stop request, whichever comes first."""
        waiter = asyncio.create_task(event.wait())
        await self._race_stop(waiter)
        waiter.cancel()

    async def _race_stop(self, task: asyncio.Task[Any]) -> None:
        """Return when ``task`` is done or a stop is requested. Cancelled
        meanwhile, it cancels ``task`` too: nothing is left pending."""
        stop = asyncio.create_task(self._stopping.wait())
        try:
            await asyncio.wait([task, stop], return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            task.cancel()
            raise
        finally:
            stop.cancel()

    async def _lease(self, n: int) -> list[pb.LeasedJob]:
        call = asyncio.create_task(
            self.client.lease(
                self.queue,
                max_jobs=n,
                lease_ms=self.config.lease_ms,
                wait_ms=self.config.wait_ms,
                consumer_id=self.config.consumer_id,
            )
        )
        await self._race_stop(call)
        if not call.done():
            # Stopping mid-poll: anything the server leased meanwhile comes
            # back to the queue when its lease expires.
            call.cancel()
            await asyncio.wait([call])
            return []
        try:
            jobs = call.result()
        except NotFoundError:
            await self._queue_missing()
            return []
        except PQueueError as exc:
            logger.warning("lease on %s failed: %s", self.queue, describe(exc))
            if not exc.retriable:
                raise
            await asyncio.sleep(getattr(exc, "retry_after_s", 0.0) or 0.5)
            return []
        self._missing_s = MISSING_QUEUE_MIN_S
        self.stats.leased += len(jobs)
        return jobs

    async def _queue_missing(self) -> None:
        """NOT_FOUND: the queue is not created yet (or was dropped when idle);
        producers create it on their first enqueue. Nodes wait for it on a
        long poll or a stream; an older one refuses at once, so look again
        soon (backing off to ``MISSING_QUEUE_MAX_S``), not after a whole
        ``wait_ms``."""
        logger.debug("queue %s does not exist yet", self.queue)
        await self._pause(self._missing_s)
        self._missing_s = min(self._missing_s * 2, MISSING_QUEUE_MAX_S)

    def _on_done(self, task: asyncio.Task[None]) -> None:
        self._active.discard(task)
        self._slot_free.set()
        if not task.cancelled() and (exc := task.exception()) is not None:
            logger.error("job task failed: %s", describe(exc), exc_info=exc)

    async def _process(self, job: pb.LeasedJob, streamed: bool) -> None:
        held = self._heartbeats.hold(job)
        try:
            waits = streamed and self._slots is not None
            if waits and not await self._wait_for_slot(job, held):
                return
            try:
                returned = await self.handler(job)
            except asyncio.CancelledError:
                self._heartbeats.release(held)
                self._handler_done(streamed)
                await self._give_back(job, None, "", release=True)
                self.stats.released += 1
                raise
            except Exception as exc:
                self._heartbeats.release(held)
                self._handler_done(streamed)
                self.stats.failed += 1
                self.failures.failed(job, exc)
                # The reason names the type, as a traceback's last line does.
                if isinstance(exc, JobFailed):
                    reason = str(exc)
                else:
                    reason = f"{type(exc).__name__}: {exc}" if str(exc) else describe(exc)
                await self._give_back(job, None, reason)
                await call_hook("on_error", self.on_error, job, exc)
            else:
                self._heartbeats.release(held)
                self._handler_done(streamed)
                if await self._ack(job, _result_of(returned, job)):
                    self.stats.acked += 1
                await call_hook("on_success", self.on_success, job, returned)
        finally:
            self._heartbeats.release(held)

    async def _wait_for_slot(self, job: pb.LeasedJob, held: Held) -> bool:
        """A buffered job waits for a free slot (True: it has one). A stop
        first gives it back unrun (False), as a job pushed while stopping; a
        lease lost meanwhile (``held.lost``) drops it unrun."""
        assert self._slots is not None
        acquire = asyncio.create_task(self._slots.acquire())
        try:
            await self._race_stop(acquire)
        except asyncio.CancelledError:
            self._let_go(acquire)
            self._heartbeats.release(held)
            await self._release_unstarted(job)
            raise
        if acquire.done() and not self._stopping.is_set():
            if not held.lost:
                return True
            # Its lease lapsed while it waited (an extension was refused): the
            # job is another worker's now; running it would be wasted work.
            self._let_go(acquire)
            self._credits.finished()
            self.stats.lost += 1
            return False
        self._let_go(acquire)
        self._heartbeats.release(held)
        await self._release_unstarted(job)
        return False

    def _let_go(self, acquire: asyncio.Task[bool]) -> None:
        """Give up waiting for a slot: the wait cancelled, or the slot back."""
        assert self._slots is not None
        if not acquire.done():
            acquire.cancel()
        elif not acquire.cancelled() and acquire.exception() is None:
            self._slots.release()

    def _handler_done(self, streamed: bool) -> None:
        """A streamed job's handler ended: its slot is free, and granted again
        in the message that carries its ack or nack."""
        if streamed:
            if self._slots is not None:
                self._slots.release()
            self._credits.finished()
            if self._stream is not None and not self._stopping.is_set():
                self._stream.refill()

    async def _on_stream(self, op: pb.Operation) -> pb.OpResult | None:
        """``op``'s result, sent on the stream; None when no stream is up, it
        ended before answering, or the node did not take ``op`` (the single
        call is then made instead: it follows the leader and resends what was
        not taken, as it does for a call alone)."""
        stream = self._stream
        if stream is None or not stream.open_for_settles:
            return None
        try:
            result = await stream.settle(op)
        except StreamEndedError as exc:
            logger.debug("settle of %s went unanswered (%s): the single call", op, exc)
            return None
        error = from_op_status(result.status)
        if isinstance(error, NotLeaderError | NotTakenError) or (
            isinstance(error, ResourceExhaustedError) and error.retriable
        ):
            # It never ran (a leader that lost the lead while holding it, a
            # throttle): not this operation's answer, only the stream's.
            logger.debug("settle of %s not taken (%s): the single call", op, describe(error))
            return None
        done = result.WhichOneof("result")
        if done is not None:  # read your writes: as the single call's answer would
            index = getattr(result, done).log_index
            self.client.last_log_index = max(self.client.last_log_index, index)
        return result

    async def _give_back(
        self, job: pb.LeasedJob, delay_ms: int | None, reason: str, *, release: bool = False
    ) -> None:
        """Nack (a failed attempt), or release (not an attempt: we are stopping)."""
        nack = pb.NackRequest(queue=self.queue, job_id=job.job_id, lease_id=job.lease_id)
        nack.reason, nack.release = reason, release
        if delay_ms is not None:
            nack.delay_ms = delay_ms
        try:
            result = await self._on_stream(pb.Operation(nack=nack))
            if result is None:
                await asyncio.shield(
                    self.client.nack(
                        self.queue,
                        job.job_id,
                        job.lease_id,
                        delay_ms=delay_ms,
                        reason=reason,
                        release=release,
                    )
                )
            elif (error := from_op_status(result.status)) is not None:
                raise error
        except LeaseLostError:
            self.stats.lost += 1
        except PQueueError as exc:
            logger.warning("nack of job %d failed: %s", job.job_id, describe(exc))

    async def _extend(self, job: pb.LeasedJob) -> None:
        """Extend ``job``'s lease once (``Heartbeats`` calls it every third
        of the lease): on the stream, else by the single call."""
        extend = pb.ExtendLeaseRequest(queue=self.queue, job_id=job.job_id, lease_id=job.lease_id)
        extend.lease_ms = self.config.lease_ms
        result = await self._on_stream(pb.Operation(extend=extend))
        if result is None:
            await self.client.extend(self.queue, job.job_id, job.lease_id, self.config.lease_ms)
        elif (error := from_op_status(result.status)) is not None:
            raise error

    async def _ack(self, job: pb.LeasedJob, result: bytes) -> bool:
        """Ack on the stream (its acks are packed per message); without one,
        queue an ack: acks queued in the same loop turn go out as one call."""
        op = pb.Operation()
        ack = op.ack
        ack.queue = self.queue
        ack.leases.add(job_id=job.job_id, lease_id=job.lease_id, result=result)
        answer = await self._on_stream(op)
        if answer is not None:
            error = from_op_status(answer.status)
            if error is not None and result and _refuses_result(error):
                _warn_result_refused(job, error)
                return await self._ack(job, b"")
            return True if error is None else self._ack_refused(job, error)
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._acks.append((job, result, fut))
        if not self._ack_gathering:
            self._ack_gathering = True
            flush = asyncio.create_task(self._flush_acks(), name="pq-ack-flush")
            self._ack_flushes.add(flush)
            flush.add_done_callback(self._ack_flushes.discard)
        return await asyncio.shield(fut)

    async def _flush_acks(self) -> None:
        await asyncio.sleep(0)  # let handlers finishing in this turn join the batch
        batch, self._acks = self._acks, []
        self._ack_gathering = False
        leases = [(job.job_id, job.lease_id, result) for job, result, _ in batch]
        try:
            await self.client.ack_many(self.queue, leases)
            outcomes = [True] * len(batch)
        except PQueueError:
            # Ack is atomic: one stale lease refuses the batch, so ack one by one.
            outcomes = list(
                await asyncio.gather(*(self._ack_one(job, result) for job, result, _ in batch))
            )
        for (_, _, fut), ok in zip(batch, outcomes, strict=True):
            if not fut.done():
                fut.set_result(ok)

    async def _ack_one(self, job: pb.LeasedJob, result: bytes) -> bool:
        try:
            await self.client.ack(self.queue, job.job_id, job.lease_id, result=result)
            return True
        except PQueueError as exc:
            if result and _refuses_result(exc):
                _warn_result_refused(job, exc)
                return await self._ack_one(job, b"")
            return self._ack_refused(job, exc)

    def _ack_refused(self, job: pb.LeasedJob, error: PQueueError) -> bool:
        if isinstance(error, LeaseLostError):
            self.stats.lost += 1
            logger.warning("ack of job %d refused: lease lost", job.job_id)
        else:
            logger.warning("ack of job %d failed: %s", job.job_id, describe(error))
        return False

    async def _shutdown(self) -> None:
        try:
            await self._finish_jobs()
        finally:
            self._heartbeats.close()
            if self._channel is not None:
                await self._channel.close()
                self._channel = None

    async def _finish_jobs(self) -> None:
        if not self._active:
            return
        logger.info("worker on %s finishing %d jobs", self.queue, len(self._active))
        _, pending = await asyncio.wait(set(self._active), timeout=self.config.shutdown_grace_s)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)
        if self._ack_flushes:
            await asyncio.wait(set(self._ack_flushes))


def _result_of(returned: object, job: pb.LeasedJob) -> bytes:
    """What a handler returned, as the job's result: bytes as they are, a str
    as UTF-8, None as none; anything else is not a result (the job is acked
    without one, and the handler's author told why)."""
    if returned is None:
        return b""
    if isinstance(returned, str):
        return returned.encode()
    if isinstance(returned, bytes | bytearray | memoryview):
        return bytes(returned)
    logger.warning(
        "the handler of job %d returned a %s: a job's result is bytes or str; acked without one",
        job.job_id,
        type(returned).__name__,
    )
    return b""


def _refuses_result(error: PQueueError) -> bool:
    """Whether an ack was refused for its result alone: too big for the queue,
    or a cluster that keeps no results yet (an upgrade under way)."""
    if isinstance(error, InvalidArgumentError):
        return error.field.endswith("result")
    # A node's feature refusal reaches a client as a plain FAILED_PRECONDITION.
    return isinstance(error, FailedPreconditionError) and not isinstance(error, NotLeaderError)


def _warn_result_refused(job: pb.LeasedJob, error: PQueueError) -> None:
    logger.warning(
        "the result of job %d was refused (%s): acked without it", job.job_id, describe(error)
    )
