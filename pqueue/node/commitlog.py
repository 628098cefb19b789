"""The log seam: how commands become durable, ordered and applied.

``CommandLog`` is what the node and servicer depend on; ``Applier`` is what it
needs from the state machine. ``pqueue.node.replicated.ReplicatedLog`` implements
it with Multi-Paxos, one node being a quorum of one, so there is one code
path; another log could take its place without touching the state machine
or the servicer.

Order of effects per entry, which is what makes acknowledgements safe:
stamp time -> persist (fsync, on a majority) -> apply -> answer callers.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Protocol

from google.protobuf.message import Message

from pqueue.core.effects import Effects
from pqueue.core.limits import MAX_ENTRY_BYTES, take_batch
from pqueue.core.snapshot import SnapshotView
from pqueue.errors import PQueueError
from pqueue.node.mixing import side_of
from pqueue.v1 import log_pb2 as logpb

logger = logging.getLogger(__name__)

Result = Message | PQueueError
#: A command's result and the log index of the entry that applied it.
Indexed = tuple[Result, int]


class Applier(Protocol):
    """The state-machine side of the seam."""

    def apply(self, entry: logpb.LogEntry, respond: bool = True) -> Effects:
        """Apply a committed entry; what it did (``results``: one per command;
        ``respond`` False: nobody here waits for them, see
        ``QueueMachine.apply_entry``)."""

    def freeze(self) -> SnapshotView:
        """The state at the last applied index, serialized piece by piece
        (``SnapshotView.chunks``) while entries go on being applied."""

    def restore(self, data: Iterable[bytes]) -> None:
        """Replace the state with a snapshot's, read piece by piece."""

    def last_time_ms(self) -> int:
        """The time of the last applied entry (new entries never go below it)."""

    def last_index(self) -> int:
        """The index of the last applied entry (what ``snapshot`` covers)."""

    def known_features(self) -> AbstractSet[str]:
        """The features the log applied so far needs: every replica that
        applies a later entry supports them, so its stamp leaves them out."""


class LogObserver(Protocol):
    """What a log reports as it works (metrics); every call is cheap and never fails."""

    def batch(self, commands: int) -> None:
        """A log entry was proposed carrying this many commands (group commit)."""

    def persisted(self, seconds: float) -> None:
        """A durable write (fsync, or a committed transaction) took this long."""

    def held(self, seconds: float, outcome: str) -> None:
        """An idle leader held an entry this long for the other side's
        commands (``pqueue.node.mixing``); how the hold ended (``joined``,
        ``timed_out``, ``cut``)."""

    def election(self) -> None:
        """This node started a phase 1 (an election) at a new ballot."""

    def snapshot(self, seconds: float, size: int) -> None:
        """This node took a snapshot of ``size`` bytes in ``seconds`` (state to stored)."""


class NoObserver:
    """A ``LogObserver`` that keeps nothing."""

    def batch(self, commands: int) -> None:
        pass

    def persisted(self, seconds: float) -> None:
        pass

    def held(self, seconds: float, outcome: str) -> None:
        pass

    def election(self) -> None:
        pass

    def snapshot(self, seconds: float, size: int) -> None:
        pass


@dataclass(frozen=True)
class LogStatus:
    """What a log reports about itself (for status output and metrics)."""

    role: str
    commit_index: int
    applied_index: int
    snapshot_index: int
    pending: int
    node_id: int = 0
    ballot: tuple[int, int] = (0, 0)
    leader_id: int = 0
    peers: dict[int, str] = field(default_factory=dict)


class CommandLog(Protocol):
    """Orders commands, makes them durable, applies them, answers callers."""

    async def start(self) -> None:
        """Recover (snapshot + replay) and begin accepting commands."""

    async def stop(self) -> None:
        """Refuse new commands, finish the pending ones, release storage."""

    async def submit(self, command: logpb.Command) -> Message:
        """The command's result once durable and applied; raises its error."""

    async def submit_indexed(self, command: logpb.Command) -> tuple[Message, int]:
        """``submit``, with the log index of the entry that applied the command."""

    def submit_many(self, commands: Sequence[logpb.Command]) -> list[asyncio.Future[Indexed]]:
        """Queue ``commands`` in order, each on its own (they may share an
        entry): the future of each one's (result or error, index). Raises, for
        all of them, what ``submit_indexed`` raises when the log cannot take
        commands now; a future may also fail with a ``PQueueError``."""

    def status(self) -> LogStatus:
        """Current indexes and role."""

    @property
    def cluster_id(self) -> str:
        """The cluster this node belongs to (its data dir's record)."""

    @property
    def failed(self) -> asyncio.Event:
        """Set once the log has failed for good; the node must stop."""

    @property
    def is_leader(self) -> bool:
        """Whether this node may take commands now."""

    def leader_hint(self) -> tuple[int, str]:
        """The leader's node id and address if known, else (0, "")."""

    def not_leader_error(self) -> PQueueError:
        """The error for a command this node cannot take (leader hint inside)."""

    async def handover_settled(self) -> None:
        """Return once this node, handing leadership over, knows its successor
        or the handover ended (at once when it is not handing over)."""

    async def transfer_leadership(self, timeout_s: float) -> bool:
        """Hand leadership to another node; True once another node leads."""

    async def read_barrier(self, timeout_s: float = 5.0) -> int:
        """On the leader: wait until a linearizable read may be served; the read index."""

    async def wait_applied(self, index: int, timeout_s: float) -> None:
        """Wait until the state has applied up to ``index`` (read your writes)."""


