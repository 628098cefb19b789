"""Multi-Paxos messages, log records and the ``Ready`` batch the core hands out.

Pure data. Ballots are ``(round, node_id)`` tuples, compared as tuples, so two
proposers never share one. ``ZERO`` is below every real ballot.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from consensus.blob import Blob

Ballot = tuple[int, int]
ZERO: Ballot = (0, 0)

#: Protocol numbers (rounds, slots, indexes, offsets) stay below this: a
#: peer's message with a larger one is dropped, never persisted (SQLite's
#: INTEGER holds < 2^63, and a round near it could never be outbid).
MAX_PROTOCOL_INT = 1 << 62
#: Node ids are 1..MAX_NODE_ID-1.
MAX_NODE_ID = 1 << 16

#: The value a new leader proposes to fill a slot nobody reported (a gap).
NOOP = b""


@dataclass(frozen=True, slots=True)
class Record:
    """What an acceptor stores for one slot."""

    slot: int
    ballot: Ballot
    value: bytes
    #: Known chosen (learned from a leader's catch-up), not merely accepted.
    chosen: bool = False


@dataclass(frozen=True, slots=True)
class Prepare:
    """Phase 1a: promise ``ballot`` for every slot from ``from_slot`` on."""

    src: int
    dst: int
    ballot: Ballot
    from_slot: int
    #: Sent on the leader's TimeoutNow (leadership transfer): voters must not
    #: refuse it for having a live leader (that leader asked for it).
    transfer: bool = False
    #: The sender takes a promise in parts (an older node does not: it gets
    #: every record in one message, as before).
    parts: bool = True


@dataclass(frozen=True, slots=True)
class Promise:
    """Phase 1b. ``ok=False`` is a refusal naming the higher ``promised``."""

    src: int
    dst: int
    ballot: Ballot
    ok: bool
    promised: Ballot
    #: Everything accepted at slots >= the prepare's ``from_slot`` (not compacted).
    records: tuple[Record, ...] = ()
    #: Slots up to here are chosen (the sender may have compacted them).
    commit_index: int = 0
    #: The ``from_slot`` of the Prepare this answers (matches parts to requests).
    from_slot: int = 0
    #: 0: ``records`` is everything. Otherwise the records stopped at a byte
    #: budget and the rest starts at this slot: the candidate asks again
    #: (a Prepare in the same ballot from here) before it counts this vote.
    more_from: int = 0


@dataclass(frozen=True, slots=True)
class Accept:
    """Phase 2a for several slots at once (pipelined, batched)."""

    src: int
    dst: int
    ballot: Ballot
    entries: tuple[tuple[int, bytes], ...]
    commit_index: int


@dataclass(frozen=True, slots=True)
class Accepted:
    """Phase 2b. ``ok=False`` is a refusal naming the higher ``promised``."""

    src: int
    dst: int
    ballot: Ballot
    ok: bool
    promised: Ballot
    slots: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """The leader is alive; slots up to ``commit_index`` are chosen."""

    src: int
    dst: int
    ballot: Ballot
    commit_index: int
    #: The leader's read round (read index): echoed in the reply.
    ctx: int = 0


@dataclass(frozen=True, slots=True)
class HeartbeatReply:
    """A follower's answer: it still follows, and how far it has learned."""

    src: int
    dst: int
    ballot: Ballot
    ok: bool
    promised: Ballot
    commit_index: int
    #: The read round of the heartbeat this answers.
    ctx: int = 0


@dataclass(frozen=True, slots=True)
class CatchupRequest:
    """Send me the chosen values from ``from_slot`` on."""

    src: int
    dst: int
    from_slot: int
    #: The sender takes a snapshot in chunks (an older node gets it whole).
    parts: bool = True


@dataclass(frozen=True, slots=True)
class CatchupReply:
    """Chosen values, contiguous from the request's slot."""

    src: int
    dst: int
    entries: tuple[tuple[int, bytes], ...]
    commit_index: int


