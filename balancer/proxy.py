"""The proxy: every public method forwarded as raw bytes, in one hop.

A ``grpc.GenericRpcHandler`` with no (de)serializers: request and response
bytes pass through untouched. The client's metadata goes along (plus
``pq-forwarded-by`` so the node answers rather than forwarding again), its
remaining deadline becomes the forwarded call's deadline, and the node's
status, details and trailers (rich error details, retry pushback) come back
as they were. See ``balancer.routes`` for where each call goes and when a
failed one is sent again. A call answered "ran nowhere" (not leader, not
taken: an election or a leader's handover under way) is sent again up to
``MAX_SENDS`` times in all, from the third send on only after the backends'
next probe round; a call that may have run is sent again at most once.

A leader's answer carries ``pq-leader`` in its trailers (and a ``Consume``
stream in its initial metadata): the leader's own address, which a client
may call directly (look-aside). The proxy stays for clients that do not.

Single-job writes, and clients' own ``Submit`` calls, ride to the leader in
``Submit`` calls shared with other callers (``balancer.coalesce``) unless
coalescing is off; each is answered, and resent, as if it had gone alone.
``Consume`` streams are carried by ``balancer.streams``.

A leader call still waiting when another node takes over (the old leader
froze, and has not said it drains: ``Backends.leader_moved``) is abandoned:
sent to the new leader when it may be sent again (as after a plain
UNAVAILABLE), else answered UNAVAILABLE at once (it may or may not have
been applied), instead of waiting out its deadline on a node that cannot
answer.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, NoReturn

import grpc

from balancer.backends import Backends
from balancer.coalesce import MOVED, PLAIN, Coalescer, OpFailed, WholeFailed, hide_leaders_in
from balancer.framing import FramingError, count_ops
from balancer.hop import (
    Metadata,
    node_cancelled,
    own_metadata,
    passthrough,
    relayed,
    relayed_failure,
    why_failed,
)
from balancer.routes import Kind, Route, route_for
from balancer.streams import StreamProxy
from pqueue.errors import NotTakenError, UnavailableError
from pqueue.wire.keys import DEFAULT_FORWARD_TIMEOUT_S
from pqueue.wire.observe import client_ip, request_id
from pqueue.wire.status import NOT_LEADER, error_info, to_status

logger = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[bytes, bytes]

__all__ = ["Metadata", "ProxyHandler", "passthrough"]

#: Method handlers kept (the public methods, and a few newer ones).
_MAX_HANDLERS = 256

#: Sends of one call at most. Resends past the first wait for the backends'
#: next change (a probe), so an election or handover a few probe rounds long
#: is ridden out instead of answered with an error the client must retry.
MAX_SENDS = 4


@dataclass
class _Sends:
    """One call's sends so far (past the first), and where they went."""

    count: int = 0
    #: An attempt may have run (a plain UNAVAILABLE or a node's CANCELLED, an
    #: abandoned call): the call is sent again after that at most once, and
    #: never answered "ran nowhere".
    unsure: bool = False
    tried: list[str] = field(default_factory=list)


