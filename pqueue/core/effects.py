"""What applying one log entry did: the state machine's ``Ready``.

``QueueMachine.apply_entry`` returns an ``Effects`` record instead of leaving
side channels for the shell to drain. The shell observes it: callers get
``results``, parked long polls are woken for ``woken``, and the operators'
jobs table (PostgreSQL) rewrites the rows in ``changed``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from google.protobuf.message import Message

from pqueue.errors import PQueueError

if TYPE_CHECKING:
    from pqueue.core.events import Row

#: A command's outcome: its response message, or the error that left nothing changed.
Result = Message | PQueueError
#: The ids of the jobs one command's events are about, in order, and each
#: one's result bytes (None: 0 for all), as its handler had them at hand.
Named = tuple[list[int], list[int] | None]


@dataclass(frozen=True)
class Effects:
    """The outcome of one applied entry."""

    #: The entry's log index.
    index: int
    #: One result per command of the entry, in order.
    results: list[Result] = field(default_factory=list)
    #: Per queue, how many jobs became leasable (pushed onto a ready heap).
    woken: dict[str, int] = field(default_factory=dict)
    #: Ids of jobs whose row changed or that were removed (changed: still in
    #: ``machine.jobs``; removed: not).
    changed: frozenset[int] = frozenset()
    #: The queues those jobs are (or were, for a dropped queue) in: where a
    #: reader finds them without scanning every queue.
    touched: frozenset[str] = frozenset()
    #: What advancing time did at the start of the entry, as watch events
    #: (``pqueue.core.events``), taken before the entry's commands ran.
    advanced: tuple[Row, ...] = ()
    #: The jobs advancing time changed (a delayed job come due has no event).
    advanced_ids: frozenset[int] = frozenset()
    #: Per command, the jobs it named for its events (``Named``): the
    #: enqueue's new jobs, the lease's, the ack's with their result sizes;
    #: None where its handler records none (``events.derive`` then reads the
    #: command and its result). Plain ints: on every replica, derive would
    #: otherwise walk each command's messages a job at a time again.
    named: tuple[Named | None, ...] = ()
