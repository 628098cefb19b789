"""Holding an idle leader's next entry for the other side of the queue (pure).

A queue's log is written by two sides: producers (``enqueue``) and
consumers (``lease``, ``ack``, ``nack``, ``extend``). Under a steady load
each side sends its next commands once the entry holding its last ones
commits, and group commit (``ClusterConfig.open_entries``) lets the two
fall into step *alternately*: while the producers' entry is open the
consumers' commands wait and go in the next one, and while that one is
open the producers' next enqueues wait for the one after. Every round of
the queue then costs two entries (two durable writes on each replica, two
rounds of peer messages, two applies' fixed costs) where one would do. In
session 13's measurements such per-round costs were two thirds of the
nodes' CPU a single job.

So when the log is idle and what waits is one side's alone, the entry
proposed last held the other side's commands, and the two sides are seen
alternating (what waits queued behind an open entry, or the last hold was
joined), the leader holds the entry for at most ``hold_s`` for the other
side's next commands. The hold ends as soon as they come (the entry goes
with both), when what waits fills an entry, or when anything else waits
(a queue's admin command, a tick). It never starts for a side working
alone (producers with nobody consuming, a drain of a backlog: the entry
before held no other side's commands), nor at low load, where a command
finds the log idle (a worker's ack after the entry that leased its job
along with the enqueue): one hold that ends joined is needed before a
command that did not queue is held, and one that times out stops that.

Only the moment an entry is proposed changes: its commands, their order
and every rule that applies them are the same, and nothing is answered
before it is durable on a majority, as before.
"""

from __future__ import annotations

#: The longest hold a node may be configured with (it adds to a lone side's latency).
MAX_MIX_WAIT_MS = 1000.0

PRODUCE = 1
CONSUME = 2
OTHER = 4
BOTH = PRODUCE | CONSUME

#: The side of each command kind that has one (every other kind, an
#: operator's ``complete_job`` or ``requeue_job`` included, is ``OTHER``:
#: it ends a hold).
SIDES = {
    "enqueue": PRODUCE,
    "lease": CONSUME,
    "ack": CONSUME,
    "nack": CONSUME,
    "extend": CONSUME,
}


def side_of(kind: str | None) -> int:
    """The side a command of this kind comes from (``OTHER``: neither)."""
    return SIDES.get(kind, OTHER) if kind is not None else OTHER


class Mixer:
    """When an idle leader proposes its next entry: now, or after a hold."""

    __slots__ = ("hold_s", "joined", "last", "since", "until")

    def __init__(self, hold_s: float) -> None:
        if hold_s < 0:
            raise ValueError("the hold must not be negative")
        self.hold_s = hold_s
        #: The sides of the entry proposed last.
        self.last = 0
        #: Whether the last hold ended with the other side joining it.
        self.joined = False
        #: The hold in progress: when it started and when it ends.
        self.since: float | None = None
        self.until = 0.0

    def hold(self, waiting: int, now: float, queued: bool) -> float | None:
        """Until when to hold an entry of what waits (its sides) while the
        log is idle; None: propose it now. ``queued``: what waits queued
        behind an open entry."""
        if not self.hold_s or waiting not in (PRODUCE, CONSUME) or not self.last & BOTH & ~waiting:
            return None
        if self.since is None:
            if not (queued or self.joined):
                return None  # nothing says the other side is on its way
            self.since, self.until = now, now + self.hold_s
        return self.until if now < self.until else None

    def reset(self) -> None:
        """No longer leading: no hold is in progress, no entry was proposed."""
        self.last, self.since, self.joined = 0, None, False

    def proposed(self, sides: int, now: float) -> tuple[float, str] | None:
        """An entry of these sides was proposed: how long a hold before it
        lasted and how it ended (None: no hold): ``joined`` (the other side
        came), ``timed_out``, or ``cut`` (something else went first)."""
        self.last = sides
        since, self.since = self.since, None
        if since is None:
            return None
        self.joined = sides & BOTH == BOTH
        if self.joined:
            return now - since, "joined"
        return now - since, "timed_out" if now >= self.until else "cut"


__all__ = ["BOTH", "CONSUME", "MAX_MIX_WAIT_MS", "OTHER", "PRODUCE", "SIDES", "Mixer", "side_of"]
