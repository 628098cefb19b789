"""gRPC servicers for the public ``Queue`` and ``Admin`` services.

Each method checks the stateless rules of its request, turns it into a log
command (or reads the applied state), and returns the response. Domain errors
become gRPC statuses here and nowhere else (``pqueue.wire.status.to_status``).

Over 400 lines on purpose: one short method per RPC of two services.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import contextvars
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, ClassVar, TypeVar

import grpc
from google.protobuf.message import Message

from pqueue.core import browse, events, limits, queue_controls
from pqueue.errors import (
    InvalidArgumentError,
    NotLeaderError,
    NotTakenError,
    PQueueError,
)
from pqueue.node import access, packing
from pqueue.node.auth import ADMIN, CONSUMER, NOBODY, OPEN, PRODUCER, Principal, Verifier
from pqueue.node.commitlog import Indexed, LogStatus
from pqueue.node.consume import Consumers
from pqueue.node.cron import DEFAULT_TIMEZONE, check_schedule, next_tick_ms
from pqueue.node.forward import Forwarder
from pqueue.node.memory import MemoryBudget
from pqueue.node.queue_node import QueueNode
from pqueue.node.quotas import Quotas
from pqueue.node.submits import SubmitStreams
from pqueue.node.watch import Subscription
from pqueue.v1 import log_pb2 as logpb
from pqueue.v1 import queue_pb2 as pb
from pqueue.v1 import queue_pb2_grpc as pbg
from pqueue.wire.keys import DIRECT_KEY, FORWARDED_KEY, marked
from pqueue.wire.load import CpuSampler
from pqueue.wire.logs import describe
from pqueue.wire.observe import log_op_failure
from pqueue.wire.status import code_by_value, code_of, to_op_status, to_status

logger = logging.getLogger(__name__)

#: How long a read waits for its read index or its ``min_index`` to be applied.
READ_WAIT_S = 5.0

Req = TypeVar("Req", bound=Message)
Resp = TypeVar("Resp", bound=Message)
Context = grpc.aio.ServicerContext[Any, Any]
Handler = Callable[[Any, Req, Context], Awaitable[Resp]]
StreamHandler = Callable[[Any, AsyncIterator[Req], Context], Awaitable[None]]


#: The authenticated caller of the call this task serves.
principal: contextvars.ContextVar[Principal] = contextvars.ContextVar(
    "pq_principal", default=NOBODY
)


def rpc(fn: Handler[Req, Resp]) -> Handler[Req, Resp]:
    """Authenticate the caller, run the method, and turn a raised
    ``PQueueError`` into the matching gRPC status."""

    @functools.wraps(fn)
    async def wrapper(self: Any, request: Req, context: Context) -> Resp:
        self.node.calls_in_flight += 1  # load, as balancers see it
        try:
            principal.set(self.authenticate(context))
            return await fn(self, request, context)
        except PQueueError as exc:
            logger.debug("%s refused: %s", fn.__name__, describe(exc))
            await context.abort_with_status(to_status(exc))
            raise AssertionError("unreachable") from exc  # abort_with_status raises
        finally:
            self.node.calls_in_flight -= 1

    return wrapper


def stream_rpc(fn: StreamHandler[Req]) -> StreamHandler[Req]:
    """``rpc`` for a bidirectional stream: authenticate the caller once, when
    the stream opens, and end it with the status of a raised ``PQueueError``
    (the method has stopped reading by then: see ``pqueue.node.consume``)."""

    @functools.wraps(fn)
    async def wrapper(self: Any, requests: AsyncIterator[Req], context: Context) -> None:
        try:
            principal.set(self.authenticate(context))
            await fn(self, requests, context)
        except PQueueError as exc:
            logger.debug("%s ended: %s", fn.__name__, describe(exc))
            await context.abort_with_status(to_status(exc))

    return wrapper


def on_leader(fn: Handler[Req, Resp]) -> Handler[Req, Resp]:
    """Run on the leader: a follower forwards the call there, in one hop."""

    @functools.wraps(fn)
    async def wrapper(self: Any, request: Req, context: Context) -> Resp:
        if not self.node.log.is_leader:
            if marked(context.invocation_metadata(), DIRECT_KEY):
                # A look-aside client takes this node for the leader: tell it
                # (nothing ran, the leader named) rather than carry it on.
                await self._leader_heard()
                raise self.node.log.not_leader_error()
            return await self._forward(fn.__name__, request, context)  # type: ignore[no-any-return]
        try:
            return await fn(self, request, context)
        except NotLeaderError:  # lost the lead before proposing: nothing ran here
            if marked(context.invocation_metadata(), DIRECT_KEY):
                raise
            return await self._forward(fn.__name__, request, context)  # type: ignore[no-any-return]

    return wrapper


def admits_jobs(fn: Handler[Req, Resp]) -> Handler[Req, Resp]:
    """Refuse new jobs while this node is over its memory budget
    (``pqueue.node.memory``): before it forwards or proposes, so nothing
    changes; whichever node the call reaches checks its own."""

    @functools.wraps(fn)
    async def wrapper(self: Any, request: Req, context: Context) -> Resp:
        if self.memory is not None:
            self.memory.check()
        return await fn(self, request, context)

    return wrapper


def _check_size(request: Message) -> None:
    """Client requests are held to the client limit (the server admits peer-sized ones)."""
    size = request.ByteSize()
    if size > limits.MAX_MESSAGE_BYTES:
        raise InvalidArgumentError(
            "request", f"{size} bytes exceeds the {limits.MAX_MESSAGE_BYTES}-byte message limit"
        )


def _queue(named: str, *roles: str, shared: bool = False) -> str:
    """The stored name of the queue the caller names, if its token allows ``roles`` on it."""
    caller = principal.get()
    access.require(caller, *roles)
    return access.scoped(caller, named, shared)


def _page_of(limit: int, page_token: str) -> tuple[str | None, str, int]:
    """Whose queues a list or stats call reads (None: all, for an admin or
    with auth off), the stored name to start after, and the page size."""
    if limit > limits.MAX_LIST_LIMIT:
        raise InvalidArgumentError("limit", f"at most {limits.MAX_LIST_LIMIT}")
    caller = principal.get()
    scope = None if caller is OPEN or ADMIN in caller.roles else caller.tenant
    after = ""
    if page_token:
        try:
            after = base64.urlsafe_b64decode(page_token.encode()).decode()
        except (ValueError, UnicodeError) as exc:
            raise InvalidArgumentError("page_token", "not a token this server gave") from exc
    return scope, after, limit or limits.DEFAULT_LIST_LIMIT


def _token(last: str) -> str:
    """The page token that continues after the stored name ``last`` ("" : no more)."""
    return base64.urlsafe_b64encode(last.encode()).decode() if last else ""


def _op_queue(op: pb.Operation) -> str:
    kind = op.WhichOneof("op")
    return getattr(op, kind).queue if kind else ""


def _uncounted(kind: str, code: str) -> None:
    """No metrics: operations are not counted."""


def _failed(index: int, kind: str, error: PQueueError) -> pb.OpStatus:
    """One operation's status, its error line logged (the call answers OK)."""
    status = to_op_status(error)
    log_op_failure(index, kind, code_of(error).name, error.message)
    return status


