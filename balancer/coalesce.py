"""The Enqueue Manager: single-job calls of many clients, sent to the leader
together in ``Submit`` calls, each client answered as if it had called alone.

**What rides.** ``Enqueue``, ``Ack``, ``Nack`` and ``ExtendLease``
(``Route.op_field``), and clients' own ``Submit`` calls (the SDK sends even
a lone call as a ``Submit`` of one): a ``Submit`` joins others as it is, its
operations kept together and in order, and gets back a ``SubmitResponse`` of
its own results (their highest ``log_index`` with them), as the node answers
it alone, except that an operation answered NOT_LEADER (it never ran) comes
back NOT_TAKEN (``hide_leaders``): a balancer never hands a client a node
address, which it may not be able to reach. Calls ride together only when the node would take them
for the same caller: the same leader and the same metadata passed on (the
``authorization`` credentials, which are all a node reads to know who calls,
and anything else the client sent), so no call is ever made under another
client's token. A group is (leader address, that metadata).

**When.** No timer. A group sends at most ``max_in_flight`` ``Submit`` calls
at a time: a lone call goes at once, in a ``Submit`` of one; calls that
arrive while the group's calls are in flight wait and ride the next one
(up to 1000 operations and the message limit). Each call's bytes are framed
into the ``Submit`` as they came (``balancer.framing``): nothing is parsed.

**Answers.** Each operation's result goes to its own caller: the response
the single call returns, or its status: the same code and message, the
``grpc-status-details-bin`` trailer holding the very google.rpc.Status bytes
the node put in the result, and ``grpc-retry-pushback-ms`` when it carries a
``RetryInfo``, exactly as the node's single call ends. A ``Submit`` refused as
a whole before it ran anything (``INVALID_ARGUMENT``: say a call's bytes do
not parse, or carry a field the node does not know; ``RESOURCE_EXHAUSTED``)
sends each of its calls alone (``PLAIN``), so each gets its own single answer
and a bad call fails only its own caller; a node that does not know
``Submit`` (``UNIMPLEMENTED``: an older release) is sent plain calls for
``PLAIN_RECHECK_S``. The caller (``balancer.proxy``) applies the resend
rules of ``balancer.routes`` to each call by itself.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2

from balancer.backends import Backends
from balancer.framing import (
    FramingError,
    Result,
    op_header,
    split_results,
    submit_response,
)
from balancer.hop import Metadata, own_metadata, why_failed
from balancer.metrics import BalancerMetrics
from pqueue.errors import NotTakenError
from pqueue.wire.logs import describe
from pqueue.wire.observe import client_ip, new_request_id, request_id
from pqueue.wire.protowire import varint
from pqueue.wire.sizes import MAX_BATCH_JOBS, MAX_MESSAGE_BYTES
from pqueue.wire.status import NOT_LEADER, NOT_TAKEN, error_info, to_op_status

logger = logging.getLogger(__name__)

SUBMIT = "/pqueue.v1.Queue/Submit"
#: How long a node that answered ``Submit`` with UNIMPLEMENTED gets plain calls.
PLAIN_RECHECK_S = 30.0
#: Room left in a ``Submit`` under the message limit (its own framing).
_SLACK_BYTES = 4096
_DETAILS_KEY = "grpc-status-details-bin"
_PUSHBACK_KEY = "grpc-retry-pushback-ms"
_BY_VALUE = {c.value[0]: c for c in grpc.StatusCode}
#: Whole-``Submit`` refusals that ran nothing: send each call alone instead.
_REFUSED_WHOLE = frozenset((grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED))
#: What a client's ``Submit`` gets for an operation answered NOT_LEADER (it
#: never ran), in its place: NOT_TAKEN, as a single call told "not leader"
#: at its last send gets (``proxy._abort_ran_nowhere``), never a node's address.
_NOT_TAKEN_STATUS = to_op_status(
    NotTakenError("the leader moved; try again", retry_after_s=0.2, cause="LEADER_MOVED")
).SerializeToString()
_NOT_TAKEN_RESULT = Result(
    b"\x0a" + varint(len(_NOT_TAKEN_STATUS)) + _NOT_TAKEN_STATUS, _NOT_TAKEN_STATUS, 0, b""
)


class _Plain:
    """Send this call alone, as a plain proxied call (nothing of it ran)."""

    def __repr__(self) -> str:
        return "PLAIN"


class _Moved:
    """The leader stopped answering and another took over; the ``Submit``
    was cancelled (its operations may or may not have been applied)."""

    def __repr__(self) -> str:
        return "MOVED"


PLAIN = _Plain()
MOVED = _Moved()


@dataclass(frozen=True, slots=True)
class OpFailed:
    """One operation refused, as its single call would have been."""

    code: grpc.StatusCode
    message: str
    trailers: Metadata
    #: ``not_leader``, ``not_taken``, ``unreachable`` or None (see ``hop.why_failed``).
    why: str | None
    #: With ``not_leader``: the node id it named (0: none).
    leader_id: int = 0


@dataclass(frozen=True, slots=True)
class WholeFailed:
    """The ``Submit`` failed as a whole: every call it carried gets this error."""

    error: grpc.aio.AioRpcError
    why: str | None


#: What a call that rode in a ``Submit`` comes back with.
Outcome = bytes | OpFailed | WholeFailed | _Plain | _Moved


def op_failed(status: bytes) -> OpFailed:
    """The failure a result's status bytes (a google.rpc.Status) stand for."""
    proto = status_pb2.Status.FromString(status)
    code = _BY_VALUE.get(proto.code, grpc.StatusCode.UNKNOWN)
    trailers: list[tuple[str, str | bytes]] = [(_DETAILS_KEY, status)]
    reasons: dict[str, dict[str, str]] = {}
    for detail in proto.details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            trailers.append((_PUSHBACK_KEY, str(retry.retry_delay.ToMilliseconds())))
        elif detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reasons[info.reason] = dict(info.metadata)
    why, leader_id = None, 0
    if code == grpc.StatusCode.FAILED_PRECONDITION and NOT_LEADER in reasons:
        why = "not_leader"
        leader = reasons[NOT_LEADER].get("leader_id", "")
        leader_id = int(leader) if leader.isdigit() else 0
    elif code == grpc.StatusCode.UNAVAILABLE:
        why = "not_taken" if NOT_TAKEN in reasons else "unreachable"
    return OpFailed(code, proto.message, tuple(trailers), why, leader_id)


