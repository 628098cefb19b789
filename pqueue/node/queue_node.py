"""A queue node: the state machine behind a command log, plus long-poll wake-ups.

The node owns the ``QueueMachine``, hands it entries through the log seam,
wakes long-polling leases (``pqueue.node.longpoll``: ``Lease`` calls and
``Consume`` streams) when their queue gains a leasable job, and proposes
``Tick`` commands when a delayed job comes due or a lease expires, so that
time-driven changes are decided in the log like every other change (and,
through ``pqueue.node.scheduler``, cron schedules' ticks).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

from google.protobuf.message import Message

from pqueue.core import events, features
from pqueue.core.effects import Effects
from pqueue.core.machine import QueueMachine
from pqueue.core.snapshot import SnapshotView, freeze, restore_chunks
from pqueue.errors import (
    FeatureUnavailableError,
    NotTakenError,
    PQueueError,
    UpgradeRequiredError,
)
from pqueue.node.commitlog import CommandLog, Indexed, LogObserver
from pqueue.node.longpoll import LongPolls
from pqueue.node.mirror import JobsMirror, MirrorStore
from pqueue.node.peers import PeerTransport
from pqueue.node.replicated import ClusterConfig, ReplicatedLog
from pqueue.node.scheduler import Scheduler
from pqueue.node.watch import Watchers
from pqueue.storage import Storage
from pqueue.v1 import log_pb2 as logpb
from pqueue.v1 import queue_pb2 as pb
from pqueue.wire.logs import describe
from pqueue.wire.tls import Tls
from pqueue.wire.tokens import TokenSource

logger = logging.getLogger(__name__)


def wall_clock_ms() -> int:
    """Unix time in milliseconds."""
    return time.time_ns() // 1_000_000


@dataclass(frozen=True)
class NodeConfig:
    """How a node runs; validated on construction."""

    node_id: str = "n1"
    #: Snapshot once this many entries, or bytes of entries, were applied
    #: since the last one (``ClusterConfig``'s fields of the same names).
    snapshot_every_entries: int = 10_000
    snapshot_log_bytes: int = 32 << 20
    #: Ticks are proposed at most this often, whatever falls due.
    min_tick_interval_ms: int = 20
    #: The log features this node applies and announces. Only tests set it,
    #: to play an older release (``pqueue.core.features``).
    features: frozenset[str] = features.SUPPORTED

    def __post_init__(self) -> None:
        if self.snapshot_every_entries < 1:
            raise ValueError("snapshot_every_entries must be at least 1")
        if self.snapshot_log_bytes < 1:
            raise ValueError("snapshot_log_bytes must be at least 1")
        if self.min_tick_interval_ms < 1:
            raise ValueError("min_tick_interval_ms must be at least 1")


class QueueNode:
    """State machine + log + wake-ups. Use ``async with`` or ``start``/``stop``."""

    def __init__(
        self,
        storage: Storage,
        config: NodeConfig | None = None,
        clock_ms: Callable[[], int] = wall_clock_ms,
        cluster: ClusterConfig | None = None,
        observer: LogObserver | None = None,
        tls: Tls | None = None,
        peer_token: TokenSource | None = None,
    ) -> None:
        self.config = config or NodeConfig()
        self.clock_ms = clock_ms
        self.machine = QueueMachine()
        # One node is a cluster of one: the same replicated log, a quorum of one.
        cluster = cluster or ClusterConfig(node_id=1, addresses={})
        cluster = dataclasses.replace(
            cluster,
            snapshot_every_entries=self.config.snapshot_every_entries,
            snapshot_log_bytes=self.config.snapshot_log_bytes,
        )
        self.cluster = cluster
        self.transport = PeerTransport(
            cluster.node_id,
            cluster.addresses,
            tls,
            peer_token,
            self.config.features,
            cluster.peer_ports,
        )
        #: Commands applied whose request held a client's unknown fields (an
        #: older release stored them; ``features.check_entry`` drops them).
        self.client_junk = 0
        #: Each member's announced features (this node's own included).
        self.announced: dict[int, frozenset[str]] = {cluster.node_id: self.config.features}
        self.log: CommandLog = ReplicatedLog(
            storage, self, clock_ms, cluster, self.transport.send, observer, self.transport.flush
        )
        #: Leases waiting for work: ``Lease`` calls and ``Consume`` streams.
        self.long_polls = LongPolls(self)
        #: ``Watch`` streams and the recent events they resume from.
        self.watchers = Watchers()
        self._due_changed = asyncio.Event()
        #: One state digest at a time (each reads the whole state).
        self._digesting = asyncio.Lock()
        self._tick_task: asyncio.Task[None] | None = None
        #: Proposes cron schedules' ticks while this node leads.
        self.scheduler = Scheduler(self)
        self.draining = False
        #: Client calls being served (the servicer counts them; a stream
        #: counts while it leases or settles).
        self.calls_in_flight = 0
        #: Open ``Consume`` streams, served here or forwarded to the leader.
        self.consume_streams = 0
        #: Open ``SubmitStream`` streams, and the requests they have carried.
        self.submit_streams = 0
        self.submit_stream_requests = 0
        self.storage = storage
        self.mirror = (
            JobsMirror(storage, lambda: self.machine) if isinstance(storage, MirrorStore) else None
        )

    # ------------------------------------------------------------- Applier

    @property
    def serving(self) -> bool:
        """Neither draining nor failed, and its storage reachable."""
        return not (self.draining or self.log.failed.is_set()) and self.storage.available

    def apply(self, entry: logpb.LogEntry, respond: bool = True) -> Effects:
        try:
            junk = features.check_entry(entry, self.config.features)
        except UpgradeRequiredError as exc:
            # Raised, the log fails: nothing of this entry or after it applies.
            logger.error("node %s: %s", self.config.node_id, describe(exc))
            raise
        if junk:
            self.client_junk += junk
            if self.client_junk & (self.client_junk - 1) == 0:  # 1, 2, 4...: bounded noise
                logger.warning(
                    "node %s: log entry %d: dropped unknown fields a client sent in %d "
                    "command(s), stored by an older release (every replica ignores them; "
                    "%d so far)",
                    self.config.node_id,
                    entry.index,
                    junk,
                    self.client_junk,
                )
        effects = self.machine.apply_entry(entry, respond)
        if self.mirror is not None:
            self.mirror.observe(effects)
        self.watchers.publish(entry.index, events.derive(entry, effects, self.machine))
        for name, count in effects.woken.items():
            self.long_polls.wake(name, count)
        self._due_changed.set()
        return effects

    def freeze(self) -> SnapshotView:
        return freeze(self.machine)

    async def state_digest(self) -> tuple[int, str]:
        """(applied index, SHA-256 of the state there), read from a frozen
        view a piece at a time so calls are served meanwhile; one at a time."""
        async with self._digesting:
            view = freeze(self.machine)
            digest = hashlib.sha256()
            for chunk in view.chunks():
                digest.update(chunk)
                await asyncio.sleep(0)
            return view.index, digest.hexdigest()

    def restore(self, data: Iterable[bytes]) -> None:
        try:
            machine = restore_chunks(data)
            features.check_restored(machine.applied_index, machine.features, self.config.features)
        except UpgradeRequiredError as exc:
            logger.error("node %s: %s", self.config.node_id, describe(exc))
            raise
        self.machine = machine
        self.watchers.reset(machine.applied_index)
        if self.mirror is not None:
            self.mirror.notify_restored()

    def last_time_ms(self) -> int:
        return self.machine.time_ms

    def last_index(self) -> int:
        return self.machine.applied_index

    def known_features(self) -> AbstractSet[str]:
        return self.machine.features

    # ----------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Recover from storage and start the tick loop."""
        self.cluster.addresses.setdefault(self.cluster.node_id, "")
        try:
            await self.log.start()
        except UpgradeRequiredError:
            await self.log.stop()  # its stored snapshot needs a newer release: let go
            raise
        if self.mirror is not None:
            self.mirror.start()
        self.transport.start()
        self._tick_task = asyncio.create_task(self._tick_loop(), name="pq-tick-loop")
        self._tick_task.add_done_callback(self._on_tick_done)
        self.scheduler.start()
        logger.info("node %s ready at index %d", self.config.node_id, self.machine.applied_index)

    def _on_tick_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and (exc := task.exception()) is not None:
            logger.error("tick loop failed: %s", describe(exc), exc_info=exc)

    def begin_drain(self) -> None:
        """Stop waiting long polls (they return empty; streams end) and refuse new ones."""
        self.draining = True
        self.long_polls.wake_all()
        self.watchers.end_all(
            NotTakenError("node is draining: resume the watch", 0.2, cause="DRAINING")
        )

    async def stop(self) -> None:
        """Drain, stop ticking, commit what is pending, release storage."""
        self.begin_drain()
        if self._tick_task is not None:
            self._tick_task.cancel()
            await asyncio.wait([self._tick_task])
            self._tick_task = None
        await self.scheduler.stop()
        if self.mirror is not None:
            await self.mirror.stop()
        await self.log.stop()
        await self.transport.stop()
        logger.info("node %s stopped at index %d", self.config.node_id, self.machine.applied_index)

    async def __aenter__(self) -> QueueNode:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def waiting_long_polls(self) -> int:
        """Long polls parked until a job comes (``Lease`` calls and streams)."""
        return self.long_polls.waiting

    # ----------------------------------------------------------- commands

    async def propose(self, command: logpb.Command) -> Message:
        """The command's result once it is durable and applied.

        Fields this release does not know are dropped (a newer client's: this
        leader could not apply them either, and a replica that meets unknown
        fields in the log stops). A command needing a feature some member has
        not announced is refused (``FeatureUnavailableError``).
        """
        return (await self.propose_indexed(command))[0]

    def check_features(self, command: logpb.Command) -> None:
        """Refuse ``command`` if a member may not be able to apply it."""
        # A feature the log already needs is supported by every member
        # that applies it (one that does not stops there): no gate.
        needed = features.required(command, self.machine.features)
        if not needed:
            return
        gap = features.lacking(needed, self.cluster.addresses, self.announced)
        if gap is not None:
            feature, nodes = gap
            raise FeatureUnavailableError(
                features.unavailable(feature, nodes, self.announced), feature, nodes
            )

    def note_features(self, node: int, supported: frozenset[str]) -> None:
        """A peer announced what it supports (on each stream it opens)."""
        if node == self.cluster.node_id or node not in self.cluster.addresses:
            return
        if self.announced.get(node) != supported:
            self.announced[node] = supported
            self._due_changed.set()  # the tick loop may switch features on
            missing = sorted(self.config.features - supported)
            logger.info(
                "node %s: node %d supports %s%s",
                self.config.node_id,
                node,
                features.announce(supported) or "no features",
                f"; it lacks {', '.join(missing)}, which stay unused until it is upgraded"
                if missing
                else "",
            )

    async def propose_indexed(self, command: logpb.Command) -> tuple[Message, int]:
        """``propose``, with the log index of the entry that applied it."""
        self.prepare(command)
        if command.WhichOneof("kind") != "enqueue":
            return await self.log.submit_indexed(command)
        [future] = self.log.submit_many([command])
        self.long_polls.ride((command,))  # waiters' leases join its entry
        result, index = await future
        if isinstance(result, PQueueError):
            raise result
        return result, index

    def prepare(self, command: logpb.Command) -> None:
        """Make ``command`` fit for the log, or refuse it (as ``propose`` does)."""
        command.DiscardUnknownFields()
        self.check_features(command)

    def propose_many(self, commands: Sequence[logpb.Command]) -> list[asyncio.Future[Indexed]]:
        """Propose ``commands`` (each passed through ``prepare``) in order, each
        on its own: the future of each one's (result or error, log index).
        Waiters the enqueues among them can serve have their leases proposed
        right behind (``LongPolls.ride``)."""
        futures = self.log.submit_many(commands)
        self.long_polls.ride(commands)
        return futures

    async def lease(
        self, req: pb.LeaseRequest, bound: logpb.TenantLimits | None = None
    ) -> pb.LeaseResponse:
        """Lease, waiting up to ``req.wait_ms`` for a job (long poll): see
        ``LongPolls.lease``. Never fails for lack of work."""
        return await self.long_polls.lease(req, bound)

    async def _tick_loop(self) -> None:
        """Propose a Tick whenever a delayed job or a lease falls due (leader only:
        followers learn the outcome from the log like every other change)."""
        while True:
            if not self.log.is_leader:
                await asyncio.sleep(self.config.min_tick_interval_ms / 1000)
                continue
            self._due_changed.clear()
            if not self.machine.lifecycle and self._members_support(features.LIFECYCLE):
                await self._propose_tick(logpb.Tick(lifecycle=True))
                continue
            due = self.machine.next_due_ms()
            if due is None:
                await self._due_changed.wait()
                continue
            wait_s = (due - self.clock_ms()) / 1000
            if wait_s > 0:
                # asyncio.timeout, not wait_for: in 3.11 wait_for can swallow a
                # cancel that lands as the event fires, and stop() would hang.
                try:
                    async with asyncio.timeout(wait_s):
                        await self._due_changed.wait()
                    continue  # something changed: recompute the next due time
                except TimeoutError:
                    pass
            await self._propose_tick(logpb.Tick())

    async def _propose_tick(self, tick: logpb.Tick) -> None:
        try:
            await self.propose(logpb.Command(tick=tick))
        except PQueueError as exc:
            # Not fatal here: a failed log stops the whole node; anything
            # else (no leader, lost the lead mid-way) passes. Retry.
            logger.debug("tick not committed: %s", describe(exc))
            await asyncio.sleep(max(getattr(exc, "retry_after_s", 0.0), 0.1))
            return
        if tick.lifecycle:
            logger.info(
                "node %s: every member supports %r: job records, job actions, queue "
                "controls, expiry and schedules are on",
                self.config.node_id,
                features.LIFECYCLE,
            )
        await asyncio.sleep(self.config.min_tick_interval_ms / 1000)

    def _members_support(self, feature: str) -> bool:
        """Whether every member has announced ``feature`` (this node included)."""
        return features.lacking({feature}, self.cluster.addresses, self.announced) is None