async def _indexed(futures: Sequence[asyncio.Future[Indexed]]) -> list[Indexed]:
    """Each future's (result or error, log index); a future that failed (the
    log's own error: commit unknown, leadership lost) gives (its error, 0)."""
    out: list[Indexed] = []
    for future in futures:
        try:
            out.append(await future)
        except PQueueError as exc:
            out.append((exc, 0))
    return out


def _as_single_job(error: PQueueError) -> PQueueError:
    """A single enqueue's error, naming its field as the call has it
    (``job.priority``): the machine checks every enqueue as a batch
    (``jobs[0].priority``)."""
    if isinstance(error, InvalidArgumentError) and error.field.startswith("jobs[0]"):
        return InvalidArgumentError("job" + error.field.removeprefix("jobs[0]"), error.reason)
    return error


def _check_count(n: int, field: str, upper: int) -> None:
    if n == 0:
        raise InvalidArgumentError(field, "must not be empty")
    if n > upper:
        raise InvalidArgumentError(field, f"at most {upper} per call, got {n}")


class _Base:
    SERVICE = ""

    def __init__(
        self,
        node: QueueNode,
        forwarder: Forwarder,
        verifier: Verifier | None = None,
        quotas: Quotas | None = None,
        memory: MemoryBudget | None = None,
    ) -> None:
        self.node = node
        self.forwarder = forwarder
        #: None: auth is off, every caller is ``auth.OPEN``.
        self.verifier = verifier
        self.quotas = quotas
        #: None: no memory budget.
        self.memory = memory

    def _bound(self, queue: str, enqueuing: int = 0) -> logpb.TenantLimits | None:
        """The limits to stamp on a command; spends enqueue tokens (on the
        leader: only it runs this). The queue's owner's limits, except for an
        enqueue by a tenant the queue is shared with, which spends its own
        (the state machine counts its depth in its own lane, too)."""
        if self.quotas is None:
            return None
        tenant = limits.tenant_of(queue)
        if enqueuing:
            caller = principal.get()
            if caller.tenant and ADMIN not in caller.roles:
                tenant = caller.tenant  # the owner, or a sharer
            self.quotas.take(tenant, enqueuing, time.monotonic())
        return self.quotas.of(tenant).stamp()

    def authenticate(self, context: Context) -> Principal:
        if self.verifier is None:
            return OPEN
        return self.verifier.verify(access.bearer(context.invocation_metadata()))

    async def _forward(
        self, method: str, request: Message, context: Context, onward: bool = False
    ) -> Message:
        """The leader's answer to ``request``. A call a hop sent here is not
        forwarded again unless ``onward`` (one hop more, never a loop: the
        leader marks nothing onward)."""
        metadata = context.invocation_metadata() or ()
        await self._leader_heard()
        if not onward and marked(metadata, FORWARDED_KEY):
            raise self.node.log.not_leader_error()  # already forwarded once: no second hop
        _, address = self.node.log.leader_hint()
        if not address:
            raise self.node.log.not_leader_error()
        return await self.forwarder.call(
            address,
            self.SERVICE,
            method,
            request,
            context.time_remaining(),
            self.node.config.node_id,
            access.credentials(metadata),
        )

    def _charge_log_bytes(self, command: logpb.Command) -> None:
        """Per-tenant bytes into the log (``Quota.max_command_bytes``,
        ``log_bytes_per_s``), checked on the leader before it proposes: the
        caller's tenant pays; an admin's call, the queue's owner."""
        if self.quotas is None:
            return
        kind = command.WhichOneof("kind")
        queue = getattr(getattr(command, kind), "queue", "") if kind else ""
        caller = principal.get()
        tenant = limits.tenant_of(queue)
        if caller.tenant and ADMIN not in caller.roles:
            tenant = caller.tenant
        self.quotas.take_bytes(tenant, command.ByteSize(), time.monotonic())

    async def _leader_heard(self) -> None:
        """A leader handing over that stepped down a moment before it hears
        who took over: wait for that (at most the handover's time), so the
        call goes there or is told where, not sent back "no leader yet"."""
        if not self.node.log.leader_hint()[0]:
            await self.node.log.handover_settled()

    def _leader_elsewhere(self) -> bool:
        """Whether another node leads, as this one knows (the last ``Ready``
        may still say this node does: ``leader_hint`` asks the replica)."""
        return self.node.log.leader_hint()[0] not in (0, self.node.cluster.node_id)

    def _check_not_draining(self) -> None:
        """A draining node proposes nothing. One that knows another node
        leads (a leader that just handed over) says so: nothing ran, and
        ``on_leader`` and ``submit_ops`` forward the call there. Else
        NOT_TAKEN."""
        if self.node.draining:
            if self._leader_elsewhere():
                raise self.node.log.not_leader_error()
            raise NotTakenError("node is draining", retry_after_s=1.0, cause="DRAINING")

    async def _propose(self, command: logpb.Command, response_type: type[Resp]) -> Resp:
        self._check_not_draining()
        self._charge_log_bytes(command)
        result, index = await self.node.propose_indexed(command)
        if not isinstance(result, response_type):
            raise TypeError(f"{command.WhichOneof('kind')} gave {type(result).__name__}")
        if "log_index" in result.DESCRIPTOR.fields_by_name:
            result.log_index = index  # type: ignore[attr-defined]  # read your writes
        if isinstance(result, pb.EnqueueBatchResponse):
            for each in result.results:  # each job's answer says it too
                each.log_index = index
        return result

    async def _read_point(
        self,
        method: str,
        request: pb.GetJobRequest
        | pb.StatsRequest
        | pb.ListDeadRequest
        | pb.ListJobsRequest
        | pb.ListSchedulesRequest,
        context: Context,
    ) -> Message | None:
        """Make this node fit to answer a read, or forward it (the answer).

        ``consistent``: on the leader, wait for the read index (a quorum
        round confirms it still leads, then it applies up to there); a
        follower forwards. ``min_index``: wait until applied that far.
        """
        if request.consistent:
            if not self.node.log.is_leader:
                return await self._forward(method, request, context)
            await self.node.log.read_barrier(READ_WAIT_S)
        if request.min_index:
            await self.node.log.wait_applied(request.min_index, READ_WAIT_S)
        return None