@dataclass(slots=True, eq=False)
class _Rider:
    """One call waiting for, or riding in, a ``Submit``."""

    #: What makes ``request`` operations of a ``SubmitRequest`` (empty for a client's Submit).
    header: bytes
    request: bytes
    #: How many operations it is (1 for a single call).
    ops: int
    deadline_s: float
    request_id: str
    client_ip: str
    future: asyncio.Future[Outcome]


@dataclass(slots=True, eq=False)
class _Group:
    """The calls that may share a ``Submit``: one leader, one caller's metadata."""

    address: str
    metadata: Metadata
    waiting: deque[_Rider] = field(default_factory=deque)
    in_flight: int = 0


class Coalescer:
    """Packs single calls into ``Submit`` calls; ``ride`` is one call's trip."""

    def __init__(
        self,
        backends: Backends,
        metrics: BalancerMetrics,
        max_in_flight: int = 1,
        max_ops: int = MAX_BATCH_JOBS,
        max_bytes: int = MAX_MESSAGE_BYTES - _SLACK_BYTES,
    ) -> None:
        if max_in_flight < 1 or max_ops < 1:
            raise ValueError("max_in_flight and max_ops must be at least 1")
        self.backends = backends
        self.metrics = metrics
        self.max_in_flight = max_in_flight
        self.max_ops = max_ops
        self.max_bytes = max_bytes
        self._groups: dict[tuple[str, Metadata], _Group] = {}
        #: Nodes that answered ``Submit`` with UNIMPLEMENTED: until when they get plain calls.
        self._plain_until_s: dict[str, float] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._clock_s: Callable[[], float] = backends.clock_s

    def serves(self, address: str) -> bool:
        """Whether calls to ``address`` may ride in a ``Submit`` (it knows the method)."""
        until = self._plain_until_s.get(address)
        if until is None:
            return True
        if self._clock_s() < until:
            return False
        del self._plain_until_s[address]  # upgraded since? Ask again.
        return True

    async def ride(
        self,
        address: str,
        metadata: Metadata,
        op_field: int,
        request: bytes,
        deadline_s: float,
        ops: int = 1,
    ) -> Outcome:
        """Send one call in the next ``Submit`` of its group; its outcome.

        ``op_field``: the ``Operation`` field of a single call; 0 for a
        client's ``Submit`` of ``ops`` operations (at most ``max_ops``).
        Cancelled (the caller left, or its deadline passed), the call is left
        out of a ``Submit`` not yet sent; one already sent is not recalled."""
        key = (address, metadata)
        group = self._groups.get(key)
        if group is None:
            group = self._groups[key] = _Group(address, metadata)
        rider = _Rider(
            op_header(op_field, len(request)) if op_field else b"",
            request,
            ops,
            deadline_s,
            request_id.get(),
            client_ip.get(),
            asyncio.get_running_loop().create_future(),
        )
        group.waiting.append(rider)
        if group.in_flight < self.max_in_flight:
            group.in_flight += 1
            self._spawn(self._flush_loop(key, group), f"pq-submit-{address}")
        return await rider.future

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def stop(self) -> None:
        """Cancel ``Submit`` calls still in flight (their callers get CANCELLED)."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)

    async def _flush_loop(self, key: tuple[str, Metadata], group: _Group) -> None:
        """Send the group's waiting calls, a ``Submit`` at a time, until none wait."""
        try:
            while group.waiting:
                batch = self._take(group)
                if batch:
                    await self._send(group, batch)
        finally:
            group.in_flight -= 1
            if not group.in_flight and not group.waiting and self._groups.get(key) is group:
                del self._groups[key]

    def _take(self, group: _Group) -> list[_Rider]:
        """The next ``Submit``'s calls: those waiting, in arrival order, within its bounds."""
        batch: list[_Rider] = []
        size = ops = 0
        waiting = group.waiting
        while waiting:
            rider = waiting[0]
            if rider.future.done():  # its caller left before it was sent
                waiting.popleft()
                continue
            n = len(rider.header) + len(rider.request)
            if batch and (size + n > self.max_bytes or ops + rider.ops > self.max_ops):
                break
            waiting.popleft()
            batch.append(rider)
            size += n
            ops += rider.ops
        return batch

    async def _send(self, group: _Group, batch: list[_Rider]) -> None:
        """One ``Submit``; every rider's future resolved, whatever happens."""
        try:
            outcomes = await self._submit(group, batch)
        except BaseException as exc:
            for rider in batch:
                if not rider.future.done():
                    if isinstance(exc, asyncio.CancelledError):
                        rider.future.cancel()
                    else:
                        rider.future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            logger.error("a Submit to %s failed: %s", group.address, describe(exc), exc_info=exc)
            return
        for rider, outcome in zip(batch, outcomes, strict=True):
            if not rider.future.done():
                rider.future.set_result(outcome)

    def _hop_metadata(self, batch: list[_Rider]) -> Metadata:
        """A lone call's own request id and caller; a batch's fresh id, and the
        caller's IP if they share one."""
        first = batch[0]
        rid, ip = first.request_id, first.client_ip
        if len(batch) > 1:
            rid = new_request_id()
            if any(r.client_ip != ip for r in batch):
                ip = ""
            if logger.isEnabledFor(logging.DEBUG):
                logger.debug("Submit %s carries %s", rid, ",".join(r.request_id for r in batch))
        return own_metadata(self.backends.config.balancer_token, rid, ip)

    async def _submit(self, group: _Group, batch: list[_Rider]) -> list[Outcome]:
        address = group.address
        deadline_s = max(r.deadline_s for r in batch)  # the latest: each caller keeps its own
        payload = b"".join([part for r in batch for part in (r.header, r.request)])
        ops = sum(r.ops for r in batch)
        self.metrics.submit_ops.observe(ops)
        self.metrics.coalesced.inc(len(batch))
        call = self.backends.stub(address, SUBMIT)(
            payload,
            timeout=max(0.0, deadline_s - self._clock_s()),
            metadata=(*group.metadata, *self._hop_metadata(batch)),
        )
        try:
            answer = await self.backends.answer_unless_moved(
                call, address, self.backends.config.leader_stall_s
            )
        except grpc.aio.AioRpcError as exc:
            return [self._whole_failed(exc, address)] * len(batch)
        if answer is None:
            return [MOVED] * len(batch)
        try:
            results = split_results(answer)
            if len(results) != ops:
                raise FramingError(f"{len(results)} results for {ops} operations")
        except FramingError as exc:
            # A node bug, not a client's: nobody knows what ran.
            logger.error("the Submit answer of %s does not parse: %s", address, exc)
            return [_garbled(str(exc))] * len(batch)
        outcomes: list[Outcome] = []
        told = False
        at = 0
        for rider in batch:
            mine = results[at : at + rider.ops]
            at += rider.ops
            if not rider.header:  # a client's Submit: its results, as the node answers it
                outcomes.append(submit_response(hide_leaders(mine)[0]))
            elif mine[0].ok:
                outcomes.append(mine[0].response)
            else:
                outcomes.append(op_failed(mine[0].status))
            if not told:  # once per Submit, as for one call
                told = self._tell(address, mine)
        return outcomes

    def _tell(self, address: str, results: list[Result]) -> bool:
        """Tell the backends' picture a not-leader or unavailable operation
        (the first one), as a single call's failure tells it; whether one was."""
        for result in results:
            if result.ok:
                continue
            failed = op_failed(result.status)
            if failed.why == "not_leader":
                self.backends.not_leader(address, failed.leader_id)
                return True
            if failed.why is not None:
                self.backends.unreachable(address)
                return True
        return False

    def _whole_failed(self, exc: grpc.aio.AioRpcError, address: str) -> Outcome:
        code = exc.code()
        if code == grpc.StatusCode.UNIMPLEMENTED:
            logger.info("%s does not serve Submit: single calls go to it alone", address)
            self._plain_until_s[address] = self._clock_s() + PLAIN_RECHECK_S
            self.metrics.fallbacks.labels("unimplemented").inc()
            return PLAIN
        if code in _REFUSED_WHOLE:
            logger.debug("%s refused a Submit whole (%s): sending its calls alone", address, code)
            self.metrics.fallbacks.labels("refused").inc()
            return PLAIN
        why = why_failed(exc)
        if why == "not_leader":
            info = error_info(exc, NOT_LEADER) or {}
            leader = info.get("leader_id", "")
            self.backends.not_leader(address, int(leader) if leader.isdigit() else 0)
        elif why is not None:
            self.backends.unreachable(address)
        return WholeFailed(exc, why)


