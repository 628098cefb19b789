"""What a log entry did, as ``WatchEvent``s (the ``Watch`` stream's events).

Pure and deterministic: the events of an entry follow from the entry, the
``Effects`` applying it returned and the state after it, so every replica
derives the same events in the same order. That is what lets a watcher
resume on another node from a log index and, by counting the events of that
index it already has, miss nothing and see nothing twice.

Order within an entry: first what advancing time did (``advanced``, taken
by the machine right after ``advance``, before the entry's commands), by
job id; then each command's events in command order; then the jobs a
command changed without naming them (a redrive, a schedule's tick), by id.
A delayed job becoming ready, and jobs removed (purged, deleted, pruned)
have no event of their own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from itertools import repeat
from typing import NamedTuple, Protocol

from pqueue.core.effects import Effects
from pqueue.core.jobs import CANCELLED, COMPLETED, DEAD, DELAYED, READY, Job
from pqueue.v1 import log_pb2 as logpb
from pqueue.v1 import queue_pb2 as pb

WAITING = (READY, DELAYED)
#: The reason ``_expire`` records on a job not leased by its expiry.
EXPIRED_REASON = "expired"


class Event(NamedTuple):
    """A ``WatchEvent``'s fields: a tuple is made for every change of every
    entry on every node (cheap), a message only for a watcher that gets it."""

    log_index: int
    time_ms: int
    queue: str
    job_id: int
    kind: int
    state: int = 0
    attempt: int = 0
    priority: int = 0
    result_bytes: int = 0
    reason: str = ""

    def to_proto(self) -> pb.WatchEvent:
        return pb.WatchEvent(**self._asdict())


#: An ``Event``'s fields as a plain tuple, in its order: what ``derive``
#: returns and a node keeps in its ring of recent events (``as_event`` makes
#: the ``Event`` where a watcher wants one). Plain, because the cyclic
#: collector stops tracking a plain tuple of atoms the first time it sees
#: one, and tracks a ``NamedTuple`` (a subclass) for as long as it lives: a
#: busy node's ring of 100,000 events was then the bulk of every collection
#: of the older generations, and each event's way through them (session 21).
Row = tuple[int, int, str, int, int, int, int, int, int, str]


def as_event(row: Row) -> Event:
    """The ``Event`` of a ``Row``."""
    return Event._make(row)


K = pb.WatchEvent  # the kinds


class Jobs(Protocol):
    """What derivation reads of the machine."""

    time_ms: int

    def find_job(self, job_id: int, among: Iterable[str] | None = None) -> Job | None: ...

    def job_brief(self, job_id: int, among: Iterable[str]) -> tuple[str, int, int, int] | None: ...

    def briefs_in(self, queue: str) -> Callable[[int], tuple[int, int, int] | None] | None: ...


def _job_row(
    kind: int, job: Job, index: int, now: int, result_bytes: int = 0, reason: str = ""
) -> Row:
    return (
        index,
        now,
        job.queue,
        job.job_id,
        kind,
        job.state,
        job.attempts,
        job.priority,
        result_bytes,
        reason,
    )


def advanced(jobs: Jobs, changed: Iterable[int], touched: Iterable[str], now: int) -> list[Row]:
    """The events of what ``advance`` did to the ``changed`` jobs (their
    state right after it; ``log_index`` is filled in by ``derive``)."""
    among = list(touched)
    out = []
    for job_id in sorted(changed):
        job = jobs.find_job(job_id, among)
        if job is None:
            continue  # pruned
        last_error = job.errors[-1] if job.errors else None
        failed_now = last_error is not None and last_error[1] == now
        if job.state == DEAD:
            expired = job.reason == EXPIRED_REASON or (not failed_now and not job.reason)
            kind = K.EXPIRED if expired else K.DEAD
            out.append(_job_row(kind, job, 0, now, reason=job.reason))
        elif job.state in WAITING and failed_now and last_error is not None:
            out.append(_job_row(K.NACKED, job, 0, now, reason=last_error[2]))
    return out


def derive(entry: logpb.LogEntry, effects: Effects, jobs: Jobs) -> list[Row]:
    """Every event of one applied entry, in order (see the module's doc), as
    ``Row``s."""
    index, now = effects.index, jobs.time_ms
    events: list[Row] = [(index, *e[1:]) for e in effects.advanced]
    explained: set[int] = {e[3] for e in events}  # job_id
    touched = effects.touched
    changed = effects.changed

    def job(job_id: int) -> Job | None:
        return jobs.find_job(job_id, touched) if job_id in changed else None

    append, mark = events.append, explained.add

    def add_all(
        queue: str, kind: int, named: Iterable[tuple[int, int]], gone: bool = False
    ) -> None:
        """The events of the jobs (id, result bytes) a command on ``queue``
        named (each looked up there first: a job stays in the queue its
        command names). ``gone``: a job no longer held still gets its event
        (an acked job no record keeps), as ``COMPLETED``."""
        brief_of = jobs.briefs_in(queue)
        for job_id, size in named:
            brief = None
            if job_id in changed:
                brief = brief_of(job_id) if brief_of is not None else None
                if brief is None and (found := jobs.job_brief(job_id, touched)) is not None:
                    name, state, attempt, priority = found
                    append((index, now, name, job_id, kind, state, attempt, priority, size, ""))
                    mark(job_id)
                    continue
            if brief is not None:
                state, attempt, priority = brief
                fields = (index, now, queue, job_id, kind, state, attempt, priority, size, "")
            elif gone:
                fields = (index, now, queue, job_id, kind, COMPLETED, 0, 0, size, "")
            else:
                continue
            append(fields)
            mark(job_id)

    def add(kind: int, job_id: int, result_bytes: int = 0, reason: str = "") -> bool:
        """The job's event, if it is still there (False: it is gone)."""
        brief = jobs.job_brief(job_id, touched) if job_id in changed else None
        if brief is None:
            return False
        queue, state, attempt, priority = brief
        events.append(
            (index, now, queue, job_id, kind, state, attempt, priority, result_bytes, reason)
        )
        explained.add(job_id)
        return True

    named_by = effects.named
    for i, (cmd, result) in enumerate(zip(entry.commands, effects.results, strict=False)):
        if isinstance(result, Exception):
            continue  # refused: nothing changed
        what = cmd.WhichOneof("kind")
        # What the handler named (plain ints), else read off the messages.
        named = named_by[i] if i < len(named_by) else None
        pairs: Iterable[tuple[int, int]] | None = None
        if named is not None:
            ids, sizes = named
            if sizes is None:
                pairs = zip(ids, repeat(0), strict=False)
            else:
                pairs = zip(ids, sizes, strict=True)
        if what == "enqueue" and isinstance(result, pb.EnqueueBatchResponse):
            if pairs is None:
                pairs = ((one.job_id, 0) for one in result.results if not one.duplicate)
            add_all(cmd.enqueue.queue, K.ENQUEUED, pairs)
        elif what == "lease" and isinstance(result, pb.LeaseResponse):
            if pairs is None:
                pairs = ((leased.job_id, 0) for leased in result.jobs)
            add_all(cmd.lease.queue, K.LEASED, pairs)
        elif what == "ack":
            # An acked job no record keeps (before LIFECYCLE, completed_max 0)
            # is gone, and still completed.
            if pairs is None:
                pairs = ((lease.job_id, len(lease.result)) for lease in cmd.ack.leases)
            add_all(cmd.ack.queue, K.COMPLETED, pairs, gone=True)
        elif what == "nack" and isinstance(result, pb.NackResponse):
            dead = result.state == DEAD
            add(K.DEAD if dead else K.NACKED, cmd.nack.job_id, reason=cmd.nack.reason)
        elif what == "complete_job":
            add(K.COMPLETED, cmd.complete_job.job_id, result_bytes=len(cmd.complete_job.result))
        elif what == "cancel_job":
            add(K.CANCELLED, cmd.cancel_job.job_id)
        elif what == "requeue_job":
            add(K.REQUEUED, cmd.requeue_job.job_id)
        elif what == "reprioritize_job":
            add(K.REPRIORITIZED, cmd.reprioritize_job.job_id)
        elif what in _QUEUE_KINDS:
            queue = getattr(cmd, what).queue
            events.append((index, now, queue, 0, _QUEUE_KINDS[what], 0, 0, 0, 0, ""))
    for job_id in sorted(effects.changed - explained - effects.advanced_ids):
        found = job(job_id)
        if found is None or found.state not in WAITING:
            continue
        fresh_job = found.attempts == 0 and found.enqueued_at_ms == now and not found.errors
        kind = K.ENQUEUED if fresh_job else K.REQUEUED
        events.append(_job_row(kind, found, index, now))
    return events


_QUEUE_KINDS: dict[str, int] = {
    "pause_queue": K.QUEUE_PAUSED,
    "resume_queue": K.QUEUE_RESUMED,
    "update_queue": K.QUEUE_UPDATED,
    "delete_queue": K.QUEUE_DELETED,
}

__all__ = ["CANCELLED", "COMPLETED", "Event", "Row", "advanced", "as_event", "derive"]
