"""The proxy: every public method forwarded as raw bytes, in one hop.

A ``grpc.GenericRpcHandler`` with no (de)serializers: request and response
bytes pass through untouched. The client's metadata goes along (plus
``pq-forwarded-by`` so the node answers rather than forwarding again), its
remaining deadline becomes the forwarded call's deadline, and the node's
status, details and trailers (rich error details, retry pushback) come back
as they were. See ``balancer.routes`` for where each call goes and when a
failed one is sent a second time; a call is sent at most twice.

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
from typing import Any, NoReturn

import grpc

from balancer.backends import BALANCER_ID, Backends
from balancer.routes import Kind, Route, route_for
from pqueue.errors import NotTakenError, UnavailableError
from pqueue.wire.keys import (
    DEFAULT_FORWARD_TIMEOUT_S,
    FORWARDED_FOR_KEY,
    FORWARDED_KEY,
    FORWARDER_TOKEN_KEY,
    REQUEST_ID_KEY,
)
from pqueue.wire.observe import hop_metadata
from pqueue.wire.status import NOT_LEADER, NOT_TAKEN, error_info, to_status
from pqueue.wire.tokens import current_token

logger = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[bytes, bytes]
Metadata = tuple[tuple[str, str | bytes], ...]

#: Metadata that belongs to one hop, not to the call.
_HOP_KEYS = frozenset(
    (
        "user-agent",
        "te",
        "content-type",
        "host",
        FORWARDED_KEY,
        REQUEST_ID_KEY,
        FORWARDED_FOR_KEY,
        FORWARDER_TOKEN_KEY,
    )
)
#: Of gRPC's own keys, those that carry the call's meaning and must pass.
_GRPC_KEYS_KEPT = frozenset(("grpc-status-details-bin", "grpc-retry-pushback-ms"))


def passthrough(metadata: Any) -> Metadata:
    """Metadata worth carrying to the next hop (reserved and hop keys left out)."""
    kept: list[tuple[str, str | bytes]] = []
    for key, value in metadata or ():
        if key in _HOP_KEYS or key.startswith(":"):
            continue
        if key.startswith("grpc-") and key not in _GRPC_KEYS_KEPT:
            continue
        kept.append((key, value))
    return tuple(kept)


#: Method handlers kept (the public methods, and a few newer ones).
_MAX_HANDLERS = 256


def _why(exc: grpc.aio.AioRpcError) -> str | None:
    """Why a call failed, if the proxy may act on it."""
    code = exc.code()
    if code == grpc.StatusCode.FAILED_PRECONDITION and error_info(exc, NOT_LEADER) is not None:
        return "not_leader"
    if code == grpc.StatusCode.UNAVAILABLE:
        return "not_taken" if error_info(exc, NOT_TAKEN) is not None else "unreachable"
    return None


class ProxyHandler(grpc.GenericRpcHandler):
    """Serves every method of the public services by forwarding it."""

    def __init__(self, backends: Backends) -> None:
        self.backends = backends
        self.metrics = backends.metrics
        self.retries = 0
        self._handlers: dict[str, grpc.RpcMethodHandler[bytes, bytes]] = {}

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[bytes, bytes] | None:
        method = handler_call_details.method
        handler = self._handlers.get(method)
        if handler is None:
            route = route_for(method)
            if route is None:
                return None
            handler = grpc.unary_unary_rpc_method_handler(functools.partial(self._call, route))
            if len(self._handlers) < _MAX_HANDLERS:  # unknown names must not grow it forever
                self._handlers[method] = handler
        return handler

    async def _call(self, route: Route, request: bytes, context: Context) -> bytes:
        """Forward one call (``pqueue.wire.observe`` counts, times and logs it).

        At most two attempts: a second only when the first failed in a way
        ``_may_retry`` (or, for a leader that stopped answering,
        ``_may_resend``) allows and time is left.
        """
        kind = route.kind_of(request)
        metadata = self._hop_metadata(context)
        deadline = self._deadline(context)
        tried: list[str] = []
        for attempt in range(2):
            address = await self._target(kind, tried, deadline)
            if address is None:
                await self._abort_no_target(context, kind)
            self._count(address, kind)
            call = self._send(route, request, address, metadata, deadline)
            try:
                response = await self._answer(route, request, call, address, kind)
            except grpc.aio.AioRpcError as exc:
                why = self._failed(exc, address, kind)
                if (
                    attempt == 0
                    and why is not None
                    and self._may_retry(route, request, why, deadline)
                ):
                    self._retried(address, why)
                    logger.debug("%s to %s: %s, retrying", route.name, address, why)
                    tried.append(address)
                    continue
                await self._abort_failed(context, exc, why)
            if response is None:  # another node leads now; the call was cancelled
                if attempt == 0 and self._may_resend(route, request, deadline):
                    self._retried(address, "leader_moved")
                    tried.append(address)
                    continue
                await self._abort_leader_moved(context)
            await self._pass_back(context, call)
            return response
        raise AssertionError("unreachable: the second attempt returns or aborts")

    def _hop_metadata(self, context: Context) -> Metadata:
        """The caller's metadata for the node, plus this hop's own keys."""
        # The balancer's own token proves to the node that it is a hop, so the
        # node believes the caller's IP it passes on (a client's claim it strips).
        hop_token = current_token(self.backends.config.balancer_token)
        return (
            *passthrough(context.invocation_metadata()),
            (FORWARDED_KEY, BALANCER_ID),
            *hop_metadata(),  # the request id and the caller's IP, as the observer took them
            *(((FORWARDER_TOKEN_KEY, hop_token),) if hop_token else ()),
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
        stub: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = self.backends.channels[
            address
        ].unary_unary(route.method)
        return stub(
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
            return await self._unless_leader_moves(call, address, stall_s)
        response: bytes = await call
        return response

    def _failed(self, exc: grpc.aio.AioRpcError, address: str, kind: Kind) -> str | None:
        """Why the attempt failed (see ``_why``), told to the backends' picture."""
        why = _why(exc)
        if why == "not_leader":
            info = error_info(exc, NOT_LEADER) or {}
            self.backends.not_leader(address, int(info.get("leader_id") or 0))
        elif why is not None and kind is Kind.LEADER:
            self.backends.unreachable(address)
        elif why is not None:
            self.backends.kick()
        return why

    def _may_retry(self, route: Route, request: bytes, why: str, deadline: float) -> bool:
        """Whether a first attempt that failed for ``why`` is sent again."""
        again = why in ("not_leader", "not_taken") or (
            why == "unreachable" and route.retry_unavailable(request)
        )
        return again and deadline > self.backends.clock_s()

    def _may_resend(self, route: Route, request: bytes, deadline: float) -> bool:
        """Whether a first attempt abandoned on a moved leader is sent again."""
        return route.retry_unavailable(request) and deadline > self.backends.clock_s()

    def _retried(self, address: str, why: str) -> None:
        self.retries += 1
        self.metrics.retries.labels(address, why).inc()

    async def _abort_no_target(self, context: Context, kind: Kind) -> NoReturn:
        what = "no leader is known" if kind is Kind.LEADER else "no backend is serving"
        await context.abort_with_status(to_status(NotTakenError(what, retry_after_s=0.5)))

    async def _abort_leader_moved(self, context: Context) -> NoReturn:
        await context.abort_with_status(
            to_status(
                UnavailableError(
                    "the leader stopped answering and another took over; "
                    "the call may or may not have been applied",
                    retry_after_s=0.1,
                )
            )
        )

    async def _abort_failed(
        self, context: Context, exc: grpc.aio.AioRpcError, why: str | None
    ) -> NoReturn:
        """Answer the client with the node's failure (its metadata passed on)."""
        if why == "not_leader":
            # The leader moved twice within one call. Do not hand the
            # client a node address it may not reach: say try again.
            await context.abort_with_status(
                to_status(NotTakenError("the leader moved; try again", retry_after_s=0.2))
            )
        initial = passthrough(exc.initial_metadata())
        if initial:
            await context.send_initial_metadata(initial)
        await context.abort(exc.code(), exc.details() or "", passthrough(exc.trailing_metadata()))

    async def _pass_back(
        self, context: Context, call: grpc.aio.UnaryUnaryCall[bytes, bytes]
    ) -> None:
        """Hand the node's initial and trailing metadata on to the client."""
        initial = passthrough(await call.initial_metadata())
        if initial:
            await context.send_initial_metadata(initial)
        context.set_trailing_metadata(passthrough(await call.trailing_metadata()))

    async def _unless_leader_moves(
        self, call: grpc.aio.UnaryUnaryCall[bytes, bytes], address: str, stall_s: float
    ) -> bytes | None:
        """The call's answer (or its error), or None, the call cancelled, once it
        waited ``stall_s`` and another node than ``address`` leads (a frozen leader)."""
        answer = asyncio.ensure_future(call)
        moved = asyncio.ensure_future(self.backends.leader_moved(address, stall_s))
        try:
            await asyncio.wait((answer, moved), return_when=asyncio.FIRST_COMPLETED)
        finally:
            moved.cancel()
            if not answer.done():
                call.cancel()
                answer.cancel()
            await asyncio.wait((answer, moved))
        if answer.cancelled():
            logger.info("leader %s did not answer; %s leads now", address, moved.result())
            return None
        return answer.result()

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
        self.metrics.picks.labels(address, kind.value).inc()