@dataclass(frozen=True, slots=True)
class InstallSnapshot:
    """The log the follower asked for is compacted: here is the state instead.

    One chunk of it: ``data`` is the snapshot's bytes from ``offset`` on (at
    most a chunk's worth); ``total`` and ``sha256`` describe the whole, so the
    follower installs it only once every byte is there and verified.
    """

    src: int
    dst: int
    index: int
    data: bytes
    commit_index: int
    offset: int = 0
    total: int = 0
    sha256: bytes = b""


@dataclass(frozen=True, slots=True)
class SnapshotRequest:
    """A follower pulls the next chunk of the snapshot at ``index`` (flow control)."""

    src: int
    dst: int
    index: int
    offset: int


@dataclass(frozen=True, slots=True)
class PreVote:
    """Would you grant me phase 1? Changes nothing on the voter (no promise).

    ``ballot`` is the ballot the candidate would prepare with.
    """

    src: int
    dst: int
    ballot: Ballot
    commit_index: int


@dataclass(frozen=True, slots=True)
class PreVoteReply:
    """A pre-vote answer; ``promised`` lets the candidate pick a ballot above it."""

    src: int
    dst: int
    ballot: Ballot
    ok: bool
    promised: Ballot
    commit_index: int


@dataclass(frozen=True, slots=True)
class TimeoutNow:
    """Leadership transfer: the leader (at ``ballot``) asks the target to run
    phase 1 at once, skipping pre-vote."""

    src: int
    dst: int
    ballot: Ballot


Message = (
    Prepare
    | Promise
    | Accept
    | Accepted
    | Heartbeat
    | HeartbeatReply
    | CatchupRequest
    | CatchupReply
    | InstallSnapshot
    | PreVote
    | PreVoteReply
    | TimeoutNow
    | SnapshotRequest
)


class Role(Enum):
    """What a replica is doing now."""

    FOLLOWER = "follower"
    CANDIDATE = "candidate"
    LEADER = "leader"


@dataclass(frozen=True)
class SoftState:
    """A replica's volatile view of the leadership (``Ready.soft_state``).

    Reported whenever any field changed since the last ``Ready``, so the
    shell logs and counts role changes without reading the replica.
    """

    role: Role
    #: Who leads as far as we know (0: nobody known).
    leader_id: int
    #: The ballot ``leader_id`` leads at.
    leader_ballot: Ballot
    #: The ballot this replica last ran phase 1 with (its own).
    ballot: Ballot


@dataclass
class Ready:
    """What the shell must do, in this order: persist, then send, then apply.

    Messages (including those a node addresses to itself, which is how its
    own promise and its own accept vote are counted) may only leave once
    ``promised``, ``records`` and ``snapshot`` are durable. The one
    exception: in a Ready with no new ``promised``, ``Accept`` messages to
    other nodes carry proposals, never this node's vote, and may leave
    before the write (the shell sends them first, so fsyncs overlap).
    """

    promised: Ballot | None = None
    records: list[Record] = field(default_factory=list)
    #: Replace the application state with this snapshot (received whole and
    #: verified) and drop the log up to its index.
    snapshot: tuple[int, Blob] | None = None
    messages: list[Message] = field(default_factory=list)
    #: Chosen values to apply, contiguous and in slot order.
    committed: list[tuple[int, bytes]] = field(default_factory=list)
    #: The commit index to persist (a hint that spares a restart some catch-up).
    commit_index: int | None = None
    #: Confirmed read indexes: ``(ctx, index)`` per ``Replica.read_index`` call.
    #: A read may be served once the state has applied up to ``index``.
    read_states: list[tuple[int, int]] = field(default_factory=list)
    #: The leadership view, when it changed since the last ``Ready`` (else None).
    soft_state: SoftState | None = None
    #: Ballots at which this replica started phase 1 (an election) since then.
    elections: list[Ballot] = field(default_factory=list)

    def empty(self) -> bool:
        """Nothing to do."""
        return not (
            self.promised
            or self.records
            or self.snapshot
            or self.messages
            or self.committed
            or self.commit_index is not None
            or self.read_states
            or self.soft_state is not None
            or self.elections
        )