class QueueService(_Base, pbg.QueueServicer):
    """Producers and consumers."""

    SERVICE = "pqueue.v1.Queue"

    def __init__(
        self,
        node: QueueNode,
        forwarder: Forwarder,
        verifier: Verifier | None = None,
        quotas: Quotas | None = None,
        memory: MemoryBudget | None = None,
        count_operation: Callable[[str, str], None] | None = None,
    ) -> None:
        super().__init__(node, forwarder, verifier, quotas, memory)
        #: Told each operation a Submit or a settle answered: its kind and
        #: outcome (OK, or its status code); a call's own status is the observer's.
        self.count_operation = count_operation or _uncounted

    # Each write is built the same way whether it comes alone or in a Submit.

    def _enqueue_command(self, request: pb.EnqueueRequest) -> logpb.Command:
        if self.memory is not None:  # again on the leader: an op of a Submit has no decorator
            self.memory.check()
        request.queue = _queue(request.queue, PRODUCER, shared=True)
        limits.check_job_spec(request.job, "job")
        command = logpb.Command(
            limits=self._bound(request.queue, 1), caller=access.caller(principal.get())
        )
        command.enqueue.queue = request.queue
        command.enqueue.jobs.append(request.job)  # the job's one copy
        return command

    def _ack_command(self, request: pb.AckRequest) -> logpb.Command:
        request.queue = _queue(request.queue, CONSUMER)
        _check_count(len(request.leases), "leases", limits.MAX_BATCH_JOBS)
        return logpb.Command(ack=request)

    def _nack_command(self, request: pb.NackRequest) -> logpb.Command:
        request.queue = _queue(request.queue, CONSUMER)
        if request.HasField("delay_ms"):
            limits.check_duration(request.delay_ms, "delay_ms")
        limits.check_text(request.reason, "reason", limits.MAX_REASON_CHARS)
        return logpb.Command(nack=request)

    def _extend_command(self, request: pb.ExtendLeaseRequest) -> logpb.Command:
        request.queue = _queue(request.queue, CONSUMER)
        limits.check_duration(request.lease_ms, "lease_ms")
        return logpb.Command(extend=request)

    @rpc
    @admits_jobs
    @on_leader
    async def Enqueue(self, request: pb.EnqueueRequest, context: Context) -> pb.EnqueueResponse:
        _check_size(request)
        command = self._enqueue_command(request)
        try:
            result = await self._propose(command, pb.EnqueueBatchResponse)
        except InvalidArgumentError as exc:
            raise _as_single_job(exc) from None
        return result.results[0]

    @rpc
    @admits_jobs
    @on_leader
    async def EnqueueBatch(
        self, request: pb.EnqueueBatchRequest, context: Context
    ) -> pb.EnqueueBatchResponse:
        _check_size(request)
        request.queue = _queue(request.queue, PRODUCER, shared=True)
        _check_count(len(request.jobs), "jobs", limits.MAX_BATCH_JOBS)
        for i, spec in enumerate(request.jobs):
            limits.check_job_spec(spec, f"jobs[{i}]")
        bound = self._bound(request.queue, len(request.jobs))
        command = logpb.Command(
            enqueue=request, limits=bound, caller=access.caller(principal.get())
        )
        return await self._propose(command, pb.EnqueueBatchResponse)

    @rpc
    @on_leader
    async def Lease(self, request: pb.LeaseRequest, context: Context) -> pb.LeaseResponse:
        named = request.queue
        request.queue = _queue(request.queue, CONSUMER)
        if request.max_jobs > limits.MAX_LEASE_JOBS:
            raise InvalidArgumentError("max_jobs", f"at most {limits.MAX_LEASE_JOBS}")
        limits.check_duration(request.lease_ms, "lease_ms")
        limits.check_duration(request.wait_ms, "wait_ms", limits.MAX_WAIT_MS)
        limits.check_text(request.consumer_id, "consumer_id")
        self._check_not_draining()
        response = await self.node.lease(request, self._bound(request.queue))
        for job in response.jobs:
            job.queue = named
        return response

    @rpc
    @on_leader
    async def Ack(self, request: pb.AckRequest, context: Context) -> pb.AckResponse:
        return await self._propose(self._ack_command(request), pb.AckResponse)

    @rpc
    @on_leader
    async def Nack(self, request: pb.NackRequest, context: Context) -> pb.NackResponse:
        return await self._propose(self._nack_command(request), pb.NackResponse)

    @rpc
    @on_leader
    async def ExtendLease(
        self, request: pb.ExtendLeaseRequest, context: Context
    ) -> pb.ExtendLeaseResponse:
        return await self._propose(self._extend_command(request), pb.ExtendLeaseResponse)

    @rpc
    @on_leader
    async def Submit(self, request: pb.SubmitRequest, context: Context) -> pb.SubmitResponse:
        results, index = await self.submit_ops(request, context)
        return pb.SubmitResponse(results=results, log_index=index)

    async def submit_ops(
        self, request: pb.SubmitRequest | pb.SubmitStreamRequest, context: Context
    ) -> tuple[list[pb.OpResult], int]:
        """A ``Submit``'s (or a ``SubmitStream`` request's) results and log
        index: its checks, ``run_ops``, and the operations this node never
        ran because it lost the lead forwarded to the new leader."""
        _check_size(request)
        _check_count(len(request.ops), "ops", limits.MAX_BATCH_JOBS)
        names = [_op_queue(op) for op in request.ops]  # as the caller named them
        moved: list[int] = []
        try:
            results, index = await self.run_ops(request.ops, moved)
        except NotLeaderError as exc:  # refused whole, nothing ran: all of it goes on
            # (A look-aside client calling here as the leader is told instead.)
            if not self.node.log.leader_hint()[0] or marked(
                context.invocation_metadata(), DIRECT_KEY
            ):
                raise
            status = to_op_status(exc)
            results, index = [pb.OpResult(status=status) for _ in request.ops], 0
            moved = list(range(len(request.ops)))
        if moved:  # lost the lead with them queued: as ``on_leader`` does, forward
            index = max(index, await self._forward_moved(request, names, moved, results, context))
        return results, index

    async def _forward_moved(
        self,
        request: pb.SubmitRequest | pb.SubmitStreamRequest,
        names: list[str],
        moved: list[int],
        results: list[pb.OpResult],
        context: Context,
    ) -> int:
        """Send the operations that never ran here (this node stopped leading
        while they waited for an entry, or it refused them all unrun: it
        drains, or stopped leading first) to the new leader in one Submit,
        and put its answers in their places; the highest log index it
        applied. A call a balancer or follower sent here goes this one hop
        further (the new leader never forwards it again): a balancer cannot
        split a client's Submit to resend the part that did not run. Where
        no leader is known, or the leader said the hop ran nowhere, they
        keep their NOT_LEADER answers: never ran, safe to send again. A hop
        that failed otherwise may have run: its error is their answer."""
        ops = []
        for i in moved:
            op = request.ops[i]
            getattr(op, op.WhichOneof("op") or "enqueue").queue = names[i]
            ops.append(op)
        if not self._leader_elsewhere():
            return 0
        try:
            answer = await self._forward("Submit", pb.SubmitRequest(ops=ops), context, onward=True)
        except PQueueError as exc:
            logger.debug("%d operation(s) not forwarded: %s", len(moved), describe(exc))
            if not isinstance(exc, NotLeaderError | NotTakenError):
                # The hop may have reached the leader (no answer, a deadline):
                # they may have run there, so never "ran nowhere" now.
                status = to_op_status(exc)
                for i in moved:
                    results[i] = pb.OpResult(status=status)
            return 0
        assert isinstance(answer, pb.SubmitResponse)
        for i, result in zip(moved, answer.results, strict=True):
            results[i] = result
        return answer.log_index

    async def run_ops(
        self, ops: Sequence[pb.Operation], moved: list[int] | None = None
    ) -> tuple[list[pb.OpResult], int]:
        """Each operation's result, in order, and the highest log index applied.

        Every operation is checked and built exactly as its single call is;
        one refused fails alone (its status says why). The rest are proposed
        together, in order, each its own command but for the trailing run of
        one-queue enqueues, which is one (``_outcomes``; group commit puts
        them in as few entries as fit). Raises only for the whole call: draining, or
        not leading before anything was proposed. ``moved`` collects the
        positions of operations that never ran because this node stopped
        leading while they waited (answered NOT_LEADER).
        """
        self._check_not_draining()
        results = [pb.OpResult() for _ in ops]
        commands: list[logpb.Command] = []
        slots: list[tuple[int, str]] = []
        for i, op in enumerate(ops):
            kind = op.WhichOneof("op")
            try:
                if kind is None:
                    raise InvalidArgumentError("op", "set one of enqueue, ack, nack, extend")
                command = self._op_builders[kind](self, getattr(op, kind))
                self._charge_log_bytes(command)
                self.node.prepare(command)
            except PQueueError as exc:
                results[i].status.CopyFrom(_failed(i, kind or "none", exc))
                continue
            commands.append(command)
            slots.append((i, kind))
        top = 0
        for (i, done), (result, index) in zip(slots, await self._outcomes(commands), strict=True):
            if isinstance(result, PQueueError):
                if done == "enqueue":
                    result = _as_single_job(result)
                results[i].status.CopyFrom(_failed(i, done, result))
                if moved is not None and isinstance(result, NotLeaderError):
                    moved.append(i)
                continue
            # An enqueue's own command answers an EnqueueBatchResponse; one of a
            # packed run, its own EnqueueResponse (``_outcomes``).
            answer: Any = (
                result.results[0] if isinstance(result, pb.EnqueueBatchResponse) else result
            )
            answer.log_index = index
            getattr(results[i], done).CopyFrom(answer)
            top = max(top, index)
        for op, result in zip(ops, results, strict=True):
            code = result.status.code if result.HasField("status") else 0
            self.count_operation(op.WhichOneof("op") or "none", code_by_value(code).name)
        return results, top

    async def _outcomes(self, commands: Sequence[logpb.Command]) -> list[Indexed]:
        """Each command's (result or error, log index), proposed in order; the
        trailing run of one-queue enqueues as one command (``pqueue.node.packing``),
        its result split back. If the machine refused that run whole (nothing
        of it changed), each of its commands is proposed again alone, for its
        own answer: still after everything before it, so in request order."""
        start = packing.run_start(commands)
        run = commands[start:]
        proposed = [*commands[:start], packing.packed(run)] if run else list(commands)
        outcomes = await _indexed(self.node.propose_many(proposed) if proposed else [])
        if not run:
            return outcomes
        result, index = outcomes.pop()
        if isinstance(result, PQueueError) and index and packing.per_job(result):
            # Refused whole (nothing of it changed) for one job's sake: each
            # alone, for its own answer. (A refusal of the queue or the
            # caller, the same for every job, is every one's answer.)
            if self.node.draining:
                refusal = NotTakenError("node is draining", retry_after_s=1.0, cause="DRAINING")
                return [*outcomes, *((refusal, 0) for _ in run)]
            try:
                alone = self.node.propose_many(run)
            except PQueueError as exc:  # the log takes nothing now: nothing of them ran
                return [*outcomes, *((exc, 0) for _ in run)]
            return [*outcomes, *await _indexed(alone)]
        if not isinstance(result, pb.EnqueueBatchResponse):  # one error: every one's
            return [*outcomes, *((result, index) for _ in run)]
        # One job per operation (an EnqueueRequest holds one): each its result.
        outcomes.extend((one, index) for _, one in zip(run, result.results, strict=True))
        return outcomes

    _op_builders: ClassVar[dict[str, Callable[[Any, Any], logpb.Command]]] = {
        "enqueue": _enqueue_command,
        "ack": _ack_command,
        "nack": _nack_command,
        "extend": _extend_command,
    }

    @stream_rpc
    async def Consume(  # type: ignore[override]  # writes with context.write, returns None
        self, request_iterator: AsyncIterator[pb.ConsumeRequest], context: Context
    ) -> None:
        await self._consumers.serve(request_iterator, context)

    @stream_rpc
    async def SubmitStream(  # type: ignore[override]  # writes with context.write, returns None
        self, request_iterator: AsyncIterator[pb.SubmitStreamRequest], context: Context
    ) -> None:
        await self.submit_streams.serve(request_iterator, context)

    @functools.cached_property
    def submit_streams(self) -> SubmitStreams:
        """This node's ``SubmitStream`` streams (``pqueue.node.submits``)."""
        return SubmitStreams(self.node, self.submit_ops, self.authenticate)

    @functools.cached_property
    def _consumers(self) -> Consumers:
        """This node's ``Consume`` streams (``pqueue.node.consume``)."""
        return Consumers(
            self.node,
            self.forwarder,
            self.SERVICE,
            scope=lambda named: _queue(named, CONSUMER),
            bound=self._bound,
            run_ops=self.run_ops,
            authenticate=self.authenticate,
        )

    @rpc
    async def GetJob(self, request: pb.GetJobRequest, context: Context) -> pb.GetJobResponse:
        stored = _queue(request.queue, PRODUCER, CONSUMER)
        forwarded = await self._read_point("GetJob", request, context)
        if forwarded is not None:
            return forwarded  # type: ignore[return-value]
        job = self.node.machine.get_job(stored, request.job_id)
        job.queue = request.queue
        return pb.GetJobResponse(job=job)

    @rpc
    async def Stats(self, request: pb.StatsRequest, context: Context) -> pb.StatsResponse:
        access.require(principal.get(), PRODUCER, CONSUMER)
        stored = access.scoped(principal.get(), request.queue) if request.queue else ""
        forwarded = await self._read_point("Stats", request, context)
        if forwarded is not None:
            return forwarded  # type: ignore[return-value]
        if stored:
            stats, token = self.node.machine.stats(stored, self.node.clock_ms()), ""
        else:  # a page of the caller's own queues: never a scan of every tenant's
            scope, after, limit = _page_of(request.limit, request.page_token)
            stats, last = self.node.machine.stats_page(scope, after, limit, self.node.clock_ms())
            token = _token(last)
        return pb.StatsResponse(queues=access.show(principal.get(), stats), next_page_token=token)

    async def Watch(  # type: ignore[override]  # writes with context.write, returns None
        self, request: pb.WatchRequest, context: Context
    ) -> None:
        """Events as this node applies them (``pqueue.node.watch``)."""
        try:
            principal.set(self.authenticate(context))
            match, stored = _watch_scope(request)
            interval_s = request.stats_interval_ms / 1000
            if interval_s and interval_s < 1:
                raise InvalidArgumentError("stats_interval_ms", "0 (no stats) or at least 1000")
            from_index = request.from_index if request.HasField("from_index") else None
            if self.node.draining:
                raise NotTakenError("node is draining", retry_after_s=0.2, cause="DRAINING")
            sub = self.node.watchers.subscribe(match, from_index)
        except PQueueError as exc:
            await context.abort_with_status(to_status(exc))
            return
        writer = asyncio.create_task(self._watch_writes(sub, stored, interval_s, context))
        ended = asyncio.create_task(sub.ended.wait())
        try:
            # A cut-off ends the stream even while a write waits on the client.
            await asyncio.wait({writer, ended}, return_when=asyncio.FIRST_COMPLETED)
            if sub.error is not None:
                raise sub.error
            writer.result()
        except PQueueError as exc:
            await context.abort_with_status(to_status(exc))
        finally:
            writer.cancel()
            ended.cancel()
            if writer.done() and not writer.cancelled():
                writer.exception()  # seen (it raised the error the stream ended with)
            self.node.watchers.unsubscribe(sub)

    async def _watch_writes(
        self, sub: Subscription, stored: list[str], interval_s: float, context: Context
    ) -> None:
        """Write the watcher's events as they come, and its queues' stats
        every ``interval_s`` (when caught up); raise the error that ends it."""
        caller = principal.get()
        seen: set[str] = set(stored)
        await context.write(
            pb.WatchEvent(
                log_index=sub.after,
                time_ms=self.node.machine.time_ms,
                kind=pb.WatchEvent.WATCHING,
            )
        )
        loop = asyncio.get_running_loop()
        stats_due = loop.time() + interval_s
        while True:
            if sub.error is not None:
                raise sub.error
            wait = max(0.0, stats_due - loop.time()) if interval_s else None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(sub.changed.wait(), wait)
            if sub.error is not None:
                raise sub.error
            for taken in sub.take():
                seen.add(taken.queue)
                event = taken.to_proto()
                event.queue = access.shown(caller, taken.queue) or taken.queue
                await context.write(event)
            if interval_s and loop.time() >= stats_due and not sub.pending:
                stats_due = loop.time() + interval_s
                for name in sorted(seen)[: limits.MAX_LIST_LIMIT]:
                    queue = self.node.machine.queues.get(name)
                    shown = access.shown(caller, name)
                    if queue is None or shown is None:
                        continue
                    stats = queue.stats(self.node.clock_ms())
                    stats.queue = shown
                    await context.write(
                        pb.WatchEvent(
                            log_index=sub.resume_index,
                            time_ms=self.node.machine.time_ms,
                            queue=shown,
                            kind=pb.WatchEvent.QUEUE_STATS,
                            stats=stats,
                        )
                    )
                if not stored:
                    seen.clear()


