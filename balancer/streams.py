"""``Consume`` streams carried to the leader as raw bytes, message for message.

A client's stream becomes one stream to the leader (no call per job): each
message the client sends is written on it as it came, and each message the
leader sends is handed back, in order, unparsed. The client's metadata goes
along as for a unary call (``balancer.hop``), and its deadline, if it set one
(a consumer's stream usually has none, and gets none). The client's stream
gets initial metadata as soon as the leader is picked: ``pq-leader``, the
leader's own address (look-aside: a client may open its next stream there).

The client's stream ends as the leader's does: with its status, message and
trailers (a bad ``start``, UNAVAILABLE when the node drains or stops
leading). When the connection to the leader breaks, gRPC ends it with
UNAVAILABLE; when another node takes over while the old leader is silent (a
frozen leader, which cannot say so), the balancer ends it with UNAVAILABLE
itself; and when the balancer stops, too. Nothing is lost: leases outlive
their stream (they expire and the jobs are delivered again) and a consumer
reconnects, through this balancer, to the new leader.

At most ``max_streams`` are carried at once; more are refused with
RESOURCE_EXHAUSTED and a retry hint.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc

from balancer.backends import Backends
from balancer.hop import Metadata, passthrough, relayed, relayed_failure
from balancer.metrics import BalancerMetrics
from balancer.routes import Route
from pqueue.errors import NotTakenError, ResourceExhaustedError, UnavailableError
from pqueue.wire.logs import describe
from pqueue.wire.status import to_status

logger = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[bytes, bytes]


class StreamProxy:
    """Carries bidirectional streams to the leader; ``close`` ends them all."""

    def __init__(self, backends: Backends, metrics: BalancerMetrics, max_streams: int) -> None:
        self.backends = backends
        self.metrics = metrics
        self.max_streams = max_streams
        self.open = 0
        self._closing = asyncio.Event()

    def close(self) -> None:
        """End every stream carried now, and refuse new ones (the balancer stops)."""
        self._closing.set()

    async def carry(
        self,
        route: Route,
        requests: AsyncIterator[bytes],
        context: Context,
        metadata: Metadata,
        timeout_s: float | None,
    ) -> AsyncIterator[bytes]:
        """The leader's messages for one client stream (see the module docstring)."""
        if self._closing.is_set():
            await context.abort_with_status(
                to_status(
                    NotTakenError(
                        "the balancer is stopping", retry_after_s=0.5, cause="BALANCER_STOPPING"
                    )
                )
            )
        if self.open >= self.max_streams:
            await context.abort_with_status(
                to_status(
                    ResourceExhaustedError(
                        f"this balancer carries its limit of {self.max_streams} streams",
                        retry_after_s=1.0,
                    )
                )
            )
        budget = self.backends.config.leader_wait_s
        if timeout_s is not None:
            budget = min(budget, 0.9 * timeout_s)
        # Counted from here: streams waiting for a leader take their place too.
        self.open += 1
        self.metrics.streams_open.set(self.open)
        try:
            address = await self.backends.wait_leader(max(0.0, budget))
            if address is None:
                await context.abort_with_status(
                    to_status(
                        NotTakenError("no leader is known", retry_after_s=0.5, cause="NO_LEADER")
                    )
                )
        except BaseException:
            self.open -= 1
            self.metrics.streams_open.set(self.open)
            raise
        assert address is not None
        self.backends.pool.backends[address].leader_calls += 1
        self.metrics.picks.labels(address, "leader").inc()
        stub: grpc.aio.StreamStreamMultiCallable[bytes, bytes] = self.backends.channels[
            address
        ].stream_stream(route.method)
        call: grpc.aio.StreamStreamCall[bytes, bytes] = stub(metadata=metadata, timeout=timeout_s)
        end = "client_left"
        ended_by: list[str] = []
        pump = asyncio.create_task(_pump(requests, call), name="pq-stream-pump")
        watch = asyncio.create_task(self._watch(address, call, ended_by), name="pq-stream-watch")
        try:
            # Look-aside: the client learns the leader's address at once (a
            # node sends a stream no initial metadata of its own).
            await context.send_initial_metadata(self.backends.leader_metadata.get(address, ()))
            while True:
                try:
                    message = await call.read()
                except asyncio.CancelledError:
                    if not ended_by:
                        raise  # the client left (or the server stops): not ours to answer
                    end = ended_by[0]
                    await context.abort_with_status(to_status(_ended_error(end)))
                    raise AssertionError("unreachable") from None  # abort raises
                if not isinstance(message, bytes):  # grpc.aio.EOF: the leader's side ended
                    break
                yield message
            code = await call.code()
            end = "ok" if code == grpc.StatusCode.OK else code.name
            if code != grpc.StatusCode.OK:
                await _pass_status(context, call, code, address)
            context.set_trailing_metadata(passthrough(await call.trailing_metadata()))
        except grpc.aio.AioRpcError as exc:
            end = exc.code().name
            await context.abort(exc.code(), exc.details() or "", relayed_failure(exc, address))
        finally:
            watch.cancel()
            pump.cancel()
            if not call.done():
                call.cancel()
            await asyncio.wait((watch, pump))
            self.open -= 1
            self.metrics.streams_open.set(self.open)
            self.metrics.streams.labels(end).inc()

    async def _watch(
        self, address: str, call: grpc.aio.StreamStreamCall[bytes, bytes], ended_by: list[str]
    ) -> None:
        """Cancel the leader stream when another node leads, or the balancer stops."""
        closing = asyncio.ensure_future(self._closing.wait())
        try:
            while not closing.done():
                updated = self.backends.next_update()
                leader = self.backends.pool.leader()
                if leader is not None and leader != address:
                    logger.info("a stream to %s ends: %s leads now", address, leader)
                    ended_by.append("leader_moved")
                    call.cancel()
                    return
                waiting = asyncio.ensure_future(updated.wait())
                try:
                    await asyncio.wait((waiting, closing), return_when=asyncio.FIRST_COMPLETED)
                finally:
                    waiting.cancel()
            ended_by.append("balancer_stopping")
            call.cancel()
        finally:
            closing.cancel()


def _ended_error(end: str) -> UnavailableError:
    if end == "leader_moved":
        return UnavailableError(
            "the leader stopped answering and another took over; reconnect "
            "(unsettled jobs are delivered again when their leases expire)",
            retry_after_s=0.1,
            reason="LEADER_MOVED",
        )
    return UnavailableError(
        "the balancer is stopping; reconnect", retry_after_s=0.1, reason="BALANCER_STOPPING"
    )


async def _pass_status(
    context: Context,
    call: grpc.aio.StreamStreamCall[bytes, bytes],
    code: grpc.StatusCode,
    address: str,
) -> None:
    """End the client's stream with the leader's status (its trailers passed on)."""
    details = await call.details() or ""
    trailers = passthrough(await call.trailing_metadata())
    await context.abort(code, details, relayed(code, details, trailers, address))


async def _pump(requests: AsyncIterator[bytes], call: grpc.aio.StreamStreamCall[Any, Any]) -> None:
    """The client's messages onto the leader stream, then its half-close."""
    try:
        async for message in requests:
            await call.write(message)
        await call.done_writing()
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # the leader's side ended first: its status tells the client
        logger.debug("a stream's writes stopped: %s", describe(exc))
