"""``ReplicatedLog``: the command log as a Multi-Paxos log (the asyncio shell).

The same ``CommandLog`` seam as ``LocalLog``, so the state machine and the
servicer do not change. The leader packs every command waiting at that
moment into one ``LogEntry`` (group commit) per slot and keeps several slots
in flight. The shell runs the pure ``consensus.Replica`` and handles each
``Ready`` in a fixed order: persist (one transaction, fsynced), then send
(messages to itself are stepped only now, after the persist), then apply.
One exception, as Raft's leader writes its log while it replicates: a
leader's Accepts to the other nodes (proposals, never a vote of its own)
leave before its write, so the followers' fsyncs overlap it.
A caller is answered once its slot is applied *with its own entry*; if
another value won the slot, it gets a retriable UNAVAILABLE.

Snapshots are taken in the background once the log behind the last one
passes ``snapshot_every_entries`` entries or ``snapshot_log_bytes`` bytes:
the state is frozen on the loop (``Applier.freeze``), its chunks serialized
on the loop between other work and written to a file by a worker thread
(hashed, fsynced), then the store records it and the replica compacts. The
replica reads snapshots through that file, never holding one whole.

Over 400 lines on purpose: one class whose order of persist, send and apply
is the safety argument; split, that order would be read across files.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from google.protobuf.message import Message

from consensus import ZERO, BlobSink, Config, DurableState, Replica, Role, SoftState
from consensus.blob import pieces
from consensus.messages import Accept, Ready
from consensus.messages import Message as PeerMessage
from pqueue.core import features
from pqueue.core.snapshot import SnapshotView
from pqueue.errors import NotLeaderError, NotTakenError, PQueueError, UnavailableError
from pqueue.node.commitlog import (
    Applier,
    Indexed,
    LogObserver,
    LogStatus,
    NoObserver,
    Proposals,
    Result,
)
from pqueue.node.identity import DEFAULT_CLUSTER_ID, claim_identity
from pqueue.node.mixing import MAX_MIX_WAIT_MS, Mixer
from pqueue.storage.base import Storage, StoredSnapshot
from pqueue.v1 import log_pb2 as logpb
from pqueue.wire.logs import describe
from pqueue.wire.protowire import length_delimited

logger = logging.getLogger(__name__)

#: Applying a run of entries yields to the event loop after this much work.
APPLY_SLICE_S = 0.02
#: A long run of entries being applied logs its progress this often.
PROGRESS_EVERY_S = 5.0
#: A durable write slower than this is logged: the disk stalled, and every
#: commit that needed this node's vote waited for it (etcd's "slow
#: fdatasync"). At most one line per ``SLOW_WRITE_LOG_EVERY_S``, counting
#: the others; every write's time is in ``pq_storage_fsync_seconds``.
SLOW_WRITE_S = 0.1
SLOW_WRITE_LOG_EVERY_S = 10.0
#: A node alone fails its start when recovery made no progress this long.
STALL_S = 10.0
#: A snapshot waits for a log behind the last one of 1/SNAPSHOT_RATIO of its
#: bytes (a million jobs' state is 130 MB: not rewritten for every 10,000
#: single-job entries, about 1 MB of log, nor for every 32 MiB budget).
SNAPSHOT_RATIO = 4
#: How long a leader keeps the log after a snapshot it served (see
#: ``consensus.Config.catchup_hold_ticks``): longer than a big state restores.
CATCHUP_HOLD_MS = 60_000


@dataclass(frozen=True)
class ClusterConfig:
    """This node's place in the cluster and the protocol's timing."""

    node_id: int
    #: Every node's peer address, this one's included: id -> "host:port".
    addresses: dict[int, str] = field(default_factory=dict)
    #: The TCP peer transport (``pq node --peer-ports``): id -> the port that
    #: node takes peers' connections on (at its address's host); this node
    #: listens on its own (0: any, the bound port is put here). A peer not
    #: named is reached over its gRPC stream; None: every peer is.
    peer_ports: dict[int, int] | None = None
    tick_ms: int = 50
    #: Election timeout: between 1 and 2 times this many ticks.
    election_ticks: int = 10
    heartbeat_ticks: int = 2
    max_inflight_slots: int = 64
    max_batch_commands: int = 2_000
    #: Group commit: entries the leader keeps open (proposed, not yet
    #: committed) before new commands wait for one of them to commit. While
    #: they wait, more commands join the next entry: fewer entries, fsyncs and
    #: peer messages per command. A full entry (``max_batch_commands``, or
    #: ``limits.MAX_ENTRY_BYTES``) goes at once.
    open_entries: int = 1
    #: An idle leader holds an entry of producers' commands alone (or
    #: consumers' alone) up to this long for the other side's, when the
    #: entry before held them: one entry a round of the queue instead of
    #: two (``pqueue.node.mixing``). 0: never.
    mix_wait_ms: float = 2.0
    #: Snapshot (and compact the log) once this many entries, or this many
    #: bytes of entries, were applied since the last snapshot: whichever first.
    snapshot_every_entries: int = 10_000
    snapshot_log_bytes: int = 32 << 20
    #: Identity on disk (``pqueue.node.identity``): the cluster's name (None: keep the
    #: recorded one, or ``DEFAULT_CLUSTER_ID`` at first start), whether a new
    #: member set may replace the recorded one, and the data dir named in hints.
    cluster_id: str | None = None
    accept_member_change: bool = False
    data_dir: str = ""

    def __post_init__(self) -> None:
        if self.tick_ms < 1:
            raise ValueError("tick_ms must be at least 1")
        if self.open_entries < 1:
            raise ValueError("open_entries must be at least 1")
        if not 0 <= self.mix_wait_ms <= MAX_MIX_WAIT_MS:
            raise ValueError(f"mix_wait_ms must be between 0 and {MAX_MIX_WAIT_MS}")
        if self.snapshot_every_entries < 1 or self.snapshot_log_bytes < 1:
            raise ValueError("snapshot_every_entries and snapshot_log_bytes must be positive")

    def validate(self) -> None:
        """Called at start, once every address is known (ports may be bound late)."""
        if self.node_id not in self.addresses:
            raise ValueError(f"node {self.node_id} is not among the peers {sorted(self.addresses)}")


class SlowWrites:
    """Which slow durable writes to log, and what to say: at most one line
    every ``every_s``, with the writes since the last line and the slowest;
    writes held back are told at the first write after ``every_s``, slow
    or not."""

    def __init__(self, over_s: float = SLOW_WRITE_S, every_s: float = SLOW_WRITE_LOG_EVERY_S):
        self.over_s, self.every_s = over_s, every_s
        self._said_at: float | None = None
        self._unsaid = 0
        self._worst = 0.0

    def note(self, seconds: float, now: float) -> str | None:
        """A write took ``seconds``, at ``now`` (monotonic): the line to log, if one."""
        slow = seconds > self.over_s
        if not slow and not self._unsaid:
            return None
        due = self._said_at is None or now - self._said_at >= self.every_s
        if slow:
            self._unsaid += 1
            self._worst = max(self._worst, seconds)
        if not due:
            return None
        over = f"over {self.over_s * 1e3:.0f} ms"
        since = f"in the last {now - (self._said_at or now):.0f} s"
        worst = f"the slowest {self._worst * 1e3:.0f} ms"
        if not slow:  # the ones held back, told late rather than never
            text = f"{self._unsaid} durable write(s) {over} {since}, {worst}"
        elif self._unsaid > 1:
            text = f"a durable write took {seconds * 1e3:.0f} ms ({over}); "
            text += f"{self._unsaid} such {since}, {worst}"
        else:
            text = f"a durable write took {seconds * 1e3:.0f} ms ({over})"
        self._said_at, self._unsaid, self._worst = now, 0, 0.0
        return text


class ReplicatedLog:
    """A ``CommandLog`` whose order and durability come from a majority."""

    def __init__(
        self,
        storage: Storage,
        applier: Applier,
        clock_ms: Callable[[], int],
        config: ClusterConfig,
        send: Callable[[PeerMessage], None],
        observer: LogObserver | None = None,
        flush: Callable[[], bool] | None = None,
    ) -> None:
        self._storage = storage
        self.observer: LogObserver = observer or NoObserver()
        self._applier = applier
        self._clock_ms = clock_ms
        self.config = config
        self._send = send
        #: Writes what ``send`` queued now; whether all of it went (None: a
        #: transport that sends from its own tasks only).
        self._flush = flush
        self.replica: Replica | None = None
        self._proposals = Proposals()
        self._inflight: dict[int, tuple[bytes, list[asyncio.Future[Indexed]]]] = {}
        self._wake = self._proposals.wake
        self._mixer = Mixer(self.config.mix_wait_ms / 1000)
        self._mix_timer: asyncio.TimerHandle | None = None
        #: Whether what waits queued behind an open entry (``Mixer.hold``).
        self._queued = False
        self._tasks: list[asyncio.Task[None]] = []
        self._accepting = False
        self._last_time_ms = 0
        self._applied_time_ms = 0
        self._snapshot_index = 0
        #: Bytes of entries applied since start, and that count at the last
        #: snapshot (the byte budget's measure).
        self._applied_bytes = 0
        self._snapshot_mark = 0
        #: Bytes of the last snapshot taken, installed or recovered.
        self._snapshot_size = 0
        #: After a failed snapshot, the next waits for this index or byte count.
        self._snapshot_retry = (0, 0)
        #: The snapshot being written in the background, and its file writer.
        self._snapshot_task: asyncio.Task[None] | None = None
        self._snapshot_pool: ThreadPoolExecutor | None = None
        #: When the snapshot being received started coming (for the log line).
        self._receiving_since = 0.0
        self._commit_hint: int | None = None
        self._slow_writes = SlowWrites()
        #: The leadership view the replica last reported (``Ready.soft_state``).
        self._soft = SoftState(Role.FOLLOWER, 0, ZERO, ZERO)
        self._caught_up = False
        self._leading = asyncio.Event()
        self.failed = asyncio.Event()
        #: Read-index requests waiting for the core's confirmation: ctx -> index.
        self._reads: dict[int, asyncio.Future[int]] = {}
        self._read_ctx = 0
        #: Handing leadership over: commands wait for the new leader's name.
        self._handing_over = False
        #: Set while not handing over blind (``handover_settled``; kept by
        #: ``_note_role``, and set when a handover ends).
        self._handover_settled = asyncio.Event()
        self._handover_settled.set()
        #: Callers waiting for the state to apply up to an index.
        self._apply_waiters: list[tuple[int, asyncio.Future[None]]] = []
        #: Peer messages dropped because their sender is not a member.
        self.foreign = 0
        #: The cluster this node belongs to, as its data dir records it (set at start).
        self.cluster_id = config.cluster_id or DEFAULT_CLUSTER_ID

    # ----------------------------------------------------------- lifecycle

    async def start(self) -> None:
        self.config.validate()
        await self._storage.open()
        try:
            state = await self._storage.load_acceptor()
            self.cluster_id = (await claim_identity(self._storage, self.config, state)).cluster_id
        except BaseException:
            await self._storage.close()
            raise
        snapshot = None
        if state.snapshot is not None:
            self._applier.restore(pieces(state.snapshot.blob))
            snapshot = (state.snapshot.index, state.snapshot.blob)
            self._snapshot_index = state.snapshot.index
            self._snapshot_size = state.snapshot.blob.size
        c = self.config
        self.replica = Replica(
            Config(
                node_id=c.node_id,
                nodes=tuple(sorted(c.addresses)),
                election_ticks=c.election_ticks,
                heartbeat_ticks=c.heartbeat_ticks,
                max_inflight_slots=c.max_inflight_slots,
                # A follower that got a snapshot goes on from the log for a
                # minute: the log between two snapshots is about the budget.
                catchup_hold_ticks=max(1, CATCHUP_HOLD_MS // c.tick_ms),
                catchup_hold_bytes=2 * c.snapshot_log_bytes,
            ),
            random.Random(),
            DurableState(
                promised=state.promised,
                records={r.slot: r for r in state.records},
                commit_index=state.commit_index,
                snapshot=snapshot,
            ),
            sinks=self._incoming_snapshot,
        )
        self._last_time_ms = self._applied_time_ms = self._applier.last_time_ms()
        logger.info(
            "node %d recovered: promised %s, %d records, commit %d, snapshot %d",
            c.node_id,
            state.promised,
            len(state.records),
            state.commit_index,
            self._snapshot_index,
        )
        await self._replay()
        self._accepting = True
        for coro, name in ((self._tick_loop(), "pq-paxos-tick"), (self._ready_loop(), "pq-ready")):
            task = asyncio.create_task(coro, name=name)
            task.add_done_callback(self._on_task_done)
            self._tasks.append(task)
        if len(c.addresses) == 1:
            # A quorum of one elects itself at once; be ready when start returns.
            self.replica.tick()
            self._wake.set()
            await self._until_serving_alone()
        self._wake.set()  # replay what the commit hint already covers

    async def _replay(self) -> None:
        """Apply what the store holds as committed, before any timer starts.

        The records up to the stored commit index (beyond the snapshot) are
        chosen: this node applies them now, on its own, with nothing else
        running, so no election timer can fire and no caller can wait while
        it works. (Applied in the ready loop after the first election, as
        before, a large log held the loop for longer than the leader's wait:
        the start failed with a bare ``TimeoutError`` and an election timer
        re-ran phase 1 meanwhile.) It yields to the loop as ``_apply`` does,
        so ``/metrics`` and signals are answered meanwhile; the timers start
        once it is done, and a cluster's peers see this node as away until
        then, as they do while any node restarts.
        """
        assert self.replica is not None
        ready = self.replica.ready()  # nothing has ticked or stepped: committed entries only
        if not ready.committed:
            return
        started = time.perf_counter()
        first, last = ready.committed[0][0], ready.committed[-1][0]
        logger.info("node %d replays entries %d..%d from its log", self.config.node_id, first, last)
        self._note_role(ready)
        await self._handle(ready)
        logger.info(
            "node %d replayed %d entries in %.1f s",
            self.config.node_id,
            last - first + 1,
            time.perf_counter() - started,
        )

    async def _until_serving_alone(self) -> None:
        """A quorum of one: wait until it leads and has applied what phase 1
        re-proposed (the records beyond the stored commit index).

        No fixed deadline: applying a long tail can take a while on a busy
        machine, and that is progress. It fails (with what it was doing) only
        when nothing moved for ``STALL_S``, or when the log failed.
        """
        replica = self.replica
        assert replica is not None
        loop = asyncio.get_running_loop()
        mark: tuple[object, ...] = ()
        moved_at = loop.time()
        while True:
            if self.failed.is_set():
                raise UnavailableError(
                    f"node {self.config.node_id}: the log failed while recovering (see above)",
                    reason="LOG_FAILED",
                )
            status = replica.status()
            applied = self._applier.last_index()
            if self.is_leader and applied >= status.next_slot - 1:
                return
            now = (status.role, status.ballot, status.emitted, applied)
            if now != mark:
                mark, moved_at = now, loop.time()
            elif loop.time() - moved_at > STALL_S:
                raise UnavailableError(
                    f"node {self.config.node_id} recovered its log but made no progress for "
                    f"{STALL_S:g} s: {status.role.value} at ballot {_ballot(status.ballot)}, "
                    f"applied {applied} of {status.next_slot - 1}",
                    retry_after_s=1.0,
                    reason="RECOVERY_STALLED",
                )
            await asyncio.sleep(0.005)

    def _on_task_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or (exc := task.exception()) is None:
            return
        logger.error(
            "replicated log failed in %s: %s", task.get_name(), describe(exc), exc_info=exc
        )
        self._accepting = False
        self._fail_all(
            UnavailableError(
                f"log stopped: {describe(exc)}", retry_after_s=1.0, reason="LOG_FAILED"
            )
        )
        self.failed.set()

    async def stop(self) -> None:
        self._accepting = False
        self._cancel_mix_timer()
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks)
        self._tasks = []
        snapshotting, self._snapshot_task = self._snapshot_task, None
        if snapshotting is not None:
            snapshotting.cancel()  # its temporary file is removed; the log replays
            await asyncio.wait([snapshotting])
        if self._snapshot_pool is not None:
            await asyncio.to_thread(self._snapshot_pool.shutdown)
            self._snapshot_pool = None
        self._fail_all(UnavailableError("node stopped", retry_after_s=1.0, reason="NODE_STOPPING"))
        await self._storage.close()

    def _fail_all(self, error: PQueueError) -> None:
        self._proposals.fail(error)
        self._fail_reads(error)
        waiters, self._apply_waiters = self._apply_waiters, []
        for _, waiter in waiters:
            if not waiter.done():
                waiter.set_exception(error)
        inflight, self._inflight = self._inflight, {}
        for _, futures in inflight.values():
            for fut in futures:
                if not fut.done():
                    fut.set_exception(error)

    # ------------------------------------------------------------ commands

    @property
    def is_leader(self) -> bool:
        """Whether this node leads (and may take commands) now: as of the
        replica's last ``Ready`` (the ready loop takes one after every step
        and tick; the proposal loop re-checks ``status()`` before proposing)."""
        return self.replica is not None and self._soft.role is Role.LEADER

    def leader_hint(self) -> tuple[int, str]:
        """The leader's id and address as far as we know; (0, "") if unknown.

        As of the last ``Ready``, unless that named nobody or this node and
        the replica itself follows another node by now (a handover that has
        just ended: the ready loop takes the news a moment later)."""
        if self.replica is None:
            return 0, ""
        leader = self._soft.leader_id
        if leader in (0, self.config.node_id):
            fresh = self.replica.status().leader_id
            if fresh not in (0, self.config.node_id):
                leader = fresh
        if not leader:
            return 0, ""
        return leader, self.config.addresses.get(leader, "")

    def not_leader_error(self) -> PQueueError:
        """What a caller gets from a node that cannot take its command."""
        leader, address = self.leader_hint()
        if leader:
            return NotLeaderError(f"node {leader} leads", str(leader), address)
        return NotTakenError("no leader yet", retry_after_s=0.5, cause="NO_LEADER")

    async def submit(self, command: logpb.Command) -> Message:
        return (await self.submit_indexed(command))[0]

    async def submit_indexed(self, command: logpb.Command) -> tuple[Message, int]:
        """``submit``, with the log index of the entry that applied the command."""
        self._check_taking()
        return await self._proposals.submit_indexed(command)

    def submit_many(self, commands: Sequence[logpb.Command]) -> list[asyncio.Future[Indexed]]:
        self._check_taking()
        return [self._proposals.add(command) for command in commands]

    def _check_taking(self) -> None:
        """Raise the error for a command this node cannot take now."""
        if not self._accepting:
            raise NotTakenError(
                "node is not accepting writes", retry_after_s=1.0, cause="NOT_ACCEPTING_WRITES"
            )
        if not self.is_leader and not self._handing_over_blind():
            raise self.not_leader_error()
        if not self._storage.available:
            raise NotTakenError(
                "storage is unreachable; retrying", retry_after_s=1.0, cause="STORAGE_UNAVAILABLE"
            )

    def _handing_over_blind(self) -> bool:
        """Handing over, stepped down, and no successor known yet: a command
        that comes now is held with the others, and told the new leader
        when the handover ends (not "no leader yet": the caller would retry
        blind what a moment later goes straight to the new leader)."""
        return self._handing_over and not self._soft.leader_id

    async def handover_settled(self) -> None:
        """Return once this node is not handing over blind (see
        ``_handing_over_blind``): a successor is known or the handover ended."""
        if self._handing_over_blind():
            await self._handover_settled.wait()

    async def transfer_leadership(self, timeout_s: float) -> bool:
        """Hand leadership to the most up-to-date peer before going away.

        True once another node leads; False if this node does not lead, has
        nobody to hand over to, or ``timeout_s`` passed. Commands that arrive
        meanwhile wait, then go to the new leader as not-leader errors.
        """
        replica = self.replica
        if replica is None or not self.is_leader or len(replica.status().nodes) == 1:
            return False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        self._handing_over = True
        try:
            handed = await self._hand_over(replica, deadline)
            if not handed and replica.status().role is Role.LEADER:
                replica.abort_transfer()  # lead on: take commands again
                self._wake.set()
                logger.warning(
                    "node %d could not hand leadership over in %.1f s",
                    self.config.node_id,
                    timeout_s,
                )
            return handed
        finally:
            self._handing_over = False
            self._handover_settled.set()
            if replica.status().role is not Role.LEADER and self._proposals:
                # The replica's own word (the last ``Ready`` may not know the
                # new leader yet; ``leader_hint`` asks the replica then), so
                # the callers go to the new leader, not away to retry blind.
                self._proposals.fail(self.not_leader_error())

    async def _hand_over(self, replica: Replica, deadline: float) -> bool:
        loop = asyncio.get_running_loop()
        while loop.time() < deadline:
            status = replica.status()
            if status.role is Role.LEADER and not status.transfer_target:
                target = replica.transfer_leadership()  # again if the last one lapsed
                if not target:
                    return False
                logger.info("node %d hands leadership to node %d", self.config.node_id, target)
                self._wake.set()
            status = replica.status()
            if status.role is not Role.LEADER and status.leader_id not in (0, self.config.node_id):
                return True
            await asyncio.sleep(self.config.tick_ms / 2000)
        return False

    async def read_barrier(self, timeout_s: float = 5.0) -> int:
        """Linearizable read point: returns once this node's state is applied
        up to an index that no committed write lies beyond (read index).

        Raises the not-leader error if this node does not lead (or stops
        leading meanwhile), and a retriable UNAVAILABLE after ``timeout_s``.
        """
        replica = self.replica
        if replica is None or not self.is_leader:
            raise self.not_leader_error()
        self._read_ctx += 1
        ctx = self._read_ctx
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        if not replica.read_index(ctx):
            raise self.not_leader_error()
        self._reads[ctx] = fut
        self._wake.set()
        try:
            async with asyncio.timeout(timeout_s):
                index = await fut
                await self._until_applied(index)
        except TimeoutError:
            raise UnavailableError(
                "could not confirm leadership in time",
                retry_after_s=0.5,
                reason="READ_UNCONFIRMED",
            ) from None
        finally:
            self._reads.pop(ctx, None)
        return index

    async def wait_applied(self, index: int, timeout_s: float) -> None:
        """Return once the state has applied up to ``index`` (read your
        writes); a retriable UNAVAILABLE if it has not within ``timeout_s``."""
        try:
            async with asyncio.timeout(timeout_s):
                await self._until_applied(index)
        except TimeoutError:
            raise UnavailableError(
                f"this node has not applied index {index} yet",
                retry_after_s=0.5,
                reason="NOT_CAUGHT_UP",
                metadata={
                    "min_index": str(index),
                    "applied_index": str(self._applier.last_index()),
                },
            ) from None

    async def _until_applied(self, index: int) -> None:
        if self._applier.last_index() >= index:
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (index, waiter)
        self._apply_waiters.append(entry)
        try:
            await waiter
        finally:
            if entry in self._apply_waiters:
                self._apply_waiters.remove(entry)

    def _wake_applied(self) -> None:
        if not self._apply_waiters:
            return
        applied = self._applier.last_index()
        waiting = []
        for index, waiter in self._apply_waiters:
            if index <= applied:
                if not waiter.done():
                    waiter.set_result(None)
            else:
                waiting.append((index, waiter))
        self._apply_waiters = waiting

    def _fail_reads(self, error: PQueueError) -> None:
        reads, self._reads = self._reads, {}
        for fut in reads.values():
            if not fut.done():
                fut.set_exception(error)

    def on_message(self, msg: PeerMessage) -> None:
        """A message from a peer (the transport calls this)."""
        if self.replica is None or msg.dst != self.config.node_id:
            return
        if msg.src == self.config.node_id or msg.src not in self.config.addresses:
            # Quorum intersection: the replica counts promises and votes by
            # ``src``, so a message from outside the member set (a removed
            # node's unrevoked token, a token issued for any other id) would
            # count as a member's vote, and an Accept from it would make this
            # node follow a ballot no member proposed. Our own messages never
            # arrive from the network (``_handle`` steps them directly).
            self.foreign += 1
            if self.foreign & (self.foreign - 1) == 0:  # 1, 2, 4, 8...: bounded noise
                logger.warning(
                    "node %d: dropped a peer message from node %d, not a member %s (%d so far)",
                    self.config.node_id,
                    msg.src,
                    sorted(self.config.addresses),
                    self.foreign,
                )
            return
        self.replica.step(msg)
        self._wake.set()

    # --------------------------------------------------------------- loops

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.tick_ms / 1000)
            assert self.replica is not None
            self.replica.tick()
            self._wake.set()

    async def _ready_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while True:
                self._propose_pending()
                assert self.replica is not None
                ready = self.replica.ready()
                self._note_role(ready)
                if ready.empty():
                    break
                await self._handle(ready)

    def _note_role(self, ready: Ready) -> None:
        """Log and count what the replica reported of elections and leadership."""
        for ballot in ready.elections:
            self.observer.election()
            logger.info(
                "node %d started an election at ballot %s", self.config.node_id, _ballot(ballot)
            )
        old, soft = self._soft, ready.soft_state or self._soft
        self._soft = soft
        leading = soft.role is Role.LEADER
        if leading != (old.role is Role.LEADER):
            logger.info(
                "node %d %s at ballot %s",
                self.config.node_id,
                "became leader" if leading else "stepped down",
                _ballot(soft.ballot),
            )
        if self._handing_over_blind():
            self._handover_settled.clear()
        else:
            self._handover_settled.set()
        if soft.leader_id != old.leader_id and soft.leader_id not in (0, self.config.node_id):
            logger.info(
                "node %d follows leader %d at ballot %s",
                self.config.node_id,
                soft.leader_id,
                _ballot(soft.leader_ballot),
            )
        if leading:
            self._leading.set()
            if old.role is not Role.LEADER or old.ballot != soft.ballot:
                self._fail_orphans()
        else:
            self._leading.clear()
        if not leading:
            self._mixer.reset()
            self._cancel_mix_timer()
        if not leading and self._proposals and not (self._handing_over and not soft.leader_id):
            # (While handing over, wait to name the new leader: callers go
            # straight there instead of retrying blind.)
            self._proposals.fail(self.not_leader_error())
        if not leading and self._reads:
            self._fail_reads(self.not_leader_error())

    def _fail_orphans(self) -> None:
        """A new term of this node's: fail what it proposed in an earlier one
        at the slots this term's phase 1 did not take up (its quorum reported
        nothing there). Nothing fills those slots until the next proposal,
        and on a quiet cluster the next proposer may be the very caller that
        waits (the tick loop): outcome unknown, retriable, as for a slot a
        snapshot covered. Slots below ``next_slot`` resolve when applied."""
        assert self.replica is not None
        next_slot = self.replica.status().next_slot
        for slot in [s for s in self._inflight if s >= next_slot]:
            self._fail_slot(
                slot, "this term did not take the slot up: outcome unknown (it may still commit)"
            )

    def _propose_pending(self) -> None:
        replica = self.replica
        assert replica is not None
        limit = self.config.max_batch_commands
        while self._proposals and (status := replica.status()).role is Role.LEADER:
            open_entries = status.next_slot - 1 - status.commit_index
            if open_entries >= self.config.open_entries and not self._proposals.fills_an_entry(
                limit
            ):
                # Group commit: these join the next entry, proposed as soon as
                # an open one commits (the ready loop runs this again then).
                self._queued = True
                return
            if open_entries == 0 and self._held_for_other_side(limit):
                return
            batch = self._proposals.peek_batch(limit)
            # Time enters only here, and never runs backwards.
            self._last_time_ms = max(self._clock_ms(), self._last_time_ms)
            data = encode_entry(
                status.next_slot,
                self._last_time_ms,
                self._proposals.encoded_batch(batch),
                # What a replica must understand to apply it (checked on apply)
                # that the log did not need already.
                features.required_by((cmd for cmd, _ in batch), self._applier.known_features()),
            )
            slot = replica.propose(data)
            if slot is None:
                return  # too much in flight: these wait for the next round
            self.observer.batch(len(batch))
            self._queued = False
            if self._mixer.hold_s:
                sides = self._proposals.sides_of_first(len(batch))
                held = self._mixer.proposed(sides, time.monotonic())
                if held is not None:
                    self.observer.held(*held)
                self._cancel_mix_timer()
            assert slot == status.next_slot
            self._proposals.remove(batch)
            # A slot we proposed at in an earlier term is being reused: that
            # proposal lost it (its callers learn so now, not never).
            self._fail_slot(slot, "a later term reused the slot")
            self._inflight[slot] = (data, [fut for _, fut in batch])

    def _held_for_other_side(self, limit: int) -> bool:
        """Whether the idle log holds what waits for the other side's
        commands (``pqueue.node.mixing``); the ready loop is woken when the
        hold ends, and by any command that comes meanwhile."""
        if not self._mixer.hold_s or self._proposals.fills_an_entry(limit):
            return False
        now = time.monotonic()
        until = self._mixer.hold(self._proposals.sides(), now, self._queued)
        if until is None:
            return False
        if self._mix_timer is None:
            loop = asyncio.get_running_loop()
            self._mix_timer = loop.call_at(loop.time() + (until - now), self._mix_due)
        return True

    def _mix_due(self) -> None:
        self._mix_timer = None
        self._wake.set()

    def _cancel_mix_timer(self) -> None:
        if self._mix_timer is not None:
            self._mix_timer.cancel()
            self._mix_timer = None

    async def _handle(self, ready: Ready) -> None:
        replica = self.replica
        assert replica is not None
        # 0. A leader's proposals (Accept, phase 2a) to the other nodes go
        #    before its own write, so their fsyncs overlap it (Raft's leader
        #    writes its log in parallel with replication, thesis 10.2.1):
        #    an Accept states no vote of this node's; its own accept vote
        #    (a message to itself) still counts only once durable, below.
        #    Only in a Ready without a new promise, and the rest keep order.
        early = [] if ready.promised is not None else _early(ready.messages, self.config.node_id)
        for msg in early:
            self._send(msg)
        if early and self._flush is not None:
            self._flush()  # on the wire before this node's own write starts
        sent = {id(msg) for msg in early}
        # 1. Persist. A Ready carrying only a commit index needs no fsync: the
        #    index is a hint, stored with the next real write.
        if ready.commit_index is not None:
            self._commit_hint = max(self._commit_hint or 0, ready.commit_index)
        if ready.promised is not None or ready.records or ready.snapshot is not None:
            snapshot = StoredSnapshot(*ready.snapshot) if ready.snapshot else None
            started = time.perf_counter()
            await self._storage.persist(ready.promised, ready.records, self._commit_hint, snapshot)
            took = time.perf_counter() - started
            self.observer.persisted(took)
            if slow := self._slow_writes.note(took, time.monotonic()):
                leading = self._soft.role is Role.LEADER
                logger.warning(
                    "node %d (%s): %s; %s (the disk or the store stalled, or this node was "
                    "too busy to hear back)",
                    self.config.node_id,
                    "leader" if leading else "follower",
                    slow,
                    "every commit's answer waited for it"
                    if leading
                    else "commits that needed this node's vote waited for it",
                )
            self._commit_hint = None
        if ready.snapshot is not None:
            index, blob = ready.snapshot
            received = time.perf_counter()
            self._applier.restore(pieces(blob))  # read a piece at a time
            logger.info(
                "node %d installed a snapshot at %d, %d bytes (received in %.2f s, "
                "restored in %.2f s)",
                self.config.node_id,
                index,
                blob.size,
                received - self._receiving_since,
                time.perf_counter() - received,
            )
            self._snapshot_index = index
            self._snapshot_size = blob.size
            self._snapshot_mark = self._applied_bytes
            self._applied_time_ms = self._applier.last_time_ms()
            for slot in [s for s in self._inflight if s <= index]:
                self._fail_slot(slot, "covered by a snapshot: outcome unknown")
        # Confirmed read indexes (the core released them after a quorum round).
        for ctx, index in ready.read_states:
            read = self._reads.get(ctx)
            if read is not None and not read.done():
                read.set_result(index)
        # 2. Send: only now may our own promise and accept vote be counted.
        sending = False
        for msg in ready.messages:
            if msg.dst == self.config.node_id:
                replica.step(msg)
            elif id(msg) not in sent:
                self._send(msg)
                sending = True
        # 3. Apply. What step 2 sent goes out first (a follower's vote, which
        #    comes with the leader's next Accept, otherwise waited for the
        #    entry before it to apply: about 0.5 ms of every commit's round
        #    trip in the single-job bench): written now, or, for a link that
        #    writes from its own task, once that task has run.
        if sending:
            flushed = self._flush() if self._flush is not None else False
            if ready.committed and not flushed:
                await asyncio.sleep(0)
        await self._apply(ready.committed)

    async def _apply(self, committed: list[tuple[int, bytes]]) -> None:
        """Apply chosen entries in order, yielding to the loop after each
        ``APPLY_SLICE_S`` of work: a long run (a replay, a catch-up) must not
        starve the timers, the peer streams and the callers. Each entry
        applies whole; between two, the state is that of a log prefix, as
        readers expect, and nothing else applies (only this loop does)."""
        total = len(committed)
        started = slice_at = noted_at = time.perf_counter()
        for done, (slot, value) in enumerate(committed, 1):
            entry = (
                logpb.LogEntry.FromString(value)
                if value
                else logpb.LogEntry(index=slot, time_ms=self._applied_time_ms)  # a no-op
            )
            self._applied_time_ms = max(self._applied_time_ms, entry.time_ms)
            self._last_time_ms = max(self._last_time_ms, entry.time_ms)
            self._applied_bytes += len(value)
            # Results only where a caller of this node waits for them.
            effects = self._applier.apply(entry, slot in self._inflight)
            self._resolve(slot, value, effects.results)
            now = time.perf_counter()
            if now - slice_at >= APPLY_SLICE_S and done < total:
                self._wake_applied()
                if now - noted_at >= PROGRESS_EVERY_S:
                    noted_at = now
                    logger.info(
                        "node %d applying: entry %d, %d of %d, %.1f s so far",
                        self.config.node_id,
                        slot,
                        done,
                        total,
                        now - started,
                    )
                await asyncio.sleep(0)
                slice_at = time.perf_counter()
        self._wake_applied()
        self._maybe_snapshot()

    def _resolve(self, slot: int, value: bytes, results: list[Result]) -> None:
        inflight = self._inflight.pop(slot, None)
        if inflight is None:
            return
        data, futures = inflight
        if data == value:
            for fut, result in zip(futures, results, strict=True):
                if not fut.done():
                    fut.set_result((result, slot))
            return
        self._fail_slot(slot, "leadership changed before the command committed", futures)

    def _fail_slot(
        self, slot: int, why: str, futures: list[asyncio.Future[Indexed]] | None = None
    ) -> None:
        """Fail a slot's callers (retriable: with an idempotency key, retry)."""
        if futures is None:
            futures = self._inflight.pop(slot, (b"", []))[1]
        if not futures:
            return
        error = UnavailableError(why, retry_after_s=0.2, reason="COMMIT_UNKNOWN")
        for fut in futures:
            if not fut.done():
                fut.set_exception(error)

    # ----------------------------------------------------------- snapshots

    def _incoming_snapshot(self, index: int, total: int) -> BlobSink:
        """Where the replica writes a snapshot it receives: a temporary file
        of the store's (which ``persist`` then records)."""
        logger.info(
            "node %d receives a snapshot at %d, %d bytes", self.config.node_id, index, total
        )
        self._receiving_since = time.perf_counter()
        return self._storage.snapshot_sink()

    def _maybe_snapshot(self) -> None:
        """Start a background snapshot if the log behind the last one passed
        its entry count or byte budget (one at a time)."""
        replica = self.replica
        if self._snapshot_task is not None or replica is None or not self._accepting:
            return
        applied = self._applier.last_index()
        behind = applied - max(self._snapshot_index, replica.status().snapshot_index)
        log_bytes = self._applied_bytes - self._snapshot_mark
        # A big state is not rewritten for a log a sliver of its size: both
        # rules wait for a log of a quarter of the last snapshot's bytes (the
        # log held in memory is then at most a quarter of the state's size).
        enough = self._snapshot_size // SNAPSHOT_RATIO
        by_entries = behind >= self.config.snapshot_every_entries and log_bytes >= enough
        by_bytes = log_bytes >= max(self.config.snapshot_log_bytes, enough)
        if behind <= 0 or not (by_entries or by_bytes):
            return
        retry_index, retry_bytes = self._snapshot_retry
        if applied < retry_index and self._applied_bytes < retry_bytes:
            return
        # The state as of now, on the loop (between applies: a consistent cut).
        started = time.perf_counter()
        view = self._applier.freeze()
        frozen = time.perf_counter() - started
        if self._snapshot_pool is None:
            self._snapshot_pool = ThreadPoolExecutor(1, thread_name_prefix="pq-snapshot")
        task = asyncio.create_task(
            self._write_snapshot(view, self._applied_bytes, self._snapshot_pool, frozen),
            name="pq-snapshot",
        )
        task.add_done_callback(self._on_snapshot_done)
        self._snapshot_task = task

    async def _write_snapshot(
        self, view: SnapshotView, mark: int, pool: ThreadPoolExecutor, frozen: float
    ) -> None:
        """Write ``view`` to a file, have the store record it, compact.

        The head (queues, records, keys: values copied at the freeze) is
        serialized by ``pool``'s one thread. The compact rows' chunks are
        serialized here, on the loop, because that view is only safe to
        read between applies (``Applier.freeze``); each is written and
        hashed by the thread while the next is made, and the loop serves
        others between chunks. Nothing holds more than a chunk or two of
        the snapshot.
        """
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        sink = self._storage.snapshot_sink()
        try:
            head = await loop.run_in_executor(pool, view.head_bytes)
            pending: asyncio.Future[None] | None = None
            for chunk in view.chunks(head):  # made while the previous one is written
                if pending is not None:
                    await pending
                pending = loop.run_in_executor(pool, sink.write, chunk)
                await asyncio.sleep(0)  # the loop serves between chunks
            if pending is not None:
                await pending
            blob = await loop.run_in_executor(pool, sink.finish_synced)
        except BaseException:
            pool.submit(sink.abort)  # after the write in flight, on its thread
            # The rows' views close as chunks() ends; a head that failed (or
            # a cancel while it was made) never started it: close them here,
            # or each queue keeps every row that leaves it for nobody.
            view.close()
            raise
        written = time.perf_counter() - started
        replica = self.replica
        assert replica is not None
        if blob is None:
            self._retry_snapshot_later(f"cannot write its file: {sink.error}")
            return
        if view.index <= replica.status().snapshot_index:
            blob.unlink()  # a newer one was installed meanwhile
            return
        try:
            await self._storage.save_snapshot(view.index, blob)
        except PQueueError as exc:
            blob.unlink()
            self._retry_snapshot_later(str(exc))
            return
        replica.compact(view.index, blob)
        self._snapshot_index = max(self._snapshot_index, view.index)
        self._snapshot_mark = max(self._snapshot_mark, mark)
        self._snapshot_size = blob.size
        self.observer.snapshot(frozen + time.perf_counter() - started, blob.size)
        logger.info(
            "node %d: snapshot at %d, %d bytes (frozen in %.2f s, written in %.2f s, "
            "recorded in %.2f s)",
            self.config.node_id,
            view.index,
            blob.size,
            frozen,
            written,
            time.perf_counter() - started - written,
        )

    def _retry_snapshot_later(self, why: str) -> None:
        """A snapshot failed: the next waits for half a budget more."""
        logger.error("node %d: snapshot failed, will retry: %s", self.config.node_id, why)
        self._snapshot_retry = (
            self._applier.last_index() + max(1, self.config.snapshot_every_entries // 2),
            self._applied_bytes + max(1, self.config.snapshot_log_bytes // 2),
        )

    def _on_snapshot_done(self, task: asyncio.Task[None]) -> None:
        if self._snapshot_task is task:
            self._snapshot_task = None
        if task.cancelled() or task.exception() is None:
            return
        exc = task.exception()
        logger.error(
            "node %d: snapshot failed (%s: %s); the log goes on",
            self.config.node_id,
            type(exc).__name__,
            exc,
            exc_info=exc,
        )
        self._retry_snapshot_later(type(exc).__name__)

    @property
    def caught_up(self) -> bool:
        """Applied all a leader has said is chosen, since this process started.

        Until then the applied state may be behind what this node showed
        before a restart (the stored commit index lags); metrics read from
        it wait, so replicated totals never appear to go backwards. Once
        true, it stays true.
        """
        if not self._caught_up and self.replica is not None:
            status = self.replica.status()
            self._caught_up = bool(status.leader_id) and status.emitted >= status.known_commit
        return self._caught_up

    def replication_lag(self) -> dict[int, int]:
        """On the leader: entries each peer's last reported commit index trails ours."""
        if self.replica is None or (status := self.replica.status()).role is not Role.LEADER:
            return {}
        return {
            peer: max(0, status.commit_index - status.peer_commit.get(peer, 0))
            for peer in status.nodes
            if peer != self.config.node_id
        }

    def status(self) -> LogStatus:
        if self.replica is None:
            return LogStatus("starting", 0, 0, 0, len(self._proposals))
        status = self.replica.status()
        return LogStatus(
            role=status.role.value,
            commit_index=status.commit_index,
            applied_index=status.emitted,
            snapshot_index=self._snapshot_index,
            pending=len(self._proposals) + len(self._inflight),
            node_id=self.config.node_id,
            ballot=status.ballot if status.role is not Role.FOLLOWER else status.leader_ballot,
            leader_id=status.leader_id,
            peers=dict(self.config.addresses),
        )


_COMMANDS_FIELD = logpb.LogEntry.DESCRIPTOR.fields_by_name["commands"].number


def encode_entry(index: int, time_ms: int, commands: list[bytes], required: list[str]) -> bytes:
    """A ``LogEntry``'s bytes, made of its commands' (encoded once, as they
    were queued): the bytes ``LogEntry(...).SerializeToString()`` gives, in
    field order, without copying each command into a new message first."""
    head = logpb.LogEntry(index=index, time_ms=time_ms).SerializeToString()
    tail = logpb.LogEntry(required_features=required).SerializeToString()
    return b"".join((head, *(length_delimited(_COMMANDS_FIELD, c) for c in commands), tail))


def _ballot(ballot: tuple[int, int]) -> str:
    """A ballot as operators read it: ``round.node``."""
    return f"{ballot[0]}.{ballot[1]}"


def _early(messages: list[PeerMessage], me: int) -> list[PeerMessage]:
    """The messages that may leave before this Ready's write: Accepts (phase
    2a) to other nodes. They carry the leader's proposals, never a vote."""
    return [m for m in messages if isinstance(m, Accept) and m.dst != me]
