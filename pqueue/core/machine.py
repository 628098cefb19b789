"""The queue state machine: deterministic ``apply(entry)`` of logged commands.

Pure: no clock, IO or global random. Time arrives only as ``LogEntry.time_ms``
stamped by the proposer, so every replica applying the same entries reaches
the same state (same snapshot bytes). Each command either succeeds or raises
a ``PQueueError`` *before* changing anything; ``apply_entry`` returns the
entry's ``Effects``: one result per command (the response message, or that
error), the queues that gained leasable jobs and the jobs changed, which the
node observes (long-poll wake-ups, the PostgreSQL jobs table).

Every entry first advances time: delayed jobs that came due become ready,
leases that expired return their jobs (or make them dead), and idempotency
keys past their window are forgotten. Expiry is therefore decided in the log,
never guessed per replica.

The class is split by concern: ``transitions`` (state, job state changes,
indexes, lookups), ``tenancy`` (the rules stamped limits and callers impose),
``job_commands`` and ``queue_commands`` (one method per command); this module
dispatches, advances time and answers reads.
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from google.protobuf.message import Message

from pqueue.core import browse, dispatch, events, limits
from pqueue.core.commands import bind, checked_commands
from pqueue.core.effects import Effects, Named, Result
from pqueue.core.features import LIFECYCLE
from pqueue.core.job_actions import JobActions
from pqueue.core.job_commands import JobCommands
from pqueue.core.jobs import (
    CANCELLED,
    COMPLETED,
    DEAD,
    DELAYED,
    LEASED,
    READY,
    Job,
    QueueState,
)
from pqueue.core.queue_commands import QueueCommands
from pqueue.core.queue_controls import QueueControls
from pqueue.core.schedules import ScheduleCommands
from pqueue.errors import (
    InvalidArgumentError,
    NotFoundError,
    PQueueError,
)
from pqueue.v1 import log_pb2 as logpb
from pqueue.v1 import queue_pb2 as pb

__all__ = ["Effects", "QueueMachine", "Result"]


@checked_commands  # every Command field has exactly one @handles method, or no start
class QueueMachine(ScheduleCommands, JobCommands, QueueCommands, JobActions, QueueControls):
    """All queues of one node, advanced only by ``apply_entry``."""

    def __init__(self) -> None:
        super().__init__()
        self._handlers: dict[str, Callable[[Any, int], Message]] = bind(self)

    # ------------------------------------------------------------------ apply

    def apply_entry(self, entry: logpb.LogEntry, respond: bool = True) -> Effects:
        """Apply one log entry: what it did (one result per command, in order;
        the queues that gained leasable jobs; the jobs changed or removed).
        ``respond``: False when no caller waits for these results (a
        replica applying another's commands): a lease's answer then lists no
        jobs. The state, the events and every effect but those answers are
        the same either way."""
        if entry.index != self.applied_index + 1:
            raise ValueError(f"entry {entry.index} applied after {self.applied_index}")
        self._responding = respond
        try:
            return self._apply_entry(entry)
        finally:
            self._responding = True  # a command applied alone is answered

    def _apply_entry(self, entry: logpb.LogEntry) -> Effects:
        self._woken = Counter()
        self._changed, self._touched = set(), set()
        now = max(entry.time_ms, self.time_ms)  # time never runs backwards
        self.time_ms = now
        self.applied_index = entry.index
        if entry.required_features and not self.features.issuperset(entry.required_features):
            self.features = self.features.union(entry.required_features)
        if not self.lifecycle and LIFECYCLE in self.features:
            self._start_lifecycle()
        self.advance(now)
        moved = frozenset(self._changed)
        advanced = events.advanced(self, moved, self._touched, now) if moved else []
        results: list[Result] = []
        named: list[Named | None] = []
        for cmd in entry.commands:
            results.append(self.apply_command(cmd, now))
            named.append(self._named)
        effects = Effects(
            entry.index,
            results,
            dict(self._woken),
            frozenset(self._changed),
            frozenset(self._touched),
            tuple(advanced),
            moved,
            tuple(named),
        )
        self._woken, self._changed, self._touched = Counter(), set(), set()
        return effects

    def _start_lifecycle(self) -> None:
        """The first entry needing ``LIFECYCLE``: its semantics hold from
        here on, and every queue's config shows the new fields' defaults
        (as a queue created from now on does)."""
        self.lifecycle = True
        for queue in self.queues.values():
            queue.config = limits.effective_config(queue.config, lifecycle=True)

    def apply_command(self, cmd: logpb.Command, now: int) -> Result:
        """Apply one command at ``now``; an error result means nothing changed."""
        # A handler that names jobs for events (Effects.named) sets _named on
        # success only; apply_entry reads it after each command, in order.
        self._named = None
        kind = cmd.WhichOneof("kind")
        if kind is None:
            return InvalidArgumentError("command", "empty command")
        self._limits = cmd.limits if cmd.HasField("limits") else None
        self._caller = cmd.caller if cmd.HasField("caller") else None
        try:
            return self._handlers[kind](getattr(cmd, kind), now)
        except PQueueError as exc:
            self._named = None  # refused: nothing changed, nothing to name
            return exc
        finally:
            self._limits = self._caller = None
            for name in self._idle:
                queue = self.queues.get(name)
                if queue is not None:
                    self._drop_if_idle(queue)
            self._idle.clear()

    def advance(self, now: int) -> None:
        """Promote due delayed jobs, expire due leases, make waiting jobs past
        their expiry dead, prune dead jobs past their retention, forget old
        dedup keys."""
        self._compact_time_heaps()
        while self._delayed and self._delayed[0][0] <= now:
            job = self._delayed_job(heapq.heappop(self._delayed))
            if job is not None:
                self._make_ready(self.queues[job.queue], job, job.ready_at_ms)
        while self._leases and self._leases[0][0] <= now:
            job = self._leased_by(heapq.heappop(self._leases))
            if job is not None:
                queue = self.queues[job.queue]
                queue.counters.expired += 1
                self._fail_delivery(queue, job, now, "lease expired", retry_at=now)
        while self._expiry and self._expiry[0][0] <= now:
            job = self._expiring(heapq.heappop(self._expiry))
            if job is not None:
                self._expire(self.queues[job.queue], job, now)
        while self._dead_due and self._dead_due[0][0] <= now:
            _, name = heapq.heappop(self._dead_due)
            pruned = self.queues.get(name)
            if pruned is not None:
                self._prune_dead(pruned, now)
        self.prune_records(now)
        while self._dedup and self._dedup[0][0] <= now:
            expires, name, tenant, key = heapq.heappop(self._dedup)
            owner = self.queues.get(name)
            if owner is not None and owner.dedup.get((tenant, key), (0, -1))[1] == expires:
                del owner.dedup[tenant, key]
                self._drop_if_idle(owner)

    def _prune_dead(self, queue: QueueState, now: int) -> None:
        """dead_retention_ms: delete the queue's dead jobs that died that long
        ago, and look again when the next one is due."""
        retention = queue.config.dead_retention_ms
        if not retention:
            return  # kept (a retention set later schedules a look itself)
        if self._prune_ended(queue, queue.dead_order, (DEAD,), now - retention) is not None:
            self.watch_retention(queue)
        # Only a look that removed a job may drop the queue: an early or
        # stale look (an entry a restored replica does not hold) changes nothing.
        if queue.name in self._idle:
            self._idle.discard(queue.name)
            self._drop_if_idle(queue)

    def _compact_time_heaps(self) -> None:
        """Acked jobs leave lease entries behind until their expiry time: drop
        them once they outnumber the live ones (amortized O(1) per entry:
        looked at only once the heaps grew by half since last time, so a
        cluster of many queues is not walked for every entry)."""
        live = {DELAYED: 0, LEASED: 0, READY: 0}
        if self._time_heaps_size() < self._compact_at:
            return
        for queue in self.queues.values():
            live[DELAYED] += queue.counts[DELAYED]
            live[LEASED] += queue.counts[LEASED]
            live[READY] += queue.counts[READY]
        if len(self._expiry) > 2 * (live[READY] + live[DELAYED]) + 1024:
            self._expiry = [e for e in self._expiry if self._expiring(e) is not None]
            heapq.heapify(self._expiry)
        if len(self._leases) > 2 * live[LEASED] + 1024:
            # Filter the heap itself: scanning every job instead cost time in
            # proportion to the backlog, not to the entries dropped.
            self._leases = [e for e in self._leases if self._leased_by(e) is not None]
            heapq.heapify(self._leases)
        records = sum(q.counts[COMPLETED] + q.counts[CANCELLED] for q in self.queues.values())
        if len(self._retention) > 2 * records + 1024:
            # Records the cap dropped leave entries behind until their due time.
            self._retention = [e for e in self._retention if self._record_of(e) is not None]
            heapq.heapify(self._retention)
        if len(self._delayed) > 2 * live[DELAYED] + 1024:
            self._delayed = [e for e in self._delayed if self._delayed_job(e) is not None]
            heapq.heapify(self._delayed)
        total = self._time_heaps_size()
        self._compact_at = total + max(1024, total // 2)

    def _time_heaps_size(self) -> int:
        return len(self._leases) + len(self._delayed) + len(self._expiry) + len(self._retention)

    # ------------------------------------------------------------------ reads

    def find_job(self, job_id: int, among: Iterable[str] | None = None) -> Job | None:
        """The job with this id, in whichever queue: of those named in
        ``among`` (an ``Effects.touched``), or a scan over every queue."""
        names = self.queues if among is None else among
        for name in names:
            queue = self.queues.get(name)
            job = None if queue is None else queue.jobs.get(job_id)
            if job is not None:
                return job
        return None

    def job_brief(self, job_id: int, among: Iterable[str]) -> tuple[str, int, int, int] | None:
        """(queue, state, attempts, priority) of the job with this id in one
        of the queues named in ``among``, as cheaply as it can be read."""
        for name in among:
            queue = self.queues.get(name)
            brief = None if queue is None else queue.jobs.brief(job_id)
            if brief is not None:
                return (name, *brief)
        return None

    def briefs_in(self, queue: str) -> Callable[[int], tuple[int, int, int] | None] | None:
        """How to read a job's (state, attempts, priority) in this queue
        (``JobTable.brief``; None: no such queue)."""
        state = self.queues.get(queue)
        return None if state is None else state.jobs.brief

    def all_jobs(self) -> Iterator[Job]:
        """Every job of every queue (views for those in the compact form)."""
        for queue in self.queues.values():
            yield from queue.jobs.values()

    def job_count(self) -> int:
        """Jobs held, all queues."""
        return sum(len(queue.jobs) for queue in self.queues.values())

    def get_job(self, queue_name: str, job_id: int) -> pb.Job:
        """One job's public view."""
        job = self._queue(queue_name).jobs.get(job_id)
        if job is None:
            raise NotFoundError(f"job {job_id} not found in queue {queue_name!r}")
        return job.to_proto()

    def stats(self, queue_name: str, now_ms: int) -> list[pb.QueueStats]:
        """Stats of one queue, or of all (by name) when ``queue_name`` is empty."""
        if queue_name:
            return [self._queue(queue_name).stats(now_ms)]
        return [self.queues[name].stats(now_ms) for name in sorted(self.queues)]

    def list_queues(self, now_ms: int) -> list[pb.QueueInfo]:
        """Every queue with its config and stats, by name."""
        return [
            pb.QueueInfo(queue=name, config=q.config, stats=q.stats(now_ms))
            for name, q in sorted(self.queues.items())
        ]

    def stats_page(
        self, tenant: str | None, after: str, limit: int, now_ms: int
    ) -> tuple[list[pb.QueueStats], str]:
        """Stats of up to ``limit`` queues after ``after`` (one tenant's, or
        all with None), by name, and the name to continue after ("": no more)."""
        names, more = self.queues.page(tenant, after, limit)
        stats = [self.queues[name].stats(now_ms) for name in names]
        return stats, names[-1] if more else ""

    def queues_page(
        self, tenant: str | None, after: str, limit: int, now_ms: int
    ) -> tuple[list[pb.QueueInfo], str]:
        """``list_queues`` a page at a time, as ``stats_page``."""
        names, more = self.queues.page(tenant, after, limit)
        infos = [
            pb.QueueInfo(queue=n, config=self.queues[n].config, stats=self.queues[n].stats(now_ms))
            for n in names
        ]
        return infos, names[-1] if more else ""

    def list_dead(self, queue_name: str, limit: int, after_job_id: int) -> pb.ListDeadResponse:
        """A page of dead jobs by id, after ``after_job_id``."""
        queue = self._queue(queue_name)
        ids = sorted(i for i in queue.dead_ids if i > after_job_id)
        page = ids[:limit]
        return pb.ListDeadResponse(
            jobs=[queue.jobs[i].to_proto() for i in page],
            next_after_job_id=page[-1] if len(ids) > limit else 0,
        )

    def list_jobs(self, queue_name: str, query: browse.Query) -> pb.ListJobsResponse:
        """A page of one state's jobs in serving order (``browse.page``)."""
        jobs, token = browse.page(self._queue(queue_name), query)
        return pb.ListJobsResponse(jobs=[job.to_proto() for job in jobs], next_page_token=token)

    def ready_jobs(self) -> int:
        """Ready jobs over all queues."""
        return sum(q.counts[READY] for q in self.queues.values())

    def has_ready(self, queue_name: str) -> bool:
        """Whether a lease on this queue would find a job now: one is ready,
        and the queue is neither paused nor at its ``max_inflight`` (its
        dispatch rate aside: see ``next_dispatch_ms``)."""
        queue = self.queues.get(queue_name)
        return (
            queue is not None
            and dispatch.leasable(queue, self.lifecycle)
            and queue.peek_ready() is not None
        )

    def next_dispatch_ms(self, queue_name: str) -> int | None:
        """When (stamped time) the queue's ``max_dispatch_per_s`` next lets a
        lease take a job: at or before ``time_ms`` if it would now; None when
        the queue has no rate (or is unknown)."""
        queue = self.queues.get(queue_name)
        return None if queue is None else dispatch.next_dispatch_ms(queue, self.lifecycle)

    def next_due_ms(self) -> int | None:
        """When the next delayed job comes due, lease expires, waiting job
        expires or dead job is due for pruning, if ever."""
        while self._delayed and self._delayed_job(self._delayed[0]) is None:
            heapq.heappop(self._delayed)
        while self._leases and self._leased_by(self._leases[0]) is None:
            heapq.heappop(self._leases)
        while self._expiry and self._expiring(self._expiry[0]) is None:
            heapq.heappop(self._expiry)
        due = [h[0][0] for h in (self._delayed, self._leases, self._expiry, self._dead_due) if h]
        prune = self.next_prune_ms()
        if prune is not None:
            due.append(prune)
        return min(due) if due else None
