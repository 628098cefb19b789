"""``Watch`` streams: the events of the entries this node applies, fanned
out to watchers, and a bounded ring of recent ones to resume from.

Each applied entry's events (``pqueue.core.events``) are published here,
synchronously from ``QueueNode.apply``. Publishing never waits: each
watcher has a bounded queue of unsent events, and a watcher whose queue
would overflow is ended (``RESOURCE_EXHAUSTED``, with the index to resume
from) instead of buffering without bound or slowing the node.

The ring keeps the events of the last entries (at most ``ring_events``
events), so a watcher that reconnects with ``from_index`` misses nothing
while that index is still covered; an older index is refused
(``FAILED_PRECONDITION``, naming the oldest index it can resume from). A
node covers entries from where it started applying: from its snapshot on
restart or after installing one, so a restarted node may refuse an index
another node still covers.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Sequence

from pqueue.core.events import Event, Row, as_event
from pqueue.errors import (
    FailedPreconditionError,
    PQueueError,
    ResourceExhaustedError,
    UnavailableError,
)

Match = Callable[[Event], bool]

#: Events kept for resuming, all queues together.
RING_EVENTS = 100_000
#: Unsent events a watcher may have before it is ended.
WATCHER_BUFFER = 10_000


class Subscription:
    """One watcher's unsent events."""

    def __init__(self, match: Match, after: int, bound: int) -> None:
        self.match = match
        #: Entries up to here are not this watcher's (it resumes after them).
        self.after = after
        self.bound = bound
        self.pending: deque[Event] = deque()
        #: The last entry offered (its events queued, or none matched).
        self.offered = after
        self.error: PQueueError | None = None
        self.changed = asyncio.Event()
        #: Set once ``error`` is.
        self.ended = asyncio.Event()

    @property
    def resume_index(self) -> int:
        """Every event of the entries up to here has been taken from the queue."""
        return self.pending[0].log_index - 1 if self.pending else self.offered

    def offer(self, index: int, events: Sequence[Event]) -> None:
        if index <= self.after or self.error is not None:
            return
        mine = [e for e in events if self.match(e)]
        if len(self.pending) + len(mine) > self.bound:
            self.end(
                ResourceExhaustedError(
                    f"watcher fell behind: over {self.bound} events unsent; "
                    f"resume with from_index={self.resume_index}"
                )
            )
            return
        self.pending.extend(mine)
        self.offered = index
        if mine:
            self.changed.set()

    def end(self, error: PQueueError) -> None:
        self.error = error
        self.changed.set()
        self.ended.set()

    def take(self) -> list[Event]:
        """The events queued so far (empties the queue)."""
        taken = list(self.pending)
        self.pending.clear()
        self.changed.clear()
        return taken


class Watchers:
    """This node's watchers and its ring of recent events."""

    def __init__(self, ring_events: int = RING_EVENTS, buffer: int = WATCHER_BUFFER) -> None:
        self.ring_events = ring_events
        self.buffer = buffer
        #: (index, its events) of the recent entries that had events: tuples
        #: of plain tuples, which the cyclic collector stops tracking.
        self._ring: deque[tuple[int, tuple[Row, ...]]] = deque()
        self._held = 0
        #: Every entry after this one is in the ring.
        self.covered_after = 0
        self.applied = 0
        self.subscriptions: set[Subscription] = set()

    def reset(self, index: int) -> None:
        """The state was replaced (a snapshot installed): events before it are
        unknown here; open watchers must reconnect (and resume elsewhere)."""
        self._ring.clear()
        self._held = 0
        self.covered_after = self.applied = index
        self.end_all(
            UnavailableError(
                "this node installed a snapshot: resume the watch", reason="SNAPSHOT_INSTALLED"
            )
        )

    def end_all(self, error: PQueueError) -> None:
        """End every open watcher with ``error`` (the node drains: UNAVAILABLE,
        so that watchers resume elsewhere)."""
        for sub in list(self.subscriptions):
            sub.end(error)

    def publish(self, index: int, events: Sequence[Row]) -> None:
        self.applied = index
        if events:
            self._ring.append((index, tuple(events)))
            self._held += len(events)
            while self._held > self.ring_events and self._ring:
                dropped, old = self._ring.popleft()
                self._held -= len(old)
                self.covered_after = dropped
        if self.subscriptions:  # ``Event``s only for a watcher
            made = [as_event(row) for row in events]
            for sub in self.subscriptions:
                sub.offer(index, made)

    def subscribe(self, match: Match, from_index: int | None) -> Subscription:
        """A watcher of the entries after ``from_index`` (None: from now)."""
        after = self.applied if from_index is None else from_index
        if after < self.covered_after:
            raise FailedPreconditionError(
                f"from_index {after} is older than this node keeps: "
                f"the oldest it can resume from is {self.covered_after}"
            )
        sub = Subscription(match, after, self.buffer)
        for index, events in self._ring:
            if index > after:
                sub.offer(index, [as_event(row) for row in events])
        if sub.error is None:
            sub.offered = max(sub.offered, self.applied)
        self.subscriptions.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self.subscriptions.discard(sub)