Pending = tuple[logpb.Command, "asyncio.Future[Indexed]"]


class Proposals:
    """Commands waiting for a log: each caller awaits its own command's result."""

    def __init__(self) -> None:
        self.items: list[Pending] = []
        #: Each item's command encoded (once, when it arrives: the entry is
        #: made of these bytes), and the sum of their sizes.
        self.encoded: list[bytes] = []
        self.bytes = 0
        #: Each item's side (``pqueue.node.mixing``), and how many wait of each.
        self._item_sides: list[int] = []
        self._of_side: dict[int, int] = {}
        #: Set when commands arrive (the log's loop waits on it).
        self.wake = asyncio.Event()

    def __len__(self) -> int:
        return len(self.items)

    async def submit(self, command: logpb.Command) -> Message:
        """Queue ``command``; its result once the log resolves it (errors raised)."""
        return (await self.submit_indexed(command))[0]

    def add(self, command: logpb.Command) -> asyncio.Future[Indexed]:
        """Queue ``command`` as it is now (it is encoded here); the future of
        its (result or error, index)."""
        fut: asyncio.Future[Indexed] = asyncio.get_running_loop().create_future()
        encoded = command.SerializeToString()
        self.items.append((command, fut))
        self.encoded.append(encoded)
        self.bytes += len(encoded)
        side = side_of(command.WhichOneof("kind"))
        self._item_sides.append(side)
        self._of_side[side] = self._of_side.get(side, 0) + 1
        self.wake.set()
        return fut

    async def submit_indexed(self, command: logpb.Command) -> tuple[Message, int]:
        """``submit``, with the log index of the entry that applied ``command``."""
        result, index = await self.add(command)
        if isinstance(result, PQueueError):
            raise result
        return result, index

    def peek_batch(self, max_commands: int) -> list[Pending]:
        """The commands the next entry would hold (group commit, bounded in bytes)."""
        n = take_batch(self.encoded, len, max_commands)
        return self.items[:n]

    def encoded_batch(self, batch: list[Pending]) -> list[bytes]:
        """The encoded commands of ``batch`` (taken with ``peek_batch``)."""
        return self.encoded[: len(batch)]

    def sides(self) -> int:
        """The sides of what waits (``pqueue.node.mixing``)."""
        mask = 0
        for side, count in self._of_side.items():
            if count:
                mask |= side
        return mask

    def sides_of_first(self, n: int) -> int:
        """The sides of the first ``n`` commands waiting (a batch's)."""
        mask = 0
        for side in self._item_sides[:n]:
            mask |= side
        return mask

    def fills_an_entry(self, max_commands: int) -> bool:
        """Whether what waits fills an entry (by count or bytes): it goes at once."""
        return len(self.items) >= max_commands or self.bytes >= MAX_ENTRY_BYTES

    def remove(self, batch: list[Pending]) -> None:
        """Drop a batch taken with ``peek_batch`` (it went into an entry)."""
        n = len(batch)
        self.bytes -= sum(map(len, self.encoded[:n]))
        for side in self._item_sides[:n]:
            self._of_side[side] -= 1
        del self.items[:n]
        del self.encoded[:n]
        del self._item_sides[:n]

    def fail(self, error: PQueueError, batch: list[Pending] | None = None) -> None:
        """Fail ``batch`` (default: everything waiting) with ``error``."""
        if batch is None:
            batch, self.items, self.encoded, self.bytes = self.items, [], [], 0
            self._item_sides, self._of_side = [], {}
        for _, fut in batch:
            if not fut.done():
                fut.set_exception(error)
