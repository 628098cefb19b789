"""The shell around the pure ``Pool``: channels, probe loops, health watches.

Each backend has one channel (shared by the proxy and the probes), one
``_probe_loop`` polling ``Admin.NodeStatus`` every ``probe_interval_s`` (or
every ``fast_probe_interval_s`` while no leader is known) and one
``_health_loop`` holding a ``grpc.health.v1.Health/Watch`` stream, so a
node that starts draining, or whose connection drops (``kill -9``), is
ejected at once rather than after missed probes. A node that stops
answering without closing its connection (``SIGSTOP``) is ejected when its
probes fail ``eject_after_failures`` times or its report expires.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from balancer.config import BalancerConfig
from balancer.metrics import BalancerMetrics
from balancer.pool import Pool, Report
from pqueue import limits
from pqueue.forward import FORWARDED_KEY
from pqueue.v1 import queue_pb2 as pb
from pqueue.v1 import queue_pb2_grpc as pbg

logger = logging.getLogger(__name__)

#: What the balancer calls itself in ``pq-forwarded-by`` (nodes then never
#: forward its calls: one hop, and a not-leader answer comes back to it).
BALANCER_ID = "balancer"


def report_of(status: pb.NodeStatusResponse) -> Report:
    """The pool's view of a node status."""
    load = status.load
    return Report(
        node_id=status.node_id,
        serving=status.serving,
        is_leader=status.role == "leader",
        ballot_round=status.ballot_round,
        leader_id=status.leader_id,
        cpu_utilization=load.cpu_utilization,
        in_flight_calls=load.in_flight_calls,
        pending_proposals=status.pending,
        apply_lag_entries=load.apply_lag_entries,
        applied_index=status.applied_index,
        ready_jobs=load.ready_jobs,
        waiting_long_polls=load.waiting_long_polls,
    )


def channel_options() -> list[tuple[str, int]]:
    """Message limits as the nodes have them."""
    return [
        ("grpc.max_receive_message_length", limits.MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", limits.MAX_MESSAGE_BYTES),
    ]


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
        self._tasks: set[asyncio.Task[None]] = set()
        self._kick = asyncio.Event()
        self._updated = asyncio.Event()

    async def start(self) -> None:
        """Open channels and start probing."""
        for address in self.config.backends:
            self.channels[address] = grpc.aio.insecure_channel(address, options=channel_options())
            self._spawn(self._probe_loop(address), f"pq-probe-{address}")
            self._spawn(self._health_loop(address), f"pq-health-{address}")
        self._spawn(self._refresh_loop(), "pq-refresh")

    def _spawn(self, coro: object, name: str) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coro, name=name)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._on_task_done)

    def _on_task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("%s died: %r", task.get_name(), task.exception())

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
            if ejected:
                self.metrics.ejections.labels(address).inc()
                logger.info(
                    "backend %s (node %s) ejected: %s",
                    address,
                    b.report.node_id if b.report else "?",
                    b.last_error or "not serving or report expired",
                )
            else:
                logger.info(
                    "backend %s (node %s) %s",
                    address,
                    b.report.node_id if b.report else "?",
                    "back: ramping up" if b.ejections else "up",
                )
        self.pool.changes.clear()
        leader = self.pool.leader()
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
        self.pool.on_unreachable(address)
        self._changed()
        self.kick()

    async def wait_leader(self, timeout_s: float) -> str | None:
        """The leader's address, waiting up to ``timeout_s`` for one to be known."""
        deadline = self.clock_s() + timeout_s
        if self.pool.leader() is None:
            self.kick()  # then the probes run fast until a leader is known
        while (leader := self.pool.leader()) is None:
            remaining = deadline - self.clock_s()
            if remaining <= 0:
                return None
            updated = self._updated
            try:
                async with asyncio.timeout(remaining):
                    await updated.wait()
            except TimeoutError:
                return self.pool.leader()
        return leader

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
            try:
                status = await stub.NodeStatus(
                    pb.NodeStatusRequest(),
                    timeout=self.config.probe_timeout_s,
                    metadata=((FORWARDED_KEY, BALANCER_ID),),
                )
            except grpc.aio.AioRpcError as exc:
                self.metrics.probe_failures.labels(address).inc()
                self.pool.on_failure(address, f"probe: {exc.code().name}", self.clock_s())
            else:
                self.pool.on_report(address, report_of(status), self.clock_s())
            self._changed()
            interval = (
                self.config.probe_interval_s
                if self.pool.leader() is not None
                else self.config.fast_probe_interval_s
            )
            try:
                async with asyncio.timeout(interval):
                    await self._kick.wait()
                await asyncio.sleep(0)  # let every loop see the kick before it clears
                self._kick.clear()
            except TimeoutError:
                pass

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
            except grpc.aio.AioRpcError as exc:
                # The stream broke: the node died, restarts or cannot be
                # reached. Treat it as not serving until a watch says again.
                self.pool.backends[address].last_error = f"health: {exc.code().name}"
                self.pool.on_health(address, False, self.clock_s())
                self._changed()
                self.kick()
            await asyncio.sleep(backoff_s)
            backoff_s = min(1.0, backoff_s * 2)
