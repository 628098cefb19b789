"""The shell around the pure ``Pool``: channels, probe loops, health watches.

Each backend has one channel (shared by the proxy and the probes), one
``_probe_loop`` polling ``Admin.NodeStatus`` every ``probe_interval_s`` (or
every ``fast_probe_interval_s`` while no leader is known) and one
``_health_loop`` holding a ``grpc.health.v1.Health/Watch`` stream, so a
node that starts draining, or whose connection drops (``kill -9``), is
ejected at once rather than after missed probes. A node that stops
answering without closing its connection (``SIGSTOP``) is ejected when its
probes fail ``eject_after_failures`` times or its report expires.

A frozen *leader* is noticed sooner, within about one election timeout: a
leader call unanswered for ``leader_stall_s``, or a failed probe of the
leader, makes every node be probed fast for ``suspect_probe_s``; as soon as
another node claims leadership with a higher ballot, ``leader_moved`` wakes
the calls still waiting on the old one (``balancer.proxy`` abandons them).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Coroutine
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from balancer.config import BalancerConfig
from balancer.metrics import BalancerMetrics
from balancer.pool import Pool, Report
from pqueue.v1 import queue_pb2 as pb
from pqueue.v1 import queue_pb2_grpc as pbg
from pqueue.wire import channels
from pqueue.wire.keys import AUTHORIZATION_KEY, CLUSTER_KEY, FORWARDED_KEY, LEADER_KEY
from pqueue.wire.logs import describe
from pqueue.wire.tls import channel as tls_channel
from pqueue.wire.tokens import current_token

logger = logging.getLogger(__name__)

#: What the balancer calls itself in ``pq-forwarded-by`` (nodes then never
#: forward its calls: one hop, and a not-leader answer comes back to it).
BALANCER_ID = "balancer"
#: Method callables kept, over all backends.
_MAX_STUBS = 1024


def report_of(status: pb.NodeStatusResponse) -> Report:
    """The pool's view of a node status."""
    load = status.load
    return Report(
        node_id=status.node_id,
        serving=not status.not_serving,
        is_leader=status.role == "leader",
        ballot_round=status.ballot_round,
        leader_id=status.leader_id,
        cpu_utilization=load.cpu_utilization,
        in_flight_calls=load.in_flight_calls,
        pending_proposals=status.pending,
        apply_lag_entries=load.apply_lag_entries,
        applied_index=status.applied_index,
        ready_jobs=load.ready_jobs,
    )


def backend_channel_options(probe_interval_s: float) -> list[tuple[str, int]]:
    """Message limits as the nodes have them; reconnects as fast as probes.

    gRPC's default reconnect backoff grows to 120 s, and while it waits,
    calls and probes fail without trying: a node back from a restart (maybe
    the new leader) would stay unreachable for minutes. Keepalive pings
    find a silently dead connection (the health stream would hang).
    """
    return channels.channel_options(
        watched=True, max_reconnect_backoff_ms=max(100, int(probe_interval_s * 1000))
    )


