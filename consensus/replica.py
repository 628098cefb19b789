"""Multi-Paxos as a pure state machine (after etcd/raft's shape).

A ``Replica`` is proposer, acceptor and learner in one. It does no IO, reads
no clock and draws randomness only from the ``random.Random`` it is given.
Inputs: ``tick()``, ``step(message)``, ``propose(value)``, ``compact(...)``.
Output: ``ready()``, a batch the shell handles in a fixed order: persist the
promise, records and snapshot; then send the messages; then apply the
committed values.

Messages a node addresses to itself travel the same way, so a candidate's own
promise and a leader's own accept vote are counted only after the node's own
persist, exactly like everybody else's.

Protocol, briefly: a node that hears no leader for a randomized election
timeout runs phase 1 once, for every slot after its commit index, with a
fresh ballot ``(round, node_id)``. With promises from a majority it re-proposes
the highest-ballot value reported for each open slot (a no-op where none
was), then proposes new values at the following slots, several in flight at
once (phase 2). A slot is chosen when a majority accepted it in the leader's
ballot. Followers learn the commit index from accepts and heartbeats, and
fetch values they lack from the leader (or a snapshot once the leader has
compacted them). Around that: pre-vote (a node asks before it raises any
promise), leadership transfer (TimeoutNow), read index (a quorum round before
a linearizable read), and byte budgets (multi-part promises, chunked
snapshots, bounded accepts and re-offers).

Over 400 lines on purpose: one state machine whose safety invariants span the
three roles (the promise an acceptor persisted is what a candidate's ballot
is checked against; the commit index a learner advances is what a leader
serves reads at). Split by role, each invariant would be read across files,
and the simulator (``tests/sim``) drives exactly this one class.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from hashlib import sha256
from typing import TYPE_CHECKING, Any

from consensus.blob import Blob, BlobSink, as_blob, memory_sink
from consensus.messages import (
    MAX_NODE_ID,
    MAX_PROTOCOL_INT,
    NOOP,
    ZERO,
    Accept,
    Accepted,
    Ballot,
    CatchupReply,
    CatchupRequest,
    Heartbeat,
    HeartbeatReply,
    InstallSnapshot,
    Message,
    Prepare,
    PreVote,
    PreVoteReply,
    Promise,
    Ready,
    Record,
    SnapshotRequest,
    SoftState,
    TimeoutNow,
)
from consensus.messages import Role as Role  # defined with SoftState; importable here as before

if TYPE_CHECKING:
    from random import Random


@dataclass(frozen=True)
class ReplicaStatus:
    """A frozen copy of what a shell may ask a replica (``Replica.status``)."""

    id: int
    role: Role
    leader_id: int
    leader_ballot: Ballot
    ballot: Ballot
    commit_index: int
    #: Last slot handed out in ``Ready.committed`` (applied once handled).
    emitted: int
    #: Highest slot known chosen anywhere.
    known_commit: int
    snapshot_index: int
    #: The slot the next proposal takes (leader).
    next_slot: int
    #: Commit indexes peers last reported (leader), copied.
    peer_commit: dict[int, int]
    nodes: tuple[int, ...]
    #: Where a leadership transfer goes (0: none under way).
    transfer_target: int


@dataclass(frozen=True)
class Config:
    """Timing and limits, in ticks and counts."""

    node_id: int
    #: Every node of the cluster, this one included.
    nodes: tuple[int, ...]
    election_ticks: int = 10
    heartbeat_ticks: int = 2
    max_inflight_slots: int = 128
    max_batch_entries: int = 256
    #: An Accept or CatchupReply stops adding entries past this many value
    #: bytes (it always carries at least one, so an entry larger than this
    #: goes alone). Well under the transport's message limit (64 MiB) even
    #: with one maximal entry (16 MiB) in it.
    max_batch_bytes: int = 4 << 20
    #: A Promise stops adding records past this many value bytes (at least
    #: one) and says where it stopped; the candidate asks for the rest.
    max_promise_bytes: int = 8 << 20
    #: Per heartbeat, a leader re-offers each node at most this many value
    #: bytes of the slots it has not voted for (at least one slot).
    max_reoffer_bytes: int = 8 << 20
    #: A leader takes no new proposal while the values of its unchosen slots
    #: pass this many bytes (it always takes one).
    max_inflight_bytes: int = 64 << 20
    #: A snapshot travels in chunks of this many bytes, each pulled by the
    #: follower (flow control: a window of chunks in flight per follower).
    snapshot_chunk_bytes: int = 1 << 20
    #: How many chunk requests a follower keeps in flight (pipelining hides
    #: the round trip: a 130 MB snapshot is 130 chunks).
    snapshot_window: int = 4
    #: After serving a snapshot, compacting keeps the log after it (up to
    #: this many value bytes) for this many ticks: the follower restoring it
    #: then goes on from the log, not from yet another snapshot (a big state
    #: restores for longer than the log takes to reach the next snapshot).
    catchup_hold_ticks: int = 1200
    catchup_hold_bytes: int = 64 << 20
    catchup_retry_ticks: int = 4

    def __post_init__(self) -> None:
        if self.node_id <= 0 or self.node_id not in self.nodes:
            raise ValueError("node_id must be a positive id listed in nodes")
        if len(set(self.nodes)) != len(self.nodes):
            raise ValueError("nodes must be distinct")
        if not 0 < self.heartbeat_ticks < self.election_ticks:
            raise ValueError("need 0 < heartbeat_ticks < election_ticks")
        if self.max_inflight_slots < 1 or self.max_batch_entries < 1:
            raise ValueError("max_inflight_slots and max_batch_entries must be positive")
        if min(self.max_promise_bytes, self.max_reoffer_bytes, self.snapshot_chunk_bytes) < 1:
            raise ValueError("byte budgets must be positive")
        if self.snapshot_window < 1:
            raise ValueError("snapshot_window must be positive")
        if not all(0 < n < MAX_NODE_ID for n in self.nodes):
            raise ValueError(f"node ids must be in 1..{MAX_NODE_ID - 1}")


@dataclass
class _Incoming:
    """A snapshot being received, chunk by chunk (follower side)."""

    index: int
    total: int
    digest: bytes
    #: Where the bytes go (a file, in the node), and their SHA-256 so far.
    sink: BlobSink
    hasher: Any = field(default_factory=sha256)
    #: Bytes received (and written to ``sink``) so far: the next offset.
    received: int = 0
    #: The source's chunk size (learnt from the first chunk; 0: not yet).
    chunk: int = 0
    #: Where the next request starts (requests run ahead of ``received``).
    asked: int = 0
    #: Chunks that arrived ahead of a missing one, by offset (at most a window).
    early: dict[int, bytes] = field(default_factory=dict)
    #: Catch-up retries since the last chunk arrived (a stalled transfer is
    #: dropped after a few, so the node can start over).
    idle: int = 0
    #: Ticks since the last chunk arrived (past a few election timeouts the
    #: transfer is given up, so a node whose source died campaigns again).
    idle_ticks: int = 0
    #: The node serving it: the rest is pulled from there, even after the
    #: lead moves (another node's snapshot would restart the transfer).
    source: int = 0


@dataclass
class DurableState:
    """What a replica persisted: all it needs to restart safely."""

    promised: Ballot = ZERO
    records: dict[int, Record] = field(default_factory=dict)
    commit_index: int = 0
    #: (index, blob); bytes are taken too (wrapped in a ``MemoryBlob``).
    snapshot: tuple[int, Blob | bytes] | None = None


class Replica:
    """One node's Multi-Paxos roles. See the module docstring."""

    def __init__(
        self,
        config: Config,
        rng: Random,
        durable: DurableState | None = None,
        sinks: Callable[[int, int], BlobSink] = memory_sink,
    ) -> None:
        self.config = config
        self.id = config.node_id
        self.majority = len(config.nodes) // 2 + 1
        self.rng = rng
        #: Makes the sink a received snapshot is written to: (index, total) -> sink.
        self._sinks = sinks
        durable = durable or DurableState()
        self.promised: Ballot = durable.promised
        self.log: dict[int, Record] = dict(durable.records)
        index, blob = durable.snapshot or (0, b"")
        #: The latest snapshot: its index and its bytes (read in chunks, never whole).
        self.snapshot_index, self.snapshot_blob = index, as_blob(blob)
        self.commit_index = max(self.snapshot_index, 0)
        #: Highest slot known chosen anywhere (our target while catching up).
        self.known_commit = max(durable.commit_index, self.snapshot_index)
        #: Last slot handed out for applying; restarts from the snapshot.
        self.emitted = self.snapshot_index
        self.max_round = self.promised[0]
        self.role = Role.FOLLOWER
        self.leader_id = 0
        self.leader_ballot: Ballot = ZERO
        self.ballot: Ballot = ZERO
        self.election_elapsed = 0
        self.election_timeout = self._random_timeout()
        self.heartbeat_elapsed = 0
        self.catchup_wait = 0
        self._init_role_state()
        self._out = Ready()
        #: The soft state last reported in a ``Ready`` (the shell starts from
        #: this same one: a follower that knows no leader, at ``ZERO``).
        self._soft = self._soft_state()
        self._accept_buffer: list[tuple[int, bytes]] = []
        self._trust_upto = 0
        self._init_transfer_state()
        # Records up to the persisted commit index hold chosen values: a
        # committed slot's record is never overwritten, and the hint is
        # persisted with (or after) the records it covers.
        while self.commit_index < durable.commit_index and self.commit_index + 1 in self.log:
            self.commit_index += 1

    def _init_role_state(self) -> None:
        """Candidate, leader, pre-vote, transfer and read-index state (all empty)."""
        # Candidate and leader state.
        self.promises: dict[int, Promise] = {}
        self.prepare_from = 0
        self.prepare_transfer = False
        self.votes: dict[int, set[int]] = {}
        self.proposals: dict[int, bytes] = {}
        self.chosen: set[int] = set()
        self.next_slot = 1
        self.heard: set[int] = set()
        #: Commit indexes peers reported to us (where to catch up from).
        self.peer_commit: dict[int, int] = {}
        #: A leader heard a majority in its last check-quorum period.
        self.quorum_ok = False
        #: Slots the last phase 1 re-proposed, with their values (for checkers).
        self.recovered: dict[int, bytes] = {}
        # Pre-vote: the ballot we would prepare with, and who would grant it.
        self.pre_ballot: Ballot = ZERO
        self.pre_votes: set[int] = set()
        #: Ticks since catch-up data last moved our commit index.
        self.catchup_progress_elapsed = self.config.election_ticks
        self._tick_commit = self.commit_index
        # Leadership transfer (leader only): to whom, and for how long so far.
        self.transfer_target = 0
        self.transfer_elapsed = 0
        # Read index (leader only). Reads wait for a heartbeat round sent after
        # they were registered; ``read_seq`` numbers those rounds.
        self.read_seq = 0
        self.read_acks: dict[int, int] = {}
        self.pending_reads: list[tuple[int, int, int]] = []  # (round, ctx, index)
        self._read_round_due = False
        #: Every slot a previous leader may have had chosen is <= this (set by
        #: phase 1): a read index is never below it.
        self.lead_floor = 0

    def _init_transfer_state(self) -> None:
        """Multi-part promises and chunked snapshots, both ways (none under way)."""
        #: Candidate: promises that came in parts, per node: the slot the next
        #: part starts at, the records so far, the highest commit index seen.
        #: Keyed to ``_partial_ballot``: parts of another ballot never mix.
        self._partial: dict[int, tuple[int, list[Record], int]] = {}
        self._partial_ballot: Ballot = ZERO
        #: Follower: the snapshot being received, if any.
        self._incoming: _Incoming | None = None
        #: The snapshot before the current one (index, blob), kept while a
        #: follower still pulls its chunks: compacting again mid-way must not
        #: restart a transfer (at a high write rate it would never finish).
        #: Dropped once nobody asked for it for a few election timeouts.
        self._retained: tuple[int, Blob] | None = None
        self._retained_idle = 0
        #: Ticks since a follower last pulled a chunk of the current snapshot.
        self._served_idle = 1 << 30
        #: The index of the snapshot we last served a chunk of, and ticks since.
        self._served_index = 0
        self._hold_idle = 1 << 30
        #: The log is kept from this slot on (compacting may hold slots at or
        #: below the snapshot index for a follower's catch-up: see ``compact``).
        self._log_from = self.snapshot_index + 1

    # ------------------------------------------------------------- inputs

    def tick(self) -> None:
        """One unit of time passed."""
        self.election_elapsed += 1
        self._served_idle += 1
        self._hold_idle += 1
        if (
            self._log_from <= self.snapshot_index
            and self._hold_idle > self.config.catchup_hold_ticks
        ):
            self._drop_log_upto(self.snapshot_index)  # nobody came back for it
        if self._retained is not None:
            self._retained_idle += 1
            if self._retained_idle > 3 * self.config.election_ticks:
                self._retained = None
        self.catchup_progress_elapsed += 1
        if self.commit_index != self._tick_commit:
            self._tick_commit, self.catchup_progress_elapsed = self.commit_index, 0
        if self.catchup_wait:
            self.catchup_wait -= 1
        if self.role is Role.FOLLOWER:
            if self.election_elapsed >= self.election_timeout and not self._installing_blocks():
                self._campaign()
            elif self.commit_index < self.known_commit and self.leader_id:
                self._request_catchup(self.leader_id)
            return
        self.heartbeat_elapsed += 1
        if self.role is Role.CANDIDATE:
            if self.election_elapsed >= self.election_timeout:
                self._campaign()  # split vote or lost messages: ask again, then go higher
            elif self.heartbeat_elapsed >= self.config.heartbeat_ticks:
                self.heartbeat_elapsed = 0
                for node in self.config.nodes:
                    if node not in self.promises:
                        self._send(
                            Prepare(
                                self.id,
                                node,
                                self.ballot,
                                self._prepare_resume(node),
                                self.prepare_transfer,
                            )
                        )
            return
        if self.transfer_target:
            self.transfer_elapsed += 1
            if self.transfer_elapsed >= self.config.election_ticks:
                self.transfer_target = 0  # the target did not take over: lead on
            else:
                self.heartbeat_elapsed = self.config.heartbeat_ticks  # hurry its catch-up
        if self.heartbeat_elapsed >= self.config.heartbeat_ticks:
            self.heartbeat_elapsed = 0
            self._heartbeat()
            self._maybe_timeout_now()
        if self.election_elapsed >= self.election_timeout:
            # Check quorum: a leader cut off from a majority steps down, so a
            # stale leader stops serving instead of believing it still leads.
            self.quorum_ok = len(self.heard | {self.id}) >= self.majority
            if not self.quorum_ok:
                self._become_follower(0, ZERO)
            self.heard = set()
            self.election_elapsed = 0
        if self.commit_index < self.known_commit:
            self._request_catchup(self._best_catchup_source())

    def propose(self, value: bytes) -> int | None:
        """Propose ``value`` at the next slot; the slot, or None if we cannot now.

        None means: not the leader (yet), too many slots in flight, or handing
        leadership over. A slot number is no promise: only applying ``value``
        at that slot is.
        """
        if (
            self.role is not Role.LEADER
            or len(self.votes) >= self.config.max_inflight_slots
            or self.transfer_target
        ):
            return None
        # Memory (and every link's queue) stays bounded however large entries are.
        if self.votes and self._inflight_bytes() + len(value) > self.config.max_inflight_bytes:
            return None
        slot = self.next_slot
        self.next_slot += 1
        self._propose_at(slot, value)
        return slot

    def transfer_leadership(self, target: int = 0) -> int:
        """Hand leadership to ``target`` (default: the most up-to-date peer).

        The leader stops taking proposals, waits until the target has
        committed everything it has, then sends it ``TimeoutNow``; the target
        runs phase 1 at once. After an election timeout without success the
        leader takes proposals again. Returns the target, or 0 if there is
        nobody to hand over to (not the leader, a one-node cluster).
        """
        others = [n for n in self.config.nodes if n != self.id]
        if self.role is not Role.LEADER or not others:
            return 0
        if not target:
            target = max(others, key=lambda n: (self.peer_commit.get(n, 0), -n))
        if target not in others:
            raise ValueError(f"cannot transfer leadership to {target}: not a peer")
        self.transfer_target, self.transfer_elapsed = target, 0
        self._heartbeat()  # fresh commit indexes from everyone
        self._maybe_timeout_now()
        return target

    def abort_transfer(self) -> None:
        """Give up a leadership transfer: take proposals again."""
        self.transfer_target = self.transfer_elapsed = 0

    def read_index(self, ctx: int) -> bool:
        """Ask for a linearizable read point; False if we do not lead.

        Once a majority has answered a heartbeat round sent after this call,
        ``Ready.read_states`` carries ``(ctx, index)``: serve the read once
        the state has applied up to ``index``. No newer leader can have
        committed anything before this call (a majority still followed us
        after it), and everything committed before it is at or below
        ``index`` (our commit index, and at least every slot phase 1 found).
        """
        if self.role is not Role.LEADER:
            return False
        index = max(self.commit_index, self.lead_floor)
        if self.majority == 1:
            self._out.read_states.append((ctx, index))
            return True
        # Every read registered before the next ready() shares one round.
        self.pending_reads.append((self.read_seq + 1, ctx, index))
        self._read_round_due = True
        return True

    def compact(self, index: int, snapshot: Blob | bytes) -> None:
        """The application holds a snapshot at ``index`` (durably, in
        ``snapshot``): forget the log up to it."""
        if index > self.emitted:
            raise ValueError(f"cannot compact to {index}: applied only to {self.emitted}")
        if index <= self.snapshot_index:
            return
        if self.snapshot_index and self._served_idle <= 3 * self.config.election_ticks:
            # A follower is pulling the current one: keep it until it is done.
            self._retained = (self.snapshot_index, self.snapshot_blob)
            self._retained_idle = 0
        self.snapshot_index, self.snapshot_blob = index, as_blob(snapshot)
        upto, served = index, self._served_index
        if self._hold_idle <= self.config.catchup_hold_ticks and self._log_from <= served + 1:
            # A follower got (or is getting) the snapshot at ``served``: keep
            # the chosen values after it, so that once it has restored it goes
            # on from the log, not from this newer snapshot (a big state may
            # restore for longer than the log takes to reach the next one).
            held = sum(len(r.value) for s, r in self.log.items() if served < s <= index)
            if held <= self.config.catchup_hold_bytes:
                upto = min(served, index)
        self._drop_log_upto(upto)

    def _drop_log_upto(self, upto: int) -> None:
        """Forget the log up to ``upto`` (covered by the snapshot)."""
        for slot in [s for s in self.log if s <= upto]:
            del self.log[slot]
        self._log_from = max(self._log_from, upto + 1)

    def ready(self) -> Ready:
        """Everything to persist, send and apply since the last call."""
        if self._read_round_due and self.role is Role.LEADER:
            self._read_round_due = False
            self.read_seq += 1
            for node in self.config.nodes:
                if node != self.id:
                    self._send(
                        Heartbeat(self.id, node, self.ballot, self.commit_index, self.read_seq)
                    )
        out, self._out = self._out, Ready()
        soft = self._soft_state()
        if soft != self._soft:
            out.soft_state = self._soft = soft
        if self._accept_buffer:
            fresh, self._accept_buffer = self._accept_buffer, []
            for batch in self._batches(fresh):
                for node in self.config.nodes:
                    out.messages.append(
                        Accept(self.id, node, self.ballot, batch, self.commit_index)
                    )
        if self.emitted < self.commit_index:
            out.committed = [
                (s, self._value_at(s)) for s in range(self.emitted + 1, self.commit_index + 1)
            ]
            self.emitted = self.commit_index
        return out

    def _soft_state(self) -> SoftState:
        return SoftState(self.role, self.leader_id, self.leader_ballot, self.ballot)

    def status(self) -> ReplicaStatus:
        """A frozen copy of the replica's indexes and leadership view (the
        shell's queries read this, never the replica's fields)."""
        return ReplicaStatus(
            id=self.id,
            role=self.role,
            leader_id=self.leader_id,
            leader_ballot=self.leader_ballot,
            ballot=self.ballot,
            commit_index=self.commit_index,
            emitted=self.emitted,
            known_commit=self.known_commit,
            snapshot_index=self.snapshot_index,
            next_slot=self.next_slot,
            peer_commit=dict(self.peer_commit),
            nodes=tuple(self.config.nodes),
            transfer_target=self.transfer_target,
        )

    @property
    def installing_snapshot(self) -> bool:
        """Receiving a snapshot (it cannot serve, and it does not campaign)."""
        return self._incoming is not None

    @property
    def catching_up(self) -> bool:
        """Cannot serve until a transfer completes (for pre-vote: such a node
        should not ask for votes). Today: ``installing_snapshot``."""
        return self.installing_snapshot

    def _installing_blocks(self) -> bool:
        """Whether a snapshot transfer in progress keeps us from campaigning
        (a node that cannot serve must not lead); one stalled for several
        election timeouts is given up instead."""
        incoming = self._incoming
        if incoming is None:
            return False
        incoming.idle_ticks += 1
        if incoming.idle_ticks > 3 * self.config.election_ticks:
            self._drop_incoming()
            return False
        return True

    def step(self, msg: Message) -> None:
        """Handle one message addressed to this node.

        A message from a stranger, or with a number out of range, is dropped
        before it can touch (let alone persist) any state.
        """
        if not self._plausible(msg):
            return
        if isinstance(msg, CatchupReply | InstallSnapshot):
            self.catchup_progress_elapsed = 0  # catching up: see _campaign
        match msg:
            case Prepare():
                self._on_prepare(msg)
            case Promise():
                self._on_promise(msg)
            case Accept():
                self._on_accept(msg)
            case Accepted():
                self._on_accepted(msg)
            case Heartbeat():
                self._on_heartbeat(msg)
            case HeartbeatReply():
                self._on_heartbeat_reply(msg)
            case CatchupRequest():
                self._on_catchup_request(msg)
            case CatchupReply():
                self._on_catchup_reply(msg)
            case InstallSnapshot():
                self._on_install_snapshot(msg)
            case PreVote():
                self._on_pre_vote(msg)
            case PreVoteReply():
                self._on_pre_vote_reply(msg)
            case TimeoutNow():
                self._on_timeout_now(msg)
            case SnapshotRequest():
                self._on_snapshot_request(msg)

    # ------------------------------------------------------------ acceptor

    def _promise(self, ballot: Ballot) -> None:
        """Raise the promise. It is persisted before any reply leaves
        (``Ready`` order), so a restart never forgets what we promised."""
        if ballot > self.promised:
            self.promised = ballot
            self._out.promised = ballot
        self.max_round = max(self.max_round, ballot[0])

    def _on_prepare(self, msg: Prepare) -> None:
        self.max_round = max(self.max_round, msg.ballot[0])
        # A Prepare in the ballot we already promised is a candidate fetching
        # the rest of our promise (or a resend): answering promises nothing new.
        again = msg.ballot == self.promised and msg.ballot != ZERO
        # A candidate whose commit index is behind our compacted log could not
        # serve as leader (it needs a snapshot first): refuse it. Liveness
        # holds: our snapshot index <= our commit index <= the highest commit
        # index among live nodes, so the most advanced live node is never
        # refused for this.
        behind = msg.src != self.id and msg.from_slot <= self.snapshot_index
        if (
            msg.ballot < self.promised
            or (not again and not msg.transfer and self._has_live_leader(msg.src))
            or (not again and behind)
        ):
            # Refusing is always safe. Refusing while a live leader serves us
            # keeps a node that lost touch (or just restarted) from deposing it;
            # unless that leader itself handed over (a transfer).
            self._send(Promise(self.id, msg.src, msg.ballot, False, self.promised))
            return
        self._promise(msg.ballot)
        if msg.src != self.id:
            if self.role is not Role.FOLLOWER and msg.ballot > self.ballot:
                self._become_follower(0, ZERO)
            self.election_elapsed = 0  # give the candidate its chance
        # Report every accepted, not-yet-chosen slot from from_slot on. Slots up
        # to our commit index are chosen; commit_index tells the candidate so,
        # and it must not re-propose them (we may have compacted them).
        # Records up to a byte budget (at least one); ``more_from`` says where
        # the rest starts, so no Promise outgrows a peer message.
        floor = max(msg.from_slot, self.commit_index + 1)
        records: list[Record] = []
        size, more_from = 0, 0
        for slot in sorted(s for s in self.log if s >= floor):
            record = self.log[slot]
            if records and msg.parts and size + len(record.value) > self.config.max_promise_bytes:
                more_from = slot
                break
            records.append(record)
            size += len(record.value)
        self._send(
            Promise(
                self.id,
                msg.src,
                msg.ballot,
                True,
                msg.ballot,
                tuple(records),
                self.commit_index,
                msg.from_slot,
                more_from,
            )
        )

    def _on_accept(self, msg: Accept) -> None:
        self.max_round = max(self.max_round, msg.ballot[0])
        if msg.ballot < self.promised:
            self._send(Accepted(self.id, msg.src, msg.ballot, False, self.promised))
            return
        self._promise(msg.ballot)
        if msg.src != self.id:
            self._follow(msg.src, msg.ballot)
        voted = []
        for slot, value in msg.entries:
            existing = self.log.get(slot)
            if slot <= self.commit_index or (existing is not None and existing.chosen):
                # Chosen already: by Paxos the leader sends this same value. Vote
                # only if it does (or we compacted it): never help a wrong value.
                if existing is None or existing.value == value:
                    voted.append(slot)
                continue
            record = Record(slot, msg.ballot, value)
            self.log[slot] = record
            self._out.records.append(record)
            voted.append(slot)
        # The vote leaves only after the records above are durable (Ready order).
        slots = tuple(voted)
        self._send(Accepted(self.id, msg.src, msg.ballot, True, msg.ballot, slots))
        self._learn_commit(msg.commit_index, msg.ballot, msg.src)

    def _on_heartbeat(self, msg: Heartbeat) -> None:
        self.max_round = max(self.max_round, msg.ballot[0])
        if msg.ballot < self.promised:
            self._send(
                HeartbeatReply(
                    self.id, msg.src, msg.ballot, False, self.promised, self.commit_index, msg.ctx
                )
            )
            return
        self._promise(msg.ballot)
        if msg.src != self.id:
            self._follow(msg.src, msg.ballot)
        self._learn_commit(msg.commit_index, msg.ballot, msg.src)
        self._send(
            HeartbeatReply(
                self.id, msg.src, msg.ballot, True, msg.ballot, self.commit_index, msg.ctx
            )
        )

    def _on_pre_vote(self, msg: PreVote) -> None:
        # A pre-vote changes nothing here: no promise, no max_round, no timer.
        # Grant only if we too lost our leader, and only to a candidate that
        # has committed at least what we have: a node cut off for a while, or
        # still behind, cannot win and so never raises anybody's promise.
        grant = not self._has_live_leader(msg.src) and msg.commit_index >= self.commit_index
        self._send(
            PreVoteReply(self.id, msg.src, msg.ballot, grant, self.promised, self.commit_index)
        )

    def _on_pre_vote_reply(self, msg: PreVoteReply) -> None:
        # Our real ballot must beat every promise we hear of.
        self.max_round = max(self.max_round, msg.promised[0])
        if not msg.ok or self.role is not Role.FOLLOWER or msg.ballot != self.pre_ballot:
            return
        self.pre_votes.add(msg.src)
        if len(self.pre_votes) >= self.majority:
            self._start_election()

    def _on_timeout_now(self, msg: TimeoutNow) -> None:
        # Only our current leader may hand over to us, and only once.
        if (
            self.role is Role.FOLLOWER
            and msg.src == self.leader_id
            and msg.ballot == self.leader_ballot
            and msg.ballot >= self.promised
        ):
            self._start_election(transfer=True)

    # ------------------------------------------------------------ proposer

    def _campaign(self) -> None:
        """The election timer fired: run a pre-vote round, not phase 1.

        Phase 1 raises promises, and a raised promise makes its holder refuse
        the serving leader's heartbeats; so only a node a majority would elect
        (no live leader there, and it is not behind them) may prepare. A node
        still receiving catch-up data far behind the commit index does not
        even ask: a node that cannot serve does not campaign.
        """
        self._become_follower(0, ZERO)
        self.pre_ballot, self.pre_votes = ZERO, set()
        if (
            self.known_commit - self.commit_index > self.config.max_batch_entries
            and self.catchup_progress_elapsed < self.config.election_ticks
        ):
            return
        self.pre_ballot = (max(self.max_round, self.promised[0]) + 1, self.id)
        self.pre_votes = {self.id}
        if len(self.pre_votes) >= self.majority:
            self._start_election()
            return
        for node in self.config.nodes:
            if node != self.id:
                self._send(PreVote(self.id, node, self.pre_ballot, self.commit_index))

    def _start_election(self, transfer: bool = False) -> None:
        # The old ballot's phase-2 state must not outlive it: a leftover buffer
        # would go out stamped with a ballot that had no phase 1.
        self.votes, self.proposals, self.chosen, self._accept_buffer = {}, {}, set(), []
        self._reset_leader_state()
        self.pre_ballot, self.pre_votes = ZERO, set()
        self.prepare_transfer = transfer
        self.role = Role.CANDIDATE
        self.leader_id, self.leader_ballot = 0, ZERO
        self.max_round = max(self.max_round, self.promised[0]) + 1
        self.ballot = (self.max_round, self.id)
        self._out.elections.append(self.ballot)
        self.promises = {}
        self.prepare_from = self.commit_index + 1
        self.election_elapsed = 0
        self.heartbeat_elapsed = 0
        self.election_timeout = self._random_timeout()
        for node in self.config.nodes:  # ourselves included: counted after our persist
            self._send(Prepare(self.id, node, self.ballot, self.prepare_from, transfer))

    def _on_promise(self, msg: Promise) -> None:
        if not msg.ok:
            self._on_refusal(msg.promised)
            return
        if self.role is not Role.CANDIDATE or msg.ballot != self.ballot:
            return
        if msg.src in self.promises:
            return  # a duplicate
        if self._partial_ballot != self.ballot:
            self._partial_ballot, self._partial = self.ballot, {}
        # A vote counts only once we hold *every* record it reports: phase 1's
        # safety (a chosen value is seen by the quorum) needs each promise
        # whole. Parts are taken strictly in order; a lost or stale part is
        # asked again on the next candidate tick (see _prepare_resume).
        expected, records, commit = self._partial.get(msg.src, (self.prepare_from, [], 0))
        if (msg.from_slot or self.prepare_from) != expected:
            return  # a duplicate or a stale part
        records.extend(msg.records)
        commit = max(commit, msg.commit_index)
        if msg.more_from:
            if msg.more_from <= expected:
                return  # no progress: malformed, wait for a resend
            self._partial[msg.src] = (msg.more_from, records, commit)
            self._send(Prepare(self.id, msg.src, self.ballot, msg.more_from))
            # Phase 1 is progressing: a long promise must not time the
            # election out (liveness only; votes still need every part).
            self.election_elapsed = 0
            return
        self._partial.pop(msg.src, None)
        self.promises[msg.src] = Promise(
            msg.src,
            msg.dst,
            msg.ballot,
            True,
            msg.promised,
            tuple(records),
            commit,
            self.prepare_from,
        )
        if len(self.promises) >= self.majority:
            self._become_leader()

    def _prepare_resume(self, node: int) -> int:
        """Where a (re)sent Prepare to ``node`` starts: the part we wait for."""
        if self._partial_ballot == self.ballot and node in self._partial:
            return self._partial[node][0]
        return self.prepare_from

    def _become_leader(self) -> None:
        self.role = Role.LEADER
        self.leader_id, self.leader_ballot = self.id, self.ballot
        self.votes, self.proposals, self.chosen = {}, {}, set()
        self._accept_buffer = []
        self._reset_leader_state()
        self.heard = set(self.promises)
        self.quorum_ok = True
        self.election_elapsed = 0
        # Slots up to the highest reported commit index are chosen: never
        # re-propose them (their records may be compacted away on every node
        # of this quorum); learn them by catch-up instead.
        # Our own knowledge counts even when our own promise is not among the
        # majority: acceptors reported only slots from prepare_from on, so the
        # slots before it are covered by nothing but our commit index.
        max_commit = max(
            self.prepare_from - 1,
            self.commit_index,
            *(p.commit_index for p in self.promises.values()),
        )
        self.known_commit = max(self.known_commit, max_commit)
        # Above that, the safe value of each slot is the highest-ballot one any
        # promise reported: a chosen value was accepted by a majority, which
        # meets this quorum, and nothing with a higher ballot differs from it.
        best: dict[int, Record] = {}
        for promise in self.promises.values():
            for record in promise.records:
                if record.slot > max_commit and (
                    record.slot not in best or record.ballot > best[record.slot].ballot
                ):
                    best[record.slot] = record
        top = max(best, default=max_commit)
        self.next_slot = max(top, max_commit, self.commit_index) + 1
        self.recovered = {}
        for slot in range(max_commit + 1, top + 1):
            # Gaps get a no-op, so the log stays contiguous for learners.
            value = best[slot].value if slot in best else NOOP
            self.recovered[slot] = value
            self._propose_at(slot, value)
        # Every slot an earlier leader could have had chosen is <= here.
        self.lead_floor = self.next_slot - 1
        self._heartbeat()
        if self.commit_index < self.known_commit:
            self._request_catchup(self._best_catchup_source())

    def _propose_at(self, slot: int, value: bytes) -> None:
        self.votes[slot] = set()
        self.proposals[slot] = value
        self._accept_buffer.append((slot, value))

    def _on_accepted(self, msg: Accepted) -> None:
        if not msg.ok:
            self._on_refusal(msg.promised)
            return
        if self.role is not Role.LEADER or msg.ballot != self.ballot:
            return
        self.heard.add(msg.src)
        for slot in msg.slots:
            voters = self.votes.get(slot)
            if voters is None:
                continue
            voters.add(msg.src)
            if len(voters) >= self.majority:
                # Chosen: a majority accepted this value in our ballot.
                del self.votes[slot]
                self.chosen.add(slot)
        self._advance_commit(trusted=None)

    def _on_heartbeat_reply(self, msg: HeartbeatReply) -> None:
        if not msg.ok:
            self._on_refusal(msg.promised)
            return
        if self.role is Role.LEADER and msg.ballot == self.ballot:
            self.heard.add(msg.src)
            self.peer_commit[msg.src] = msg.commit_index
            if msg.ctx > self.read_acks.get(msg.src, 0):
                self.read_acks[msg.src] = msg.ctx
                self._confirm_reads()
            self._maybe_timeout_now()

    def _confirm_reads(self) -> None:
        """Release reads whose round a majority (us included) answered."""
        if not self.pending_reads:
            return
        rounds = sorted(
            [self.read_seq, *(self.read_acks.get(n, 0) for n in self.config.nodes if n != self.id)],
            reverse=True,
        )
        confirmed = rounds[self.majority - 1]
        waiting = []
        for seq, ctx, index in self.pending_reads:
            if seq <= confirmed:
                self._out.read_states.append((ctx, index))
            else:
                waiting.append((seq, ctx, index))
        self.pending_reads = waiting

    def _maybe_timeout_now(self) -> None:
        """Transfer: once the target holds all we committed, tell it to run."""
        target = self.transfer_target
        if (
            target
            and self.role is Role.LEADER
            and not self.votes
            and not self._accept_buffer
            and self.commit_index >= self.lead_floor
            and self.peer_commit.get(target, 0) >= self.commit_index
        ):
            self._send(TimeoutNow(self.id, target, self.ballot))

    def _reset_leader_state(self) -> None:
        """Forget a leadership's transfer and reads (their waiters are refused)."""
        self.transfer_target = self.transfer_elapsed = 0
        self.pending_reads, self.read_acks, self._read_round_due = [], {}, False

    def _on_refusal(self, promised: Ballot) -> None:
        """Someone promised a higher ballot than ours."""
        self.max_round = max(self.max_round, promised[0])
        if self.role is Role.FOLLOWER or promised <= self.ballot:
            return
        if self.role is Role.LEADER and self.quorum_ok:
            # We still lead a majority: take the lead again above that ballot
            # (one round trip) rather than leave the cluster leaderless.
            self._start_election()
        else:
            self._become_follower(0, ZERO)

    def _has_live_leader(self, candidate: int) -> bool:
        """Whether we are served by a live leader other than ``candidate``."""
        if candidate == self.id:
            return False
        if self.role is Role.LEADER:
            return self.quorum_ok
        return (
            self.role is Role.FOLLOWER
            and self.leader_id not in (0, candidate)
            and self.election_elapsed < self.config.election_ticks
        )

    def _heartbeat(self) -> None:
        for node in self.config.nodes:
            if node != self.id:
                self._send(Heartbeat(self.id, node, self.ballot, self.commit_index, self.read_seq))
        # Messages get lost: offer every slot still short of a majority again.
        if self.votes:
            for node in self.config.nodes:
                missing = self._missing(node)
                for batch in self._batches(missing):
                    self._send(Accept(self.id, node, self.ballot, batch, self.commit_index))

    # ------------------------------------------------------------- learner

    def _learn_commit(self, leader_commit: int, ballot: Ballot, leader: int) -> None:
        self.known_commit = max(self.known_commit, leader_commit)
        # Trust same-ballot records only up to what this message says is
        # committed: known_commit may come from a newer regime.
        self._trust_upto = leader_commit
        self._advance_commit(trusted=ballot)
        self._trust_upto = 0
        if self.commit_index < self.known_commit and leader != self.id:
            self._request_catchup(leader)

    def _advance_commit(self, trusted: Ballot | None) -> None:
        """Move the commit index over every slot whose chosen value we hold.

        A record accepted in the current leader's ballot is that leader's only
        value for the slot, so once the leader says the slot is committed the
        record is the chosen value. Anything else needs a chosen mark or our
        own count of votes.
        """
        start = self.commit_index
        by_votes: set[int] = set()
        while self._holds_chosen(self.commit_index + 1, trusted):
            slot = self.commit_index + 1
            self.commit_index = slot
            if slot in self.chosen and slot in self.proposals:
                by_votes.add(slot)
            self.chosen.discard(slot)
        for slot in [s for s in self.votes if s <= self.commit_index]:
            del self.votes[slot]  # committed another way (catch-up, snapshot)
        if self.commit_index > start:
            self.known_commit = max(self.known_commit, self.commit_index)
            self._out.commit_index = self.commit_index
            for slot in [s for s in self.proposals if s <= self.commit_index]:
                value = self.proposals.pop(slot)
                # Only what our own votes chose: a slot learned another way holds
                # its chosen value, and our proposal was never chosen there.
                if slot in by_votes:
                    self._store_chosen(slot, value)

    def _store_chosen(self, slot: int, value: bytes) -> None:
        """Make a slot we committed durable here before it is applied.

        Our own accept may not be durable yet (others' votes can arrive
        first), and an older ballot's record may sit in the slot.
        """
        record = self.log.get(slot)
        if record is None or record.value != value or record.ballot != self.ballot:
            record = Record(slot, self.ballot, value, chosen=True)
            self.log[slot] = record
            self._out.records.append(record)

    def _holds_chosen(self, slot: int, trusted: Ballot | None) -> bool:
        """Whether we hold the chosen value of ``slot`` (see ``_advance_commit``)."""
        if slot in self.chosen and slot in self.proposals:
            return True  # our own proposal, voted by a majority
        record = self.log.get(slot)
        if record is None:
            return False
        if record.chosen:
            return True
        return trusted is not None and record.ballot == trusted and slot <= self._trust_upto

    def _missing(self, node: int) -> list[tuple[int, bytes]]:
        """Slots ``node`` has not voted for, oldest first, up to the re-offer
        byte budget (at least one): a heartbeat never re-sends megabytes."""
        missing: list[tuple[int, bytes]] = []
        size = 0
        for slot in sorted(self.votes):
            if node in self.votes[slot]:
                continue
            value = self.proposals[slot]
            if missing and size + len(value) > self.config.max_reoffer_bytes:
                break
            missing.append((slot, value))
            size += len(value)
        return missing

    def _inflight_bytes(self) -> int:
        return sum(len(self.proposals.get(s, b"")) for s in self.votes)

    def _request_catchup(self, source: int) -> None:
        if self.catchup_wait or source in (0, self.id):
            return
        self.catchup_wait = self.config.catchup_retry_ticks
        incoming = self._incoming
        if incoming is not None:
            incoming.idle += 1
            if incoming.idle <= 3:
                # Resume the transfer where it stopped (a chunk was lost), from
                # the node serving it: it keeps that snapshot until we are done.
                incoming.asked = incoming.received
                self._ask_chunks(incoming, incoming.source or source)
                return
            self._drop_incoming()  # stalled: start over (or let us campaign)
        self._send(CatchupRequest(self.id, source, self.commit_index + 1))

    def _best_catchup_source(self) -> int:
        """A node known to be ahead of us; a different one each time, so one
        that died cannot stall us."""
        for promise in self.promises.values():
            self.peer_commit[promise.src] = max(
                self.peer_commit.get(promise.src, 0), promise.commit_index
            )
        ahead = sorted(
            n for n, c in self.peer_commit.items() if c > self.commit_index and n != self.id
        )
        return self.rng.choice(ahead) if ahead else 0

    def _on_catchup_request(self, msg: CatchupRequest) -> None:
        if msg.from_slot <= self.snapshot_index and msg.from_slot < self._log_from:
            # An older node installs whatever one InstallSnapshot carries: it
            # gets the whole snapshot (as before), never a chunk.
            self._send_snapshot_chunk(msg.src, 0, whole=not msg.parts)
            return
        last = min(self.commit_index, msg.from_slot + self.config.max_batch_entries - 1)
        entries = [(s, self._value_at(s)) for s in range(msg.from_slot, last + 1)]
        first = next(iter(self._batches(entries)), ())  # the rest on the next request
        self._send(CatchupReply(self.id, msg.src, first, self.commit_index))

    def _on_catchup_reply(self, msg: CatchupReply) -> None:
        self.catchup_wait = 0
        self.known_commit = max(self.known_commit, msg.commit_index)
        for slot, value in msg.entries:
            # The sender had these committed: they are chosen, whatever we accepted.
            if slot > self.commit_index:
                record = Record(
                    slot, self.log[slot].ballot if slot in self.log else ZERO, value, True
                )
                self.log[slot] = record
                self._out.records.append(record)
        self._advance_commit(trusted=None)
        if self.commit_index < self.known_commit:
            self._request_catchup(msg.src)

    def _send_snapshot_chunk(
        self,
        dst: int,
        offset: int,
        whole: bool = False,
        snapshot: tuple[int, Blob] | None = None,
    ) -> None:
        """One chunk of our snapshot (or of ``snapshot``, the retained one);
        every chunk carries its length and digest, so a follower can start
        from any of them."""
        if snapshot is None:
            snapshot = (self.snapshot_index, self.snapshot_blob)
            self._served_idle = 0
        else:
            self._retained_idle = 0
        index, blob = snapshot
        self._served_index, self._hold_idle = index, 0
        n = blob.size - offset if whole else self.config.snapshot_chunk_bytes
        self._send(
            InstallSnapshot(
                self.id,
                dst,
                index,
                blob.read(offset, n),
                self.commit_index,
                offset,
                blob.size,
                blob.digest,
            )
        )

    def _on_snapshot_request(self, msg: SnapshotRequest) -> None:
        if self.snapshot_index == 0:
            return
        retained = self._retained
        if retained is not None and msg.index == retained[0] and msg.offset < retained[1].size:
            self._send_snapshot_chunk(msg.src, msg.offset, snapshot=retained)
        elif msg.index == self.snapshot_index and msg.offset < self.snapshot_blob.size:
            self._send_snapshot_chunk(msg.src, msg.offset)
        else:
            # We compacted further since (or never had that one): a newer
            # snapshot restarts the transfer from its first chunk.
            self._send_snapshot_chunk(msg.src, 0)

    def _on_install_snapshot(self, msg: InstallSnapshot) -> None:
        self.known_commit = max(self.known_commit, msg.commit_index)
        incoming = self._incoming
        if msg.index <= self.commit_index:
            if incoming is not None and incoming.index <= self.commit_index:
                self._drop_incoming()  # overtaken: the log caught us up
            return
        if (
            incoming is None
            or msg.index > incoming.index
            or (
                msg.index == incoming.index
                and (msg.total, msg.sha256) != (incoming.total, incoming.digest)
            )
        ):
            # A (newer) snapshot: start receiving it from its first chunk.
            if msg.offset != 0:
                self._send(SnapshotRequest(self.id, msg.src, msg.index, 0))
                return
            self._drop_incoming()
            incoming = self._incoming = _Incoming(
                msg.index,
                msg.total,
                msg.sha256,
                self._sinks(msg.index, msg.total),
                source=msg.src,
            )
        elif msg.index < incoming.index:
            return  # an older snapshot's chunk
        if msg.offset != incoming.received:
            # A duplicate or late chunk is ignored; one ahead of a missing one
            # (reordered, or its predecessor lost) waits, within the window.
            # A lost chunk is asked for again by the catch-up retry.
            if (
                incoming.received < msg.offset < incoming.asked
                and len(incoming.early) < self.config.snapshot_window
            ):
                incoming.early[msg.offset] = msg.data
            return
        data: bytes | None = msg.data
        while data is not None:
            if incoming.received + len(data) > incoming.total or not (
                data or incoming.received == incoming.total
            ):
                self._drop_incoming()  # does not add up: start over on the next retry
                return
            if not incoming.chunk:
                incoming.chunk = len(data)  # the source's chunk size: what to ask for next
            incoming.sink.write(data)
            incoming.hasher.update(data)
            incoming.received += len(data)
            data = incoming.early.pop(incoming.received, None)
        incoming.idle = incoming.idle_ticks = 0
        if incoming.received < incoming.total:
            self.catchup_wait = self.config.catchup_retry_ticks
            self._ask_chunks(incoming, msg.src)
            return
        self._incoming = None
        self.catchup_wait = 0
        if incoming.hasher.digest() != incoming.digest:
            incoming.sink.abort()
            return  # corrupt: never installed; the catch-up retry starts over
        blob = incoming.sink.finish(incoming.digest)
        if blob is None:
            return  # the sink could not keep it (a full disk): start over later
        self._install_snapshot(msg.src, msg.index, blob)

    def _ask_chunks(self, incoming: _Incoming, dst: int) -> None:
        """Keep ``snapshot_window`` chunk requests in flight from the first
        byte we lack (flow control: the follower pulls; the window hides the
        round trip). Before the first chunk the chunk size is unknown: one."""
        step = incoming.chunk
        if not step:
            self._send(SnapshotRequest(self.id, dst, incoming.index, incoming.received))
            return
        end = min(incoming.total, incoming.received + self.config.snapshot_window * step)
        offset = max(incoming.asked, incoming.received)
        while offset < end:
            if offset not in incoming.early:
                self._send(SnapshotRequest(self.id, dst, incoming.index, offset))
            offset += step
        incoming.asked = offset

    def _drop_incoming(self) -> None:
        """Give up the snapshot being received (its bytes are discarded)."""
        if self._incoming is not None:
            self._incoming.sink.abort()
            self._incoming = None

    def _install_snapshot(self, src: int, index: int, blob: Blob) -> None:
        """Replace our state with a complete, verified snapshot at ``index``."""
        self.snapshot_index, self.snapshot_blob = index, blob
        self._drop_log_upto(index)
        self.commit_index = self.emitted = index
        self._out.snapshot = (index, blob)
        self._out.committed = []  # anything queued is older than the snapshot
        self._out.commit_index = index
        self._advance_commit(trusted=None)
        if self.commit_index < self.known_commit:
            self._request_catchup(src)

    # -------------------------------------------------------------- helpers

    def _follow(self, leader: int, ballot: Ballot) -> None:
        if self.role is not Role.FOLLOWER and ballot > self.ballot:
            self._become_follower(leader, ballot)
        if self.role is Role.FOLLOWER:
            self.leader_id, self.leader_ballot = leader, ballot
            self.election_elapsed = 0
            self.pre_ballot, self.pre_votes = ZERO, set()  # a leader serves: stop asking

    def _become_follower(self, leader: int, ballot: Ballot) -> None:
        self.role = Role.FOLLOWER
        self.quorum_ok = False
        self.leader_id, self.leader_ballot = leader, ballot
        self.votes, self.promises, self.chosen = {}, {}, set()
        self.proposals = {}
        self._accept_buffer = []
        self._reset_leader_state()
        self.election_elapsed = 0
        self.election_timeout = self._random_timeout()

    def _value_at(self, slot: int) -> bytes:
        """The chosen value of a committed slot (a leader's own proposal first)."""
        if slot in self.proposals:
            return self.proposals[slot]
        return self.log[slot].value

    def _batches(self, entries: list[tuple[int, bytes]]) -> list[tuple[tuple[int, bytes], ...]]:
        """Split entries into message-sized batches (count and bytes bounded)."""
        batches: list[tuple[tuple[int, bytes], ...]] = []
        current: list[tuple[int, bytes]] = []
        size = 0
        for entry in entries:
            if current and (
                len(current) >= self.config.max_batch_entries
                or size + len(entry[1]) > self.config.max_batch_bytes
            ):
                batches.append(tuple(current))
                current, size = [], 0
            current.append(entry)
            size += len(entry[1])
        if current:
            batches.append(tuple(current))
        return batches

    def _plausible(self, msg: Message) -> bool:
        """Whether every id and number in ``msg`` is in range (see MAX_PROTOCOL_INT)."""
        nodes = self.config.nodes
        if msg.src not in nodes or msg.dst != self.id:
            return False
        ballots: list[Ballot] = [getattr(msg, "ballot", ZERO), getattr(msg, "promised", ZERO)]
        numbers: list[int] = [
            getattr(msg, name, 0)
            for name in ("from_slot", "commit_index", "index", "offset", "total", "more_from")
        ]
        if isinstance(msg, Promise):
            ballots += [r.ballot for r in msg.records]
            numbers += [r.slot for r in msg.records]
        if isinstance(msg, Accept | CatchupReply):
            numbers += [slot for slot, _ in msg.entries]
        if isinstance(msg, Accepted):
            numbers += msg.slots
        return all(0 <= n < MAX_PROTOCOL_INT for n in numbers) and all(
            0 <= b[0] < MAX_PROTOCOL_INT and (b == ZERO or b[1] in nodes) for b in ballots
        )

    def _random_timeout(self) -> int:
        if len(self.config.nodes) == 1:
            return 1  # a quorum of one has nobody to wait for
        return self.rng.randint(self.config.election_ticks, 2 * self.config.election_ticks)

    def _send(self, msg: Message) -> None:
        self._out.messages.append(msg)