class ProxyHandler(grpc.GenericRpcHandler):
    """Serves every method of the public services by forwarding it."""

    def __init__(self, backends: Backends) -> None:
        self.backends = backends
        self.metrics = backends.metrics
        config = backends.config
        self.retries = 0
        self._handlers: dict[str, grpc.RpcMethodHandler[bytes, bytes]] = {}
        self._picks: dict[tuple[str, Kind], Any] = {}
        #: None: coalescing is off; every call goes alone.
        self.coalescer = (
            Coalescer(backends, self.metrics, config.coalesce_in_flight)
            if config.coalesce
            else None
        )
        self.streams = StreamProxy(backends, self.metrics, config.max_streams)

    async def stop(self) -> None:
        """End carried streams and ``Submit`` calls still in flight."""
        self.streams.close()
        if self.coalescer is not None:
            await self.coalescer.stop()

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[bytes, bytes] | None:
        method = handler_call_details.method
        handler = self._handlers.get(method)
        if handler is None:
            route = route_for(method)
            if route is None:
                return None
            if route.streaming:
                handler = grpc.stream_stream_rpc_method_handler(
                    functools.partial(self._stream, route)
                )
            elif route.server_stream:
                handler = grpc.unary_stream_rpc_method_handler(
                    functools.partial(self._server_stream, route)
                )
            elif (route.op_field or route.merges) and self.coalescer is not None:
                handler = grpc.unary_unary_rpc_method_handler(
                    functools.partial(self._coalesced, route)
                )
            else:
                handler = grpc.unary_unary_rpc_method_handler(functools.partial(self._call, route))
            if len(self._handlers) < _MAX_HANDLERS:  # unknown names must not grow it forever
                self._handlers[method] = handler
        return handler

    async def _call(
        self, route: Route, request: bytes, context: Context, sends: _Sends | None = None
    ) -> bytes:
        """Forward one call (``pqueue.wire.observe`` counts, times and logs it).

        At most ``MAX_SENDS`` attempts (``sends``: those a ``Submit`` it rode
        in made already): another only when the last failed in a way
        ``_may_retry`` (or, for a leader that stopped answering,
        ``_may_resend``) allows and time is left.
        """
        kind = route.kind_of(request)
        metadata = self._hop_metadata(context)
        deadline = self._deadline(context)
        sends = sends or _Sends()
        while True:
            if sends.count >= 2:
                await self._settle(deadline)
            # (A read avoids the node that just failed it, not every one tried.)
            address = await self._target(kind, sends.tried[-1:], deadline)
            if address is None:
                await self._abort_no_target(context, kind)
            self._count(address, kind)
            call = self._send(route, request, address, metadata, deadline)
            try:
                response = await self._answer(route, request, call, address, kind)
            except grpc.aio.AioRpcError as exc:
                why = self._failed(exc, address, kind)
                if why is not None and self._may_retry(route, request, why, deadline, sends):
                    self._retried(address, why, sends)
                    logger.debug("%s to %s: %s, retrying", route.name, address, why)
                    continue
                await self._abort_failed(context, exc, why, address, sends)
            if response is None:  # another node leads now; the call was cancelled
                if self._may_resend(route, request, deadline, sends):
                    self._retried(address, "leader_moved", sends)
                    continue
                await self._abort_leader_moved(context)
            await self._pass_back(context, call, kind, address)
            if route.merges:  # per-operation NOT_LEADER: no node address goes back
                response, moved = hide_leaders_in(response)
                if moved is not None:
                    self.backends.not_leader(address, moved.leader_id)
            return response

    async def _coalesced(self, route: Route, request: bytes, context: Context) -> bytes:
        """A single-job write or a client's ``Submit``, sent in a ``Submit``
        with others of its group (``balancer.coalesce``) and answered as if it
        had gone alone: the same resend rules, per call, and its own deadline."""
        assert self.coalescer is not None
        ops = 1
        if route.merges:  # a client's Submit: as it is, if it holds only operations
            try:
                ops = count_ops(request)
            except FramingError:
                ops = 0
            if not 0 < ops <= self.coalescer.max_ops:
                return await self._call(route, request, context)  # the node says why
        metadata = passthrough(context.invocation_metadata())
        deadline = self._deadline(context)
        sends = _Sends()
        while True:
            if sends.count >= 2:
                await self._settle(deadline)
            address = await self._target(Kind.LEADER, sends.tried, deadline)
            if address is None:
                await self._abort_no_target(context, Kind.LEADER)
            if not self.coalescer.serves(address):
                return await self._call(route, request, context, sends)
            self._count(address, Kind.LEADER)
            # At the caller's deadline gRPC cancels this call, which leaves the
            # Submit if it has not gone yet; its Submit ends by the latest one.
            outcome = await self.coalescer.ride(
                address, metadata, route.op_field, request, deadline, ops
            )
            if isinstance(outcome, bytes):
                leader = self.backends.leader_metadata.get(address)
                if leader:  # look-aside: the client may call the leader itself
                    context.set_trailing_metadata(leader)
                return outcome
            if outcome is PLAIN:  # nothing of it ran: it goes alone
                return await self._call(route, request, context, sends)
            if outcome is MOVED:
                if self._may_resend(route, request, deadline, sends):
                    self._retried(address, "leader_moved", sends)
                    continue
                await self._abort_leader_moved(context)
            assert isinstance(outcome, OpFailed | WholeFailed)
            why = outcome.why
            if why is not None and self._may_retry(route, request, why, deadline, sends):
                self._retried(address, why, sends)
                continue
            if isinstance(outcome, WholeFailed):
                await self._abort_failed(context, outcome.error, why, address, sends)
            await self._abort_ran_nowhere(context, why, sends)
            await context.abort(
                outcome.code,
                outcome.message,
                relayed(outcome.code, outcome.message, outcome.trailers, address),
            )

    async def _stream(
        self, route: Route, requests: AsyncIterator[bytes], context: Context
    ) -> AsyncIterator[bytes]:
        """A ``Consume`` stream, carried to the leader (``balancer.streams``)."""
        metadata = self._hop_metadata(context)
        async for message in self.streams.carry(
            route, requests, context, metadata, context.time_remaining()
        ):
            yield message

    async def _server_stream(
        self, route: Route, request: bytes, context: Context
    ) -> AsyncIterator[bytes]:
        """A ``Watch`` stream, carried to one node picked as for a read, its
        messages and status passed on unparsed. Not retried: a broken stream
        ends UNAVAILABLE and the watcher resumes from its last index."""
        metadata = self._hop_metadata(context)
        budget = self.backends.config.leader_wait_s
        address = await self.backends.wait_read((), budget)
        if address is None:
            await self._abort_no_target(context, Kind.READ)
        assert address is not None
        self._count(address, Kind.READ)
        stub: grpc.aio.UnaryStreamMultiCallable[bytes, bytes] = self.backends.channels[
            address
        ].unary_stream(route.method)
        call = stub(request, metadata=metadata, timeout=context.time_remaining())
        try:
            async for message in call:
                yield message
        except grpc.aio.AioRpcError as exc:
            await context.abort(exc.code(), exc.details() or "", relayed_failure(exc, address))
        finally:
            call.cancel()

    def _hop_metadata(self, context: Context) -> Metadata:
        """The caller's metadata for the node, plus this hop's own keys (the
        request id and the caller's IP, as the observer took them)."""
        return (
            *passthrough(context.invocation_metadata()),
            *own_metadata(self.backends.config.balancer_token, request_id.get(), client_ip.get()),
        )

    def _deadline(self, context: Context) -> float:
        """When the call must be answered, on the backends' clock."""
        remaining = context.time_remaining()
        # Never unbounded: a caller without a deadline still gets one.
        return self.backends.clock_s() + (
            remaining if remaining is not None else DEFAULT_FORWARD_TIMEOUT_S
        )

    def _send(
        self, route: Route, request: bytes, address: str, metadata: Metadata, deadline: float
    ) -> grpc.aio.UnaryUnaryCall[bytes, bytes]:
        """Start one attempt at ``address`` with the time left."""
        return self.backends.stub(address, route.method)(
            request,
            timeout=max(0.0, deadline - self.backends.clock_s()),
            metadata=metadata,
        )

    async def _answer(
        self,
        route: Route,
        request: bytes,
        call: grpc.aio.UnaryUnaryCall[bytes, bytes],
        address: str,
        kind: Kind,
    ) -> bytes | None:
        """The attempt's answer (raises its error), or None: the leader stopped
        answering and another took over (the call was cancelled)."""
        if kind is Kind.LEADER:
            stall_s = self.backends.config.leader_stall_s + route.waits_s(request)
            return await self.backends.answer_unless_moved(call, address, stall_s)
        response: bytes = await call
        return response

    def _failed(self, exc: grpc.aio.AioRpcError, address: str, kind: Kind) -> str | None:
        """Why the attempt failed (see ``hop.why_failed``), told to the backends' picture."""
        why = why_failed(exc)
        if why == "not_leader":
            info = error_info(exc, NOT_LEADER) or {}
            self.backends.not_leader(address, int(info.get("leader_id") or 0))
        elif why is not None and kind is Kind.LEADER:
            self.backends.unreachable(address)
        elif why is not None:
            self.backends.kick()
        return why

    def _may_retry(
        self, route: Route, request: bytes, why: str, deadline: float, sends: _Sends
    ) -> bool:
        """Whether an attempt that failed for ``why`` is sent again: one that
        ran nowhere while sends are left, one that may have run (a plain
        UNAVAILABLE, a node's CANCELLED) only once and only if ``route``
        allows it."""
        if sends.count + 1 >= MAX_SENDS or deadline <= self.backends.clock_s():
            return False
        if why in ("not_leader", "not_taken"):
            return True
        return why == "unreachable" and not sends.unsure and route.retry_unavailable(request)

    def _may_resend(self, route: Route, request: bytes, deadline: float, sends: _Sends) -> bool:
        """Whether an attempt abandoned on a moved leader is sent again."""
        return (
            sends.count + 1 < MAX_SENDS
            and not sends.unsure
            and route.retry_unavailable(request)
            and deadline > self.backends.clock_s()
        )

    def _retried(self, address: str, why: str, sends: _Sends) -> None:
        sends.count += 1
        sends.unsure = sends.unsure or why in ("unreachable", "leader_moved")
        sends.tried.append(address)
        self.retries += 1
        self.metrics.retries.labels(address, why).inc()

    async def _settle(self, deadline: float) -> None:
        """Before a third send or later: wait for the backends' next change
        (probes run fast after a failed leader call), at most one fast probe
        interval and never past a tenth of the time left. (A node's retry
        hint is not waited out: the call goes wherever the probes say leads.)"""
        remaining = deadline - self.backends.clock_s()
        wait_s = min(self.backends.config.fast_probe_interval_s, 0.1 * remaining)
        if wait_s <= 0:
            return
        self.backends.kick()
        try:
            async with asyncio.timeout(wait_s):
                await self.backends.next_update().wait()
        except TimeoutError:
            pass

    async def _abort_no_target(self, context: Context, kind: Kind) -> NoReturn:
        what, cause = (
            ("no leader is known", "NO_LEADER")
            if kind is Kind.LEADER
            else ("no backend is serving", "NO_BACKEND")
        )
        await context.abort_with_status(
            to_status(NotTakenError(what, retry_after_s=0.5, cause=cause))
        )

    async def _abort_leader_moved(self, context: Context) -> NoReturn:
        await context.abort_with_status(
            to_status(
                UnavailableError(
                    "the leader stopped answering and another took over; "
                    "the call may or may not have been applied",
                    retry_after_s=0.1,
                    reason="LEADER_MOVED",
                )
            )
        )

    async def _abort_failed(
        self,
        context: Context,
        exc: grpc.aio.AioRpcError,
        why: str | None,
        address: str,
        sends: _Sends,
    ) -> NoReturn:
        """Answer the client with the node's failure (its metadata passed on)."""
        await self._abort_ran_nowhere(context, why, sends)
        initial = passthrough(exc.initial_metadata())
        if initial:
            await context.send_initial_metadata(initial)
        code, details = node_cancelled(exc)
        trailers = passthrough(exc.trailing_metadata())
        await context.abort(code, details, relayed(code, details, trailers, address))

    async def _abort_ran_nowhere(self, context: Context, why: str | None, sends: _Sends) -> None:
        """For a last send that ran nowhere (``why``), the client's answer:
        UNAVAILABLE, outcome unknown, if an earlier send may have run; else,
        for a not-leader one, NOT_TAKEN "try again", never a node address the
        client may not reach. Returns for any other ``why``."""
        if why not in ("not_leader", "not_taken"):
            return
        if sends.unsure:
            await context.abort_with_status(
                to_status(
                    UnavailableError(
                        "an earlier send of this call met a node that did not answer "
                        "(or cancelled it) and the last was not taken; it may or may "
                        "not have been applied",
                        retry_after_s=0.2,
                        reason="LEADER_MOVED",
                    )
                )
            )
        if why == "not_leader":
            await context.abort_with_status(
                to_status(
                    NotTakenError(
                        "the leader moved; try again", retry_after_s=0.2, cause="LEADER_MOVED"
                    )
                )
            )

    async def _pass_back(
        self,
        context: Context,
        call: grpc.aio.UnaryUnaryCall[bytes, bytes],
        kind: Kind,
        address: str,
    ) -> None:
        """Hand the node's initial and trailing metadata on to the client; a
        leader's answer also names the leader (``pq-leader``, look-aside)."""
        initial = passthrough(await call.initial_metadata())
        if initial:
            await context.send_initial_metadata(initial)
        trailers = passthrough(await call.trailing_metadata())
        if kind is Kind.LEADER:
            trailers = (*trailers, *self.backends.leader_metadata.get(address, ()))
        context.set_trailing_metadata(trailers)

    async def _target(self, kind: Kind, tried: list[str], deadline: float) -> str | None:
        """Where to send: waits (within the deadline) while nothing fits."""
        # Keep a tenth of the time left to say why, rather than time out.
        remaining = deadline - self.backends.clock_s()
        budget = min(self.backends.config.leader_wait_s, 0.9 * remaining)
        if kind is Kind.READ:
            return await self.backends.wait_read(tuple(tried), max(0.0, budget))
        return await self.backends.wait_leader(max(0.0, budget))

    def _count(self, address: str, kind: Kind) -> None:
        if kind is Kind.LEADER:
            self.backends.pool.backends[address].leader_calls += 1
        child = self._picks.get((address, kind))
        if child is None:  # ``labels()`` is not free; backends and kinds are few
            child = self._picks[(address, kind)] = self.metrics.picks.labels(address, kind.value)
        child.inc()