class Backends:
    """The backends, their probes and the pool's verdicts. ``start``/``stop``."""

    def __init__(
        self,
        config: BalancerConfig,
        metrics: BalancerMetrics,
        clock_s: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.clock_s = clock_s
        self.pool = Pool(list(config.backends), random.Random(config.seed), config.pool)
        self.channels: dict[str, grpc.aio.Channel] = {}
        self._stubs: dict[tuple[str, str], tuple[grpc.aio.Channel, Any]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._kick = asyncio.Event()
        self._updated = asyncio.Event()
        self._leader: str | None = None
        #: Probe fast until then: the leader may be frozen.
        self._suspect_until_s = 0.0
        #: By backend: the metadata naming it to clients as the leader
        #: (``pq-leader``, its own address as its peers know it, and
        #: ``pq-cluster``, its cluster id, from its probes), which leader
        #: calls carry back; empty for a node that reports no address (it
        #: runs alone).
        self.leader_metadata: dict[str, tuple[tuple[str, str], ...]] = {}

    def probe_metadata(self) -> tuple[tuple[str, str], ...]:
        """What a probe carries: the probe token, else the balancer's, as its
        file holds it *now*. Read once at start, a rotated token was never
        used: once the first one expired every probe was refused, and every
        node ejected."""
        token = current_token(self.config.probe_token) or current_token(self.config.balancer_token)
        return (
            (FORWARDED_KEY, BALANCER_ID),
            *(((AUTHORIZATION_KEY, f"Bearer {token}"),) if token else ()),
        )

    def _announce(self, address: str, advertised: str, cluster_id: str) -> None:
        """Keep the ``pq-leader`` metadata of ``address`` (a constant tuple,
        made again only when the node reports another address or cluster),
        with ``pq-cluster`` when the node reports its cluster (an older
        node does not: its clients look aside unchecked, as before)."""
        metadata: tuple[tuple[str, str], ...] = ()
        if advertised:
            metadata = ((LEADER_KEY, advertised),)
            if cluster_id:
                metadata += ((CLUSTER_KEY, cluster_id),)
        if self.leader_metadata.get(address) != metadata:
            self.leader_metadata[address] = metadata

    def stub(self, address: str, method: str) -> grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]:
        """The raw-bytes callable of ``method`` on ``address``'s channel (kept:
        building one for every call costs)."""
        channel = self.channels[address]
        found = self._stubs.get((address, method))
        if found is None or found[0] is not channel:
            found = (channel, channel.unary_unary(method))
            if len(self._stubs) < _MAX_STUBS:  # names a client made up must not grow it forever
                self._stubs[(address, method)] = found
        stub: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = found[1]
        return stub

    async def start(self) -> None:
        """Open channels and start probing."""
        for address in self.config.backends:
            self.channels[address] = tls_channel(
                address,
                self.config.backend_tls,
                backend_channel_options(self.config.probe_interval_s),
            )
            self._spawn(self._probe_loop(address), f"pq-probe-{address}")
            self._spawn(self._health_loop(address), f"pq-health-{address}")
        self._spawn(self._refresh_loop(), "pq-refresh")

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._on_task_done)

    def _on_task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            logger.error("%s died: %s", task.get_name(), describe(exc), exc_info=exc)

    async def stop(self) -> None:
        """Stop probing and close channels."""
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks))
        for channel in self.channels.values():
            await channel.close()
        self.channels = {}

    # ------------------------------------------------------------ verdicts

    def _changed(self) -> None:
        """After every pool input: log and count ejections, wake waiters."""
        for address, ejected in self.pool.changes:
            b = self.pool.backends[address]
            node = b.report.node_id if b.report else "?"
            ballot = b.report.ballot_round if b.report else "?"
            if ejected:
                self.metrics.ejections.labels(address).inc()
                logger.info(
                    "backend %s (node %s, ballot round %s) ejected: %s",
                    address,
                    node,
                    ballot,
                    b.last_error or "not serving or report expired",
                )
            else:
                logger.info(
                    "backend %s (node %s, ballot round %s) %s",
                    address,
                    node,
                    ballot,
                    "back: ramping up" if b.ejections else "up",
                )
        self.pool.changes.clear()
        leader = self.pool.leader()
        if leader != self._leader:
            self._leader = leader
            r = self.pool.backends[leader].report if leader else None
            logger.info(
                "writes now go to %s (node %s, ballot round %s)",
                leader or "nobody: no leader known",
                r.node_id if r else "?",
                r.ballot_round if r else "?",
            )
        for address, b in self.pool.backends.items():
            self.metrics.weight.labels(address).set(b.weight)
            self.metrics.up.labels(address).set(0 if b.ejected else 1)
            self.metrics.leader.labels(address).set(1 if address == leader else 0)
            self.metrics.load.labels(address).set(b.load)
        updated, self._updated = self._updated, asyncio.Event()
        updated.set()

    def kick(self) -> None:
        """Probe every backend now (a call failed: who leads, who is up?)."""
        self._kick.set()

    def not_leader(self, address: str, leader_id: int) -> None:
        """A backend answered not-leader, naming ``leader_id`` (0: unknown)."""
        self.pool.on_not_leader(address, leader_id, self.clock_s())
        self._changed()

    def unreachable(self, address: str) -> None:
        """A call to ``address`` failed without an answer, or it took nothing."""
        self.pool.on_unreachable(address, self.clock_s())
        self._changed()
        self.kick()

    def suspect_leader(self) -> None:
        """The leader may be frozen: probe every node fast for a while."""
        self._suspect_until_s = self.clock_s() + self.config.suspect_probe_s
        self.kick()

    async def leader_moved(self, address: str, stall_s: float, stalled_s: float = 0.0) -> str:
        """Return once a node other than ``address`` leads (its address).

        After ``stall_s`` (a call to ``address`` still unanswered), suspects
        the leader, so the probes find a successor within about one election
        timeout. Never returns while ``address`` leads, or nobody is known to,
        or ``address`` said it drains (NOT_SERVING), or answered a probe since
        the call began: a node that can is not frozen, and answers (or, having
        lost the lead, forwards) its calls. ``stalled_s``: how long the call
        has waited already (it began that long ago).
        """
        began_s = self.clock_s() - stalled_s
        await asyncio.sleep(stall_s)
        if self.pool.leader() == address:
            logger.info(
                "leader %s has not answered a call for %.2f s: probing",
                address,
                stall_s + stalled_s,
            )
        self.suspect_leader()
        old = self.pool.backends[address]

        def alive() -> bool:
            # It answered a probe after the call began: not frozen. A node that
            # lost the lead forwards its calls to the new leader, so abandoning
            # them would turn writes about to succeed into "may or may not".
            return old.reported_at_s is not None and old.reported_at_s >= began_s

        while (
            (leader := self.pool.leader()) in (address, None)
            or old.health_serving is False
            or alive()
        ):
            await self._updated.wait()
        assert leader is not None
        return leader

    async def answer_unless_moved(
        self, call: grpc.aio.UnaryUnaryCall[bytes, bytes], address: str, stall_s: float
    ) -> bytes | None:
        """The leader call's answer (or its error), or None, the call cancelled,
        once it waited ``stall_s`` and another node than ``address`` leads
        (``leader_moved``: a frozen leader)."""
        # The common case costs one future and one timer: the watch for a
        # moved leader (a task) starts only for a call still unanswered after
        # ``stall_s``.
        loop = asyncio.get_running_loop()
        woken: asyncio.Future[None] = loop.create_future()

        def wake(_: object = None) -> None:
            if not woken.done():
                woken.set_result(None)

        call.add_done_callback(wake)
        timer = loop.call_later(stall_s, wake)
        try:
            await woken
        except asyncio.CancelledError:
            call.cancel()
            raise
        finally:
            timer.cancel()
        if call.done():
            return await call
        return await self._unless_moved(call, address, stall_s)

    async def _unless_moved(
        self, call: grpc.aio.UnaryUnaryCall[bytes, bytes], address: str, stalled_s: float
    ) -> bytes | None:
        """``answer_unless_moved`` for a call unanswered ``stalled_s`` already."""
        answer = asyncio.ensure_future(call)
        moved = asyncio.ensure_future(self.leader_moved(address, 0.0, stalled_s))
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

    async def wait_leader(self, timeout_s: float) -> str | None:
        """The leader's address, waiting up to ``timeout_s`` for one to be known."""
        if self._leader is not None:  # as of the pool's last change (every input is one)
            return self._leader
        return await self._wait(self.pool.leader, timeout_s)

    async def wait_read(self, exclude: tuple[str, ...], timeout_s: float) -> str | None:
        """A backend for a read by weight, waiting up to ``timeout_s`` for one to be up."""
        return await self._wait(lambda: self.pool.pick(exclude), timeout_s)

    async def _wait(self, find: Callable[[], str | None], timeout_s: float) -> str | None:
        deadline = self.clock_s() + timeout_s
        if (found := find()) is not None:
            return found
        self.kick()  # then the probes run fast until one is found
        while (found := find()) is None:
            remaining = deadline - self.clock_s()
            if remaining <= 0:
                return None
            updated = self._updated
            try:
                async with asyncio.timeout(remaining):
                    await updated.wait()
            except TimeoutError:
                return find()
        return found

    def usable(self) -> bool:
        """Whether any backend is up (the balancer's own health)."""
        return any(not b.ejected for b in self.pool.backends.values())

    def next_update(self) -> asyncio.Event:
        """The event the next change of the pool sets (take it before reading
        the pool, so a change in between is not missed)."""
        return self._updated

    # ------------------------------------------------------------ loops

    async def _refresh_loop(self) -> None:
        """Expire reports and advance slow starts even when no probe answers."""
        while True:
            await asyncio.sleep(self.config.probe_interval_s / 2)
            self.pool.refresh(self.clock_s())
            self._changed()

    async def _probe_loop(self, address: str) -> None:
        stub = pbg.AdminStub(self.channels[address])
        while True:
            sent_at = self.clock_s()
            try:
                status = await stub.NodeStatus(
                    pb.NodeStatusRequest(),
                    timeout=self.config.probe_timeout_s,
                    metadata=self.probe_metadata(),
                )
            except grpc.aio.AioRpcError as exc:
                self._probe_failed(address, f"probe: {exc.code().name}")
                if self.pool.leader() == address:
                    self.suspect_leader()  # a late leader probe: is it frozen?
            except Exception as exc:  # a bad answer must not end the probing
                logger.warning("probe of %s failed: %s", address, describe(exc))
                self._probe_failed(address, f"probe: {type(exc).__name__}")
            else:
                self.pool.on_report(address, report_of(status), self.clock_s(), sent_at)
                self._announce(address, status.address, status.cluster_id)
            self._changed()
            interval = (
                self.config.probe_interval_s
                if self.pool.leader() is not None
                and self.usable()
                and self.clock_s() >= self._suspect_until_s
                else self.config.fast_probe_interval_s
            )
            try:
                async with asyncio.timeout(interval):
                    await self._kick.wait()
                await asyncio.sleep(0)  # let every loop see the kick before it clears
                self._kick.clear()
            except TimeoutError:
                pass

    def _probe_failed(self, address: str, why: str) -> None:
        self.metrics.probe_failures.labels(address).inc()
        self.pool.on_failure(address, why, self.clock_s())

    async def _health_loop(self, address: str) -> None:
        stub = health_pb2_grpc.HealthStub(self.channels[address])
        backoff_s = 0.05
        while True:
            try:
                async for reply in stub.Watch(health_pb2.HealthCheckRequest(service="")):
                    serving = reply.status == health_pb2.HealthCheckResponse.SERVING
                    self.pool.on_health(address, serving, self.clock_s())
                    self._changed()
                    backoff_s = 0.05
                    if not serving:
                        self.kick()
            except Exception as exc:
                # The stream broke: the node died, restarts or cannot be
                # reached. Treat it as not serving until a watch says again.
                why = exc.code().name if isinstance(exc, grpc.aio.AioRpcError) else describe(exc)
                self.pool.backends[address].last_error = f"health: {why}"
                self.pool.on_health(address, False, self.clock_s())
                self._changed()
                self.kick()
            await asyncio.sleep(backoff_s)
            backoff_s = min(1.0, backoff_s * 2)
