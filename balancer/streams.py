"""Bidirectional streams (``Consume``, ``SubmitStream``) carried to the leader
as raw bytes, message for message.

A client's stream becomes one stream to the leader (no call per job): each
message the client sends is written on it as it came, and each message the
leader sends is handed back, in order, unparsed. The client's metadata goes
along as for a unary call (``balancer.hop``), and its deadline, if it set one
(a consumer's stream usually has none, and gets none). The client's stream
gets initial metadata as soon as the leader is picked: ``pq-leader``, the
leader's own address (look-aside: a client may open its next stream there);
a ``SubmitStream``'s, once the leader sent its own, which says whether it
took the stream (``pq-stream-open``): the SDK writes nothing before, so a
refusal is never raced by a write (grpc.aio would turn its status into
INTERNAL: grpc/grpc#36066). A leader silent for ``LEADER_OPEN_WAIT_S``
(a node from before, or a frozen one) leaves it out: the SDK then sends
its batches by call.

The client's stream ends as the leader's does: with its status, message and
trailers (a bad ``start``, UNAVAILABLE when the node drains or stops
leading). When the connection to the leader breaks, gRPC ends it with
UNAVAILABLE; when another node takes over while the old leader is silent (a
frozen leader, which cannot say so), the balancer ends it with UNAVAILABLE
itself (LEADER_MOVED); and when the balancer stops, too. A ``SubmitStream``
request unanswered for ``leader_stall_s`` makes the leader suspect, as a
call does (every node probed fast), so a frozen leader's successor is found
within about an election, not a probe interval. Nothing is lost:
leases outlive their stream (they expire and the jobs are delivered again)
and a consumer reconnects, through this balancer, to the new leader; the
SDK sends a ``SubmitStream``'s requests that never ran by ``Submit``, and
opens a new stream.

At most ``max_streams`` are carried at once; more are refused with
RESOURCE_EXHAUSTED and a retry hint (a ``SubmitStream``: NOT_TAKEN, so the
SDK sends its batches as ``Submit`` calls).
"""

from __future__ import annotations

import asyncio
import contextlib
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

