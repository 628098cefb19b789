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
from typing import Any

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
        """Forward one call (``pqueue.wire.observe`` counts, times and logs it)."""
        kind = route.kind_of(request)
        # The balancer's own token proves to the node that it is a hop, so the
        # node believes the caller's IP it passes on (a client's claim it strips).
        hop_token = current_token(self.backends.config.balancer_token)
        metadata = (
            *passthrough(context.invocation_metadata()),
            (FORWARDED_KEY, BALANCER_ID),
            *hop_metadata(),  # the request id and the caller's IP, as the observer took them
            *(((FORWARDER_TOKEN_KEY, hop_token),) if hop_token else ()),
        )
        remaining = context.time_remaining()
        # Never unbounded: a caller without a deadline still gets one.
        deadline = self.backends.clock_s() + (
            remaining if remaining is not None else DEFAULT_FORWARD_TIMEOUT_S
        )
        tried: list[str] = []
        for attempt in range(2):
            address = await self._target(kind, tried, deadline)
            if address is None:
                what = "no leader is known" if kind is Kind.LEADER else "no backend is serving"
                await context.abort_with_status(to_status(NotTakenError(what, retry_after_s=0.5)))
            assert address is not None
            self._count(address, kind)
            stub: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = self.backends.channels[
                address
            ].unary_unary(route.method)
            call = stub(
                request,
                timeout=max(0.0, deadline - self.backends.clock_s()),
                metadata=metadata,
            )
            try:
                if kind is Kind.LEADER:
                    stall_s = self.backends.config.leader_stall_s + route.waits_s(request)
                    answer = await self._unless_leader_moves(call, address, stall_s)
                    if answer is None:  # another node leads now; the call was cancelled
                        if (
                            attempt == 0
                            and route.retry_unavailable(request)
                            and deadline > self.backends.clock_s()
                        ):
                            self.retries += 1
                            self.metrics.retries.labels(address, "leader_moved").inc()
                            tried.append(address)
                            continue
                        await context.abort_with_status(
                            to_status(
                                UnavailableError(
                                    "the leader stopped answering and another took over; "
                                    "the call may or may not have been applied",
                                    retry_after_s=0.1,
                                )
                            )
                        )
                    assert answer is not None
                    response: bytes = answer
                else:
                    response = await call
            except grpc.aio.AioRpcError as exc:
                why = _why(exc)
                if why == "not_leader":
                    info = error_info(exc, NOT_LEADER) or {}
                    self.backends.not_leader(address, int(info.get("leader_id") or 0))
                elif why is not None and kind is Kind.LEADER:
                    self.backends.unreachable(address)
                elif why is not None:
                    self.backends.kick()
                again = why in ("not_leader", "not_taken") or (
                    why == "unreachable" and route.retry_unavailable(request)
                )
                if attempt == 0 and again and deadline > self.backends.clock_s():
                    assert why is not None
                    self.retries += 1
                    self.metrics.retries.labels(address, why).inc()
                    logger.debug("%s to %s: %s, retrying", route.name, address, why)
                    tried.append(address)
                    continue
                if why == "not_leader":
                    # The leader moved twice within one call. Do not hand the
                    # client a node address it may not reach: say try again.
                    await context.abort_with_status(
                        to_status(NotTakenError("the leader moved; try again", retry_after_s=0.2))
                    )
                initial = passthrough(exc.initial_metadata())
                if initial:
                    await context.send_initial_metadata(initial)
                await context.abort(
                    exc.code(), exc.details() or "", passthrough(exc.trailing_metadata())
                )
            initial = passthrough(await call.initial_metadata())
            if initial:
                await context.send_initial_metadata(initial)
            context.set_trailing_metadata(passthrough(await call.trailing_metadata()))
            return response
        raise AssertionError("unreachable: the second attempt returns or aborts")

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