def _watch_scope(request: pb.WatchRequest) -> tuple[Callable[[events.Event], bool], list[str]]:
    """Which events a watch wants (and may see), and the stored names of the
    queues it names."""
    caller = principal.get()
    access.require(caller, PRODUCER, CONSUMER)
    if request.all and request.queues:
        raise InvalidArgumentError("queues", "name queues or ask for all, not both")
    if not request.all and not request.queues:
        raise InvalidArgumentError("queues", "name at least one queue (or ask for all)")
    if len(request.queues) > limits.MAX_LIST_LIMIT:
        raise InvalidArgumentError("queues", f"at most {limits.MAX_LIST_LIMIT}")
    if request.job_id and len(request.queues) != 1:
        raise InvalidArgumentError("job_id", "watch one job in exactly one queue")
    if request.all:
        if caller is OPEN or ADMIN in caller.roles:
            return (lambda _: True), []
        prefix = f"{caller.tenant}/"
        return (lambda e: e.queue.startswith(prefix)), []
    stored = [access.scoped(caller, name) for name in request.queues]
    names = frozenset(stored)
    if request.job_id:
        job_id = request.job_id
        return (lambda e: e.queue in names and e.job_id in (job_id, 0)), stored
    return (lambda e: e.queue in names), stored


class AdminService(_Base, pbg.AdminServicer):
    """Operators."""

    SERVICE = "pqueue.v1.Admin"

    @rpc
    @on_leader
    async def CreateQueue(
        self, request: pb.CreateQueueRequest, context: Context
    ) -> pb.CreateQueueResponse:
        request.queue = _queue(request.queue, ADMIN)
        limits.effective_config(request.config)
        return await self._propose(logpb.Command(create_queue=request), pb.CreateQueueResponse)

    @rpc
    @on_leader
    async def DeleteQueue(
        self, request: pb.DeleteQueueRequest, context: Context
    ) -> pb.DeleteQueueResponse:
        request.queue = _queue(request.queue, ADMIN)
        return await self._propose(logpb.Command(delete_queue=request), pb.DeleteQueueResponse)

    @rpc
    async def ListQueues(
        self, request: pb.ListQueuesRequest, context: Context
    ) -> pb.ListQueuesResponse:
        access.require(principal.get(), PRODUCER, CONSUMER)
        scope, after, limit = _page_of(request.limit, request.page_token)
        if request.min_index:  # read your writes, as ``_read_point``
            await self.node.log.wait_applied(request.min_index, READ_WAIT_S)
        queues, last = self.node.machine.queues_page(scope, after, limit, self.node.clock_ms())
        return pb.ListQueuesResponse(
            queues=access.show(principal.get(), queues), next_page_token=_token(last)
        )

    @rpc
    @on_leader
    async def PurgeQueue(
        self, request: pb.PurgeQueueRequest, context: Context
    ) -> pb.PurgeQueueResponse:
        request.queue = _queue(request.queue, ADMIN)
        return await self._propose(logpb.Command(purge=request), pb.PurgeQueueResponse)

    @rpc
    async def ListDead(self, request: pb.ListDeadRequest, context: Context) -> pb.ListDeadResponse:
        stored = _queue(request.queue, PRODUCER, CONSUMER)
        if request.limit > limits.MAX_LIST_LIMIT:
            raise InvalidArgumentError("limit", f"at most {limits.MAX_LIST_LIMIT}")
        limit = request.limit or limits.DEFAULT_LIST_LIMIT
        forwarded = await self._read_point("ListDead", request, context)
        if forwarded is not None:
            return forwarded  # type: ignore[return-value]
        dead = self.node.machine.list_dead(stored, limit, request.after_job_id)
        for job in dead.jobs:
            job.queue = request.queue
        return dead

    @rpc
    @on_leader
    async def Redrive(self, request: pb.RedriveRequest, context: Context) -> pb.RedriveResponse:
        request.queue = _queue(request.queue, ADMIN)
        return await self._propose(logpb.Command(redrive=request), pb.RedriveResponse)

    @rpc
    @on_leader
    async def DeleteDead(
        self, request: pb.DeleteDeadRequest, context: Context
    ) -> pb.DeleteDeadResponse:
        request.queue = _queue(request.queue, ADMIN)
        return await self._propose(logpb.Command(delete_dead=request), pb.DeleteDeadResponse)

    @rpc
    @on_leader
    async def UpdateQueue(
        self, request: pb.UpdateQueueRequest, context: Context
    ) -> pb.UpdateQueueResponse:
        request.queue = _queue(request.queue, ADMIN)
        queue_controls.check_update(request)
        return await self._propose(logpb.Command(update_queue=request), pb.UpdateQueueResponse)

    @rpc
    @on_leader
    async def PauseQueue(
        self, request: pb.PauseQueueRequest, context: Context
    ) -> pb.PauseQueueResponse:
        request.queue = _queue(request.queue, ADMIN)
        return await self._propose(logpb.Command(pause_queue=request), pb.PauseQueueResponse)

    @rpc
    @on_leader
    async def ResumeQueue(
        self, request: pb.ResumeQueueRequest, context: Context
    ) -> pb.ResumeQueueResponse:
        request.queue = _queue(request.queue, ADMIN)
        return await self._propose(logpb.Command(resume_queue=request), pb.ResumeQueueResponse)

    @rpc
    @on_leader
    async def CompleteJob(
        self, request: pb.CompleteJobRequest, context: Context
    ) -> pb.JobActionResponse:
        return await self._job_action("complete_job", request)

    @rpc
    @on_leader
    async def CancelJob(
        self, request: pb.CancelJobRequest, context: Context
    ) -> pb.JobActionResponse:
        return await self._job_action("cancel_job", request)

    @rpc
    @on_leader
    async def RequeueJob(
        self, request: pb.RequeueJobRequest, context: Context
    ) -> pb.JobActionResponse:
        return await self._job_action("requeue_job", request)

    @rpc
    @on_leader
    async def ReprioritizeJob(
        self, request: pb.ReprioritizeJobRequest, context: Context
    ) -> pb.JobActionResponse:
        return await self._job_action("reprioritize_job", request)

    async def _job_action(self, kind: str, request: Any) -> pb.JobActionResponse:
        """An operator's action on one job: the job as it is after it."""
        named = request.queue
        request.queue = _queue(named, ADMIN)
        out = await self._propose(logpb.Command(**{kind: request}), pb.JobActionResponse)
        out.job.queue = named
        return out

    @rpc
    async def ListJobs(self, request: pb.ListJobsRequest, context: Context) -> pb.ListJobsResponse:
        stored = _queue(request.queue, PRODUCER, CONSUMER)
        query = browse.parse(request)  # a bad request is refused before any wait
        forwarded = await self._read_point("ListJobs", request, context)
        if forwarded is not None:
            return forwarded  # type: ignore[return-value]
        out = self.node.machine.list_jobs(stored, query)
        for job in out.jobs:
            job.queue = request.queue
        return out

    @rpc
    @on_leader
    async def PutSchedule(
        self, request: pb.PutScheduleRequest, context: Context
    ) -> pb.PutScheduleResponse:
        schedule = request.schedule
        named = schedule.queue
        schedule.queue = _queue(named, ADMIN)
        # The machine never parses cron: the node checks it before it goes in.
        schedule.cron = " ".join(schedule.cron.split())
        schedule.timezone = schedule.timezone or DEFAULT_TIMEZONE
        check_schedule(schedule, self.node.clock_ms())
        out = await self._propose(logpb.Command(put_schedule=request), pb.PutScheduleResponse)
        out.schedule.queue = named
        out.schedule.next_tick_ms = next_tick_ms(out.schedule)
        return out

    @rpc
    async def ListSchedules(
        self, request: pb.ListSchedulesRequest, context: Context
    ) -> pb.ListSchedulesResponse:
        caller = principal.get()
        access.require(caller, PRODUCER, CONSUMER)
        stored = access.scoped(caller, request.queue) if request.queue else ""
        forwarded = await self._read_point("ListSchedules", request, context)
        if forwarded is not None:
            return forwarded  # type: ignore[return-value]
        machine = self.node.machine
        if stored:
            names: list[str] | None = [stored]
        elif caller is OPEN or ADMIN in caller.roles:
            names = None  # every queue
        else:  # the caller's own queues: never a scan of every tenant's
            names = machine.queues.names_of(caller.tenant)
        out = pb.ListSchedulesResponse()
        for schedule in machine.list_schedules(names):
            shown = request.queue or access.shown(caller, schedule.queue)
            if shown is None:
                continue
            schedule.queue = shown
            schedule.next_tick_ms = next_tick_ms(schedule)
            out.schedules.append(schedule)
        return out

    @rpc
    @on_leader
    async def DeleteSchedule(
        self, request: pb.DeleteScheduleRequest, context: Context
    ) -> pb.DeleteScheduleResponse:
        request.queue = _queue(request.queue, ADMIN)
        return await self._propose(
            logpb.Command(delete_schedule=request), pb.DeleteScheduleResponse
        )

    @rpc
    @on_leader
    async def PauseSchedule(
        self, request: pb.PauseScheduleRequest, context: Context
    ) -> pb.PauseScheduleResponse:
        named = request.queue
        request.queue = _queue(named, ADMIN)
        out = await self._propose(logpb.Command(pause_schedule=request), pb.PauseScheduleResponse)
        out.schedule.queue = named
        out.schedule.next_tick_ms = next_tick_ms(out.schedule)
        return out

    @rpc
    async def StateDigest(
        self, request: pb.StateDigestRequest, context: Context
    ) -> pb.StateDigestResponse:
        access.require(principal.get(), ADMIN)  # every tenant's queues: admins only
        index, digest = await self.node.state_digest()
        return pb.StateDigestResponse(applied_index=index, sha256=digest)

    @rpc
    async def NodeStatus(
        self, request: pb.NodeStatusRequest, context: Context
    ) -> pb.NodeStatusResponse:
        st = self.node.log.status()
        _, leader_address = self.node.log.leader_hint()
        return pb.NodeStatusResponse(
            node_id=st.node_id,
            address=st.peers.get(st.node_id, ""),
            role=st.role,
            ballot=f"{st.ballot[0]}.{st.ballot[1]}",
            leader_id=st.leader_id,
            leader_address=leader_address,
            commit_index=st.commit_index,
            applied_index=st.applied_index,
            snapshot_index=st.snapshot_index,
            pending=st.pending,
            peers=st.peers,
            ballot_round=st.ballot[0],
            not_serving=not self.node.serving,
            load=self._load(st),
            features=sorted(self.node.config.features),
            log_features=sorted(self.node.machine.features),
            cluster_id=self.node.log.cluster_id,
        )

    def __init__(
        self, node: QueueNode, forwarder: Forwarder, verifier: Verifier | None = None
    ) -> None:
        super().__init__(node, forwarder, verifier)
        self.cpu = CpuSampler()

    def _load(self, st: LogStatus) -> pb.NodeLoad:
        cpu = self.cpu.read()
        long_polls = self.node.waiting_long_polls
        return pb.NodeLoad(
            cpu_utilization=cpu.utilization,
            process_cpu_cores=cpu.process_cores,
            cpu_count=cpu.cpu_count,
            # Neither this probe nor the long polls parked here are work.
            in_flight_calls=max(0, self.node.calls_in_flight - 1 - long_polls),
            waiting_long_polls=long_polls,
            apply_lag_entries=max(0, st.commit_index - st.applied_index),
            ready_jobs=self.node.machine.ready_jobs(),
            rss_bytes=cpu.rss_bytes,
        )