def hide_leaders(results: list[Result]) -> tuple[list[Result], OpFailed | None]:
    """``results`` with each NOT_LEADER one (it never ran; its status names a
    node the client may not reach) made NOT_TAKEN, so the client sends it
    again through the balancer; and the first NOT_LEADER failure, if any."""
    first: OpFailed | None = None
    out = results
    for i, result in enumerate(results):
        if result.ok:
            continue
        failed = op_failed(result.status)
        if failed.why != "not_leader":
            continue
        if first is None:
            first, out = failed, list(results)
        out[i] = _NOT_TAKEN_RESULT
    return out, first


def hide_leaders_in(answer: bytes) -> tuple[bytes, OpFailed | None]:
    """``hide_leaders`` for a whole ``SubmitResponse``'s bytes (the same bytes
    when no operation was answered NOT_LEADER)."""
    if NOT_LEADER.encode() not in answer:  # the common case: nothing to parse
        return answer, None
    try:
        results, first = hide_leaders(split_results(answer))
    except FramingError:
        return answer, None
    return (answer, None) if first is None else (submit_response(results), first)


def _garbled(why: str) -> OpFailed:
    return OpFailed(
        grpc.StatusCode.UNKNOWN,
        f"the leader's answer could not be read ({why}); the call may or may not have run",
        (),
        None,
    )