SUBMIT_STREAM = "/pqueue.v1.Queue/SubmitStream"
#: How long a SubmitStream waits for the leader to say it took it (the
#: SDK's own wait, ``pqueue.submitstream.OPEN_WAIT_S``, is longer, though a
#: wait for a leader to be known may outlast it: the SDK then sends by call).
LEADER_OPEN_WAIT_S = 1.0

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
            full = f"this balancer carries its limit of {self.max_streams} streams"
            # A SubmitStream refused so ran nothing: NOT_TAKEN, and the SDK
            # sends its batch as a Submit call (a bare RESOURCE_EXHAUSTED
            # can also end a stream that ran something).
            refusal = (
                NotTakenError(full, retry_after_s=1.0, cause="STREAM_LIMIT")
                if route.method == SUBMIT_STREAM
                else ResourceExhaustedError(full, retry_after_s=1.0)
            )
            await context.abort_with_status(to_status(refusal))
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
        pump: asyncio.Task[None] | None = None
        stalls: asyncio.Task[None] | None = None
        # A SubmitStream's requests are each answered soon: one unanswered
        # for ``leader_stall_s`` makes the leader suspect, as a call does.
        answers = _Answers() if route.method == SUBMIT_STREAM else None
        watch = asyncio.create_task(
            self._watch(route, address, call, ended_by), name="pq-stream-watch"
        )
        try:
            # Look-aside: the client learns the leader's address at once. A
            # SubmitStream's leader says first whether it took the stream
            # (``pq-stream-open``, passed on; a refusal ends it with none),
            # and the client writes only then: the pump starts after.
            opened: Metadata = ()
            if route.method == SUBMIT_STREAM:
                # Bounded: a node from before never says (then the client
                # hears nothing of it, and sends by call).
                with contextlib.suppress(TimeoutError):
                    opened = passthrough(
                        await asyncio.wait_for(
                            asyncio.shield(call.initial_metadata()), LEADER_OPEN_WAIT_S
                        )
                    )
            await context.send_initial_metadata(
                (*self.backends.leader_metadata.get(address, ()), *opened)
            )
            if answers is not None:
                stalls = asyncio.create_task(self._stalls(answers), name="pq-stream-stalls")
            pump = asyncio.create_task(_pump(requests, call, answers), name="pq-stream-pump")
            while True:
                try:
                    message = await call.read()
                except asyncio.CancelledError:
                    if not ended_by:
                        raise  # the client left (or the server stops): not ours to answer
                    end = ended_by[0]
                    await context.abort_with_status(to_status(_ended_error(end, route)))
                    raise AssertionError("unreachable") from None  # abort raises
                if not isinstance(message, bytes):  # grpc.aio.EOF: the leader's side ended
                    break
                if answers is not None:
                    answers.answered()
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
            tasks = [task for task in (watch, pump, stalls) if task is not None]
            for task in tasks:
                task.cancel()
            if not call.done():
                call.cancel()
            await asyncio.wait(tasks)
            self.open -= 1
            self.metrics.streams_open.set(self.open)
            self.metrics.streams.labels(end).inc()

    async def _stalls(self, answers: _Answers) -> None:
        """Suspect the leader (probe every node fast) when a request has been
        out for ``leader_stall_s`` with no answer meanwhile; once per silence."""
        stall_s = self.backends.config.leader_stall_s
        while True:
            await answers.changed(until_out=True)
            seen = answers.total
            await asyncio.sleep(stall_s)
            if answers.out > 0 and answers.total == seen:
                logger.info("a stream's request has had no answer for %.2f s: probing", stall_s)
                self.backends.suspect_leader()
                await answers.changed(beyond=seen)  # an answer: it speaks again

    async def _watch(
        self,
        route: Route,
        address: str,
        call: grpc.aio.StreamStreamCall[bytes, bytes],
        ended_by: list[str],
    ) -> None:
        """Cancel the leader stream when another node leads, or the balancer
        stops. (A node that stops leading ends its streams itself within
        0.2 s, its status passed on; by the time a probe names another
        leader, one still open is most likely frozen.)"""
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


class _Answers:
    """A carried ``SubmitStream``'s requests out (each gets one answer)."""

    __slots__ = ("_changed", "out", "total")

    def __init__(self) -> None:
        self.out = 0
        #: Answers so far.
        self.total = 0
        self._changed = asyncio.Event()

    def sent(self) -> None:
        self.out += 1
        self._changed.set()

    def answered(self) -> None:
        self.out -= 1
        self.total += 1
        self._changed.set()

    async def changed(self, *, until_out: bool = False, beyond: int = -1) -> None:
        """Return once a request is out (``until_out``), or once more than
        ``beyond`` answers came."""
        while (until_out and self.out == 0) or self.total <= beyond:
            self._changed.clear()
            await self._changed.wait()


def _ended_error(end: str, route: Route) -> UnavailableError:
    if end == "leader_moved":
        what = (
            "requests out may or may not have been applied"
            if route.method == SUBMIT_STREAM
            else "unsettled jobs are delivered again when their leases expire"
        )
        return UnavailableError(
            f"the leader stopped answering and another took over; reconnect ({what})",
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


async def _pump(
    requests: AsyncIterator[bytes],
    call: grpc.aio.StreamStreamCall[Any, Any],
    answers: _Answers | None,
) -> None:
    """The client's messages onto the leader stream, then its half-close."""
    try:
        async for message in requests:
            if answers is not None:
                answers.sent()  # before: its answer may be read before the write returns
            await call.write(message)
        await call.done_writing()
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # the leader's side ended first: its status tells the client
        logger.debug("a stream's writes stopped: %s", describe(exc))
