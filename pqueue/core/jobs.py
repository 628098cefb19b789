"""In-memory structures of the queue state machine: jobs, queues, groups, heaps.

Pure. Heaps use lazy deletion: an entry is valid only while the job it names
still matches it (state, token, lease id or expiry), so removing a job is O(1)
and leasing the next one is O(log n) amortized.

**The compact form.** A backlog is mostly jobs that were enqueued and wait
for their first delivery. Such a job (READY, never delivered, no group) is
kept as one ``bytes`` row (``pack_row``: priority, times, tenant, key,
payload) in its queue's ``JobTable``, and its place in line is its id in a
FIFO per (lane, priority) rather than a heap entry: fresh jobs of one
priority arrive in the order they are served (ready time, then id), so a
deque is already sorted. A job leaves the compact form when it is leased
(``JobTable.promote``: a ``Job`` object from then on). What a job costs
therefore depends on its life, not on its state: about 110 bytes beyond its
payload while it waits (a dict slot, its id, the row header, a deque slot),
a few hundred once delivered. The form is invisible to the machine's
behaviour: the next lease is the least (key, id) over heaps and FIFO heads
alike, and snapshots write a job packed exactly when its fields allow it,
whichever form a replica holds it in, so equal states give equal bytes.
"""

from __future__ import annotations

import heapq
import struct
import weakref
from array import array
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from operator import attrgetter
from typing import Any

from pqueue.v1 import log_pb2 as logpb
from pqueue.v1 import queue_pb2 as pb

READY = pb.JOB_STATE_READY
DELAYED = pb.JOB_STATE_DELAYED
LEASED = pb.JOB_STATE_LEASED
DEAD = pb.JOB_STATE_DEAD
COMPLETED = pb.JOB_STATE_COMPLETED
CANCELLED = pb.JOB_STATE_CANCELLED
WAITING = (READY, DELAYED)
#: Records of jobs that ended: kept for the queue's completed retention.
FINISHED = (COMPLETED, CANCELLED)
#: Every state a job can be in, as ``QueueState.counts`` counts them.
STATES = (READY, DELAYED, LEASED, DEAD, COMPLETED, CANCELLED)

#: Heaps are rebuilt once stale entries outnumber live ones by this much.
_SLACK = 64

#: (aged key, ready_at_ms, job_id, token): smallest is served first.
ReadyEntry = tuple[int, int, int, int]

#: A lane keeps FIFOs for at most this many priorities; a fresh job of
#: another priority waits in the heap as a ``Job`` (with unbounded distinct
#: priorities, a deque each would cost more than it saves).
MAX_FIFO_PRIORITIES = 32

#: The row header: priority, enqueued_at_ms, ready_at_ms, then the lengths of
#: the tenant and idempotency key (UTF-8) that follow it before the payload.
_ROW = struct.Struct("<iqqHH")
#: The row header's first three fields (what the serving order needs).
_HEAD3 = struct.Struct("<iqq")
#: A record in a snapshot's ``PackedJobs``: job id, row length.
RECORD_HEAD = struct.Struct("<QI")


@dataclass(slots=True)
class Job:
    """One job and everything the state machine knows of it."""

    job_id: int
    queue: str
    priority: int
    payload: bytes
    state: int
    group: str
    idempotency_key: str
    enqueued_at_ms: int
    ready_at_ms: int
    attempts: int = 0
    lease_id: int = 0
    leased_at_ms: int = 0
    lease_expires_at_ms: int = 0
    consumer_id: str = ""
    #: (attempt, at_ms, reason), oldest first, at most MAX_ERROR_HISTORY. A
    #: tuple, replaced when it grows: a job then is one object the cyclic
    #: collector tracks, not two (completed records are kept by the ten
    #: thousand, and every full collection walks them).
    errors: tuple[tuple[int, int, str], ...] = ()
    #: Bumped each time the job enters the ready or delayed heap; older heap
    #: entries then no longer match and are skipped.
    token: int = 0
    #: The tenant whose producer enqueued it (the owner's, for the owner's,
    #: an admin's and unstamped enqueues; "" for a queue name without one).
    tenant: str = ""
    #: COMPLETED/CANCELLED: when it ended; DEAD: when it died (0 for jobs
    #: that died before this was recorded).
    finished_at_ms: int = 0
    #: COMPLETED: what the ack (or a force-complete) carried.
    result: bytes = b""
    #: An operator's note, or why the job is dead.
    reason: str = ""
    #: A waiting job becomes DEAD ("expired") if not leased by then; 0: never.
    expires_at_ms: int = 0

    def packable(self) -> bool:
        """Whether the compact form holds this job: waiting for its first
        delivery, ungrouped. (What a snapshot writes packed.)"""
        return (
            self.state == READY
            and not self.attempts
            and not self.group
            and not self.lease_id
            and not self.errors
            and not self.consumer_id
            and not self.leased_at_ms
            and not self.lease_expires_at_ms
            and not self.finished_at_ms
            and not self.result
            and not self.reason
            and not self.expires_at_ms
            and len(self.tenant) < 4096
            and len(self.idempotency_key) < 4096
        )

    def row(self) -> bytes:
        """The compact form (``packable`` jobs only)."""
        return pack_row(
            self.priority,
            self.enqueued_at_ms,
            self.ready_at_ms,
            self.tenant,
            self.idempotency_key,
            self.payload,
        )

    @property
    def group_key(self) -> tuple[str, str]:
        """Groups are per producing tenant: tenants sharing a queue never
        hold up each other's groups by picking the same name."""
        return (self.tenant, self.group)

    def to_proto(self) -> pb.Job:
        """The public view (never the lease id: that is the consumer's secret)."""
        view = dict(zip(PUBLIC_FIELDS, _public(self), strict=True))
        if self.state != LEASED:
            view["lease_expires_at_ms"] = 0
        return pb.Job(queue=self.queue, errors=self._errors(), **view)

    def to_record(self) -> logpb.JobRecord:
        """The snapshot's record of the job: every field of ``JobRecord``."""
        return logpb.JobRecord(**self.record_fields())

    def record_fields(self) -> dict[str, Any]:
        """``JobRecord`` keyword arguments: every field of the record."""
        view = dict(zip(RECORD_FIELDS, record_values(self), strict=True))
        view["errors"] = self._errors()
        return view

    @classmethod
    def from_record(cls, queue: str, rec: logpb.JobRecord, owner: str) -> Job:
        """The job a snapshot record describes, in ``queue`` (whose owner
        ``owner`` produced records from before tenants were recorded)."""
        job = cls(
            queue=queue,
            errors=tuple((e.attempt, e.at_ms, e.reason) for e in rec.errors),
            **{name: getattr(rec, name) for name in RECORD_FIELDS},
        )
        job.tenant = job.tenant or owner
        return job

    def _errors(self) -> list[pb.JobError]:
        return [pb.JobError(attempt=a, at_ms=t, reason=r) for a, t, r in self.errors]


def pack_row(
    priority: int, enqueued_at: int, ready_at: int, tenant: str, key: str, payload: bytes
) -> bytes:
    """One waiting job in the compact form (its id is the table's key)."""
    return _packed(priority, enqueued_at, ready_at, tenant.encode(), key.encode(), payload)


def pack_fresh_row(priority: int, now: int, tenant: bytes, key: str, payload: bytes) -> bytes:
    """``pack_row`` of a job enqueued and ready at ``now`` (the tenant
    already encoded: an enqueue encodes it once for all its jobs)."""
    return _packed(priority, now, now, tenant, key.encode() if key else b"", payload)


def _packed(
    priority: int, enqueued_at: int, ready_at: int, tenant: bytes, key: bytes, payload: bytes
) -> bytes:
    head = _ROW.pack(priority, enqueued_at, ready_at, len(tenant), len(key))
    return head + tenant + key + payload


def unpack_row(job_id: int, queue: str, row: bytes) -> Job:
    """The ``Job`` a compact row describes."""
    priority, enqueued_at, ready_at, tlen, klen = _ROW.unpack_from(row)
    start = _ROW.size
    return Job(
        job_id=job_id,
        queue=queue,
        priority=priority,
        payload=row[start + tlen + klen :],
        state=READY,
        group="",
        idempotency_key=row[start + tlen : start + tlen + klen].decode(),
        enqueued_at_ms=enqueued_at,
        ready_at_ms=ready_at,
        tenant=row[start : start + tlen].decode(),
    )


def row_ready_at(row: bytes) -> tuple[int, int]:
    """(priority, ready_at_ms) of a compact row."""
    priority, _, ready_at = _HEAD3.unpack_from(row)
    return priority, ready_at


class JobTable:
    """One queue's jobs by id, each either a ``Job`` or a compact row.

    Reads (``get``, ``[]``, ``values``) hand out a ``Job`` either way; one
    made from a row is a *view*: changing it changes nothing. A transition
    that changes a job in the compact form calls ``promote`` first (today
    only the lease does: nothing else changes a waiting, never-delivered,
    ungrouped job but its removal).
    """

    __slots__ = ("_frozen", "_full", "_order", "_removed", "_rows", "compact", "queue")

    def __init__(self, queue: str) -> None:
        self.queue = queue
        self._rows: dict[int, Job | bytes] = {}
        #: The jobs held as ``Job`` objects (in no particular order).
        self._full: dict[int, Job] = {}
        #: Every id put in the table, in order (ascending), removed ones too
        #: until the next compaction: what a frozen view walks.
        self._order = array("Q")
        self._removed = 0
        #: Open frozen views: each keeps the rows that changed since (weak: a
        #: view dropped unread lets go by itself).
        self._frozen: weakref.WeakSet[FrozenJobs] = weakref.WeakSet()
        #: Jobs held in the compact form.
        self.compact = 0

    def __len__(self) -> int:
        return len(self._rows)

    def __bool__(self) -> bool:
        return bool(self._rows)

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._rows

    def __iter__(self) -> Iterator[int]:
        return iter(self._rows)

    def __getitem__(self, job_id: int) -> Job:
        value = self._rows[job_id]
        return unpack_row(job_id, self.queue, value) if type(value) is bytes else value  # type: ignore[return-value]

    def __setitem__(self, job_id: int, job: Job) -> None:
        """Add a new job (ids only grow) as a ``Job``."""
        self._rows[job_id] = self._full[job_id] = job
        self._order.append(job_id)

    def __delitem__(self, job_id: int) -> None:
        value = self._rows.pop(job_id)
        if type(value) is bytes:
            self._keep(job_id, value)
            self.compact -= 1
        else:
            del self._full[job_id]
        self._removed += 1
        if self._removed > len(self._rows) + 1024 and not self._frozen:
            self._order = array("Q", self._rows)
            self._removed = 0

    def get(self, job_id: int) -> Job | None:
        value = self._rows.get(job_id)
        if type(value) is bytes:
            return unpack_row(job_id, self.queue, value)
        return value  # type: ignore[return-value]

    def brief(self, job_id: int) -> tuple[int, int, int] | None:
        """The job's (state, attempts, priority), with no ``Job`` made for a
        compact row (a waiting job never delivered: READY, no attempt)."""
        value = self._rows.get(job_id)
        if value is None:
            return None
        if type(value) is bytes:
            return READY, 0, _ROW.unpack_from(value)[0]
        return value.state, value.attempts, value.priority  # type: ignore[union-attr]

    def values(self) -> Iterator[Job]:
        """Every job, by id (views for compact rows)."""
        for job_id, value in self._rows.items():
            yield unpack_row(job_id, self.queue, value) if type(value) is bytes else value  # type: ignore[misc]

    def full_values(self) -> Iterator[Job]:
        """The jobs held as ``Job`` objects (the delivered, delayed, grouped
        ones, and any waiting job the compact form did not take), in no
        particular order."""
        return iter(self._full.values())

    def add_row(self, job_id: int, row: bytes) -> None:
        """Add a new job (ids only grow) in the compact form."""
        self._rows[job_id] = row
        self._order.append(job_id)
        self.compact += 1

    def row(self, job_id: int) -> bytes | None:
        """The job's compact row, if it is held in that form."""
        value = self._rows.get(job_id)
        return value if type(value) is bytes else None

    def promote(self, job_id: int) -> Job:
        """Hold the job as a ``Job`` from now on (it is about to change)."""
        value = self._rows[job_id]
        if type(value) is bytes:
            self._keep(job_id, value)
            self.compact -= 1
            value = self._rows[job_id] = self._full[job_id] = unpack_row(job_id, self.queue, value)
        return value  # type: ignore[return-value]

    def _keep(self, job_id: int, row: bytes) -> None:
        """A row is about to leave the table: open views keep it (once)."""
        if not self._frozen:  # the common case: iterating an empty WeakSet costs ~6 µs
            return
        for frozen in self._frozen:
            frozen.kept.setdefault(job_id, row)

    def freeze(self) -> FrozenJobs:
        """The table as it is now, read by ``FrozenJobs.rows`` while it goes
        on changing: O(jobs held as objects), not O(jobs). Close it when done."""
        packed = {}
        for job in self._full.values():
            if job.packable():
                packed[job.job_id] = job.row()
        frozen = FrozenJobs(self, len(self._order), set(self._full), packed)
        self._frozen.add(frozen)
        return frozen


class FrozenJobs:
    """One queue's compact rows as they were at ``JobTable.freeze``: those
    of the jobs in the compact form then (a row that left the table since
    is kept for the view), and of the packable jobs held as objects then
    (encoded at the freeze, as objects change in place)."""

    __slots__ = ("__weakref__", "_full", "_length", "_packed", "_table", "kept")

    def __init__(
        self, table: JobTable, length: int, full: set[int], packed: dict[int, bytes]
    ) -> None:
        self._table = table
        self._length = length
        self._full = full
        self._packed = packed
        #: Rows that left the table after the freeze, by id.
        self.kept: dict[int, bytes] = {}

    def rows(self) -> Iterator[tuple[int, bytes]]:
        """(id, row) of every job the compact form held or could hold at
        the freeze, by id. Safe to pause between items while the table
        changes; closes the view when exhausted (or when closed early)."""
        table, kept, full, packed = self._table, self.kept, self._full, self._packed
        try:
            for pos in range(self._length):
                job_id = table._order[pos]
                if job_id in full:
                    row = packed.get(job_id)
                else:
                    row = kept.get(job_id)
                    if row is None:
                        value = table._rows.get(job_id)
                        # Absent: removed before the freeze (or after it,
                        # kept above); an object: made after the freeze.
                        row = value if type(value) is bytes else None
                if row is not None:
                    yield job_id, row
        finally:
            self.close()

    def close(self) -> None:
        """Stop keeping rows for this view."""
        self._table._frozen.discard(self)


def _shared_fields(message: Any, special: set[str]) -> tuple[str, ...]:
    """The fields of ``message`` a ``Job`` holds under the same name, in
    field order, except ``special`` ones; a field it lacks stops the import."""
    attrs = {f.name for f in fields(Job)}
    names = tuple(f.name for f in message.DESCRIPTOR.fields if f.name not in special)
    missing = [n for n in names if n not in attrs]
    if missing:
        raise TypeError(f"{message.DESCRIPTOR.name} fields {missing} are not fields of Job")
    return names


#: ``JobRecord`` fields copied by name (``errors`` is a tuple of tuples in
#: a Job). The record is the source of truth: a field added to it must be
#: added to ``Job`` or importing this module fails, and it is then kept in
#: snapshots without further edits.
RECORD_FIELDS = _shared_fields(logpb.JobRecord, {"errors"})
#: ``pb.Job`` fields copied by name (``queue`` and ``errors`` are built).
PUBLIC_FIELDS = _shared_fields(pb.Job, {"queue", "errors"})
#: A job's ``RECORD_FIELDS`` as a tuple of values (immutable ones), taken in C.
record_values = attrgetter(*RECORD_FIELDS)
_public = attrgetter(*PUBLIC_FIELDS)


@dataclass(slots=True)
class Group:
    """An ordering key: FIFO by job id, at most one job in flight."""

    #: Heap of ids of the group's READY/DELAYED jobs (lazy: may hold stale ids).
    waiting: list[int] = field(default_factory=list)
    in_flight: int = 0


@dataclass(slots=True)
class Lane:
    """One producing tenant's jobs in a queue, for fair sharing between tenants.

    A queue that is not shared has a single lane. With several, the lane
    that leases next is the one with the least virtual time among those
    whose head is at least as urgent, by priority, as the queue's most
    urgent job; each lease then costs the lane ``FAIR_SCALE / weight``
    (start-time fair queueing, so weights set the shares of a backlog).
    """

    #: Ready heap of the lane's leasable jobs (lazy: may hold stale entries).
    ready: list[ReadyEntry] = field(default_factory=list)
    #: Priority -> ids of jobs in the compact form, in the order they are
    #: served (lazy: an id whose job left the form or the queue is skipped).
    fifo: dict[int, deque[int]] = field(default_factory=dict)
    #: Priority -> (ready_at_ms, job id) of the last job put in its FIFO: a
    #: job goes in only behind it.
    last: dict[int, tuple[int, int]] = field(default_factory=dict)
    #: Jobs of the lane in the queue, in any state.
    held: int = 0
    #: The lane's virtual time: the start tag of its next lease. Never below
    #: the queue's clock when used, so an idle lane banks no credit.
    vtime: int = 0


#: Virtual time one lease costs a lane of weight 1; weight w pays 1/w of it,
#: rounded up. lcm(1..16): weights up to 16 divide it exactly, and a uint64
#: clock lasts 2.5e13 leases.
FAIR_SCALE = 720_720

#: A group is named within the tenant that enqueued its jobs.
GroupKey = tuple[str, str]


@dataclass(slots=True)
class Counters:
    """Monotonic per-queue totals: field ``x`` is ``QueueStats.x_total``."""

    enqueued: int = 0
    leased: int = 0
    acked: int = 0
    nacked: int = 0
    expired: int = 0
    dead: int = 0
    completed: int = 0
    cancelled: int = 0
    ttl_expired: int = 0

    def to_stats(self) -> dict[str, Any]:
        """The ``QueueStats`` fields these totals fill, by name."""
        return {f"{name}_total": getattr(self, name) for name in COUNTER_FIELDS}

    @classmethod
    def from_stats(cls, stats: pb.QueueStats) -> Counters:
        """The totals a ``QueueStats`` (a snapshot's counters) holds."""
        return cls(**{name: getattr(stats, f"{name}_total") for name in COUNTER_FIELDS})


def _counter_fields() -> tuple[str, ...]:
    """``Counters`` fields, checked against every ``QueueStats.*_total``."""
    names = tuple(f.name for f in fields(Counters))
    totals = {f.name for f in pb.QueueStats.DESCRIPTOR.fields if f.name.endswith("_total")}
    if totals != {f"{n}_total" for n in names}:
        raise TypeError(f"QueueStats totals {sorted(totals)} do not match Counters {names}")
    return names


#: The counters kept in snapshots, one per ``QueueStats.*_total`` field.
COUNTER_FIELDS = _counter_fields()


@dataclass(slots=True)
class QueueState:
    """One named queue: its config, jobs and indexes."""

    name: str
    config: pb.QueueConfig
    jobs: JobTable = field(init=False)
    #: Producing tenant -> lane. Lanes are kept while the queue lives (a
    #: queue holds at most the owner, its shares and admins).
    lanes: dict[str, Lane] = field(default_factory=dict)
    #: Virtual clock: the start tag of the latest lease (never decreases).
    vclock: int = 0
    #: Entries in all lanes' ready heaps, stale ones included.
    entries: int = 0
    #: (ready_at_ms, job_id) of every READY ``Job`` (compact rows: their
    #: FIFO heads), for the oldest-ready age.
    oldest: list[tuple[int, int]] = field(default_factory=list)
    groups: dict[GroupKey, Group] = field(default_factory=dict)
    dead_ids: set[int] = field(default_factory=set)
    counts: dict[int, int] = field(default_factory=lambda: dict.fromkeys(STATES, 0))
    #: (finished_at_ms, job_id) of COMPLETED and CANCELLED records, oldest
    #: first (lazy: an entry whose job left that state is skipped).
    finished: list[tuple[int, int]] = field(default_factory=list)
    #: (finished_at_ms, job_id) of DEAD jobs, oldest first (lazy, as
    #: ``finished``): dead_retention_ms prunes from its front.
    dead_order: list[tuple[int, int]] = field(default_factory=list)
    #: Leases are paused (PauseQueue).
    paused: bool = False
    #: max_dispatch_per_s: the token bucket (thousandths of a lease) as of
    #: ``dispatch_at_ms``.
    dispatch_tokens: int = 0
    dispatch_at_ms: int = 0
    #: Cron schedules by name (``next_tick_ms`` unset: computed by the node).
    schedules: dict[str, pb.Schedule] = field(default_factory=dict)
    counters: Counters = field(default_factory=Counters)
    #: (producing tenant, idempotency key) -> (job_id, expires_at_ms)
    dedup: dict[tuple[str, str], tuple[int, int]] = field(default_factory=dict)
    #: Tenant -> lease weight, from ``config.shares``.
    weights: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        self.jobs = JobTable(self.name)
        self.weights = {s.tenant: s.weight or 1 for s in self.config.shares}

    def first_key(self, priority: int, ready_at: int) -> int:
        """The leading part of the serving order: priority, or with aging
        the static key priority*I + ready time."""
        interval = self.config.aging_interval_ms
        return priority * interval + ready_at if interval else priority

    def ready_key(self, job: Job) -> ReadyEntry:
        """Priority then FIFO; with aging, the static key priority*I + ready time."""
        first = self.first_key(job.priority, job.ready_at_ms)
        return (first, job.ready_at_ms, job.job_id, job.token)

    def lane(self, tenant: str) -> Lane:
        """The tenant's lane, made on first use."""
        lane = self.lanes.get(tenant)
        if lane is None:
            lane = self.lanes[tenant] = Lane()
        return lane

    def add_compact(self, job_id: int, row: bytes) -> Lane | None:
        """Keep a READY, never delivered, ungrouped job in the compact form,
        behind its lane's FIFO for its priority; False (nothing done) when
        that FIFO cannot take it: its place in line is not at the end, or
        the lane has FIFOs for too many priorities already. The job's lane
        when taken (the caller counts the job in it and in ``counts``)."""
        priority, _, ready_at, tlen, _ = _ROW.unpack_from(row)
        tenant = row[_ROW.size : _ROW.size + tlen].decode() if tlen else ""
        lane = self.lanes.get(tenant) or self.lane(tenant)
        return lane if self.add_compact_fresh(job_id, row, priority, ready_at, lane) else None

    def add_compact_fresh(
        self, job_id: int, row: bytes, priority: int, ready_at: int, lane: Lane
    ) -> bool:
        """``add_compact`` where the caller has the row's priority, ready
        time and lane at hand (an enqueue: it made the row); whether taken."""
        line = lane.fifo.get(priority)
        place = (ready_at, job_id)
        if line is None:
            if len(lane.fifo) >= MAX_FIFO_PRIORITIES:
                return False
            line = lane.fifo[priority] = deque()
        elif place < lane.last[priority]:
            return False
        self.jobs.add_row(job_id, row)
        line.append(job_id)
        lane.last[priority] = place
        return True

    def push_ready(self, job: Job) -> None:
        """Make ``job`` (READY, eligible) a candidate for the next lease."""
        job.token += 1
        heapq.heappush(self.lane(job.tenant).ready, self.ready_key(job))
        self.entries += 1
        if self.entries > 2 * (self.counts[READY] - self.jobs.compact) + _SLACK:
            self._rebuild_ready()

    def note_ready(self, job: Job) -> None:
        """Track a job that became READY (eligible or behind its group's head)."""
        heapq.heappush(self.oldest, (job.ready_at_ms, job.job_id))
        if len(self.oldest) > 2 * (self.counts[READY] - self.jobs.compact) + _SLACK:
            self.oldest = [
                (j.ready_at_ms, j.job_id) for j in self.jobs.full_values() if j.state == READY
            ]
            heapq.heapify(self.oldest)

    def _rebuild_ready(self) -> None:
        """Drop stale entries: the heaps hold only leasable jobs again."""
        for lane in self.lanes.values():
            lane.ready = []
        self.entries = 0
        for job in self.jobs.full_values():
            if job.state != READY:
                continue
            if job.group:
                key = job.group_key
                group = self.groups.get(key)
                if group is None or group.in_flight or self.group_head(key) is not job:
                    continue
            job.token += 1
            self.lane(job.tenant).ready.append(self.ready_key(job))
            self.entries += 1
        for lane in self.lanes.values():
            heapq.heapify(lane.ready)

    def group_head(self, key: GroupKey) -> Job | None:
        """The group's first waiting job, dropping stale heap entries."""
        group = self.groups[key]
        while group.waiting:
            job = self.jobs.get(group.waiting[0])
            if job is not None and job.group_key == key and job.state in WAITING:
                return job
            heapq.heappop(group.waiting)
        return None

    def is_eligible(self, job: Job, token: int) -> bool:
        """Whether a ready-heap entry still names a job that may be leased now."""
        if job.token != token or job.state != READY:
            return False
        if not job.group:
            return True
        group = self.groups.get(job.group_key)
        if group is None or group.in_flight:
            return False
        head = self.group_head(job.group_key)
        return head is job

    def _fifo_head(self, line: deque[int]) -> tuple[int, int, int] | None:
        """(key, ready_at, job id) of a FIFO's first job still in the compact
        form, dropping the ids of jobs that left it."""
        rows = self.jobs
        while line:
            job_id = line[0]
            row = rows.row(job_id)
            if row is not None:
                priority, ready_at = row_ready_at(row)
                return (self.first_key(priority, ready_at), ready_at, job_id)
            line.popleft()
        return None

    def _lane_head(self, lane: Lane) -> LaneHead | None:
        """The lane's next leasable job, over its heap and FIFOs, dropping
        stale entries."""
        best: LaneHead | None = None
        while lane.ready:
            entry = lane.ready[0]
            job = self.jobs.get(entry[2])
            if job is not None and self.is_eligible(job, entry[3]):
                best = (entry[0], entry[1], entry[2], job.priority, None)
                break
            heapq.heappop(lane.ready)
            self.entries -= 1
        if lane.fifo:
            drained = []
            for priority, line in lane.fifo.items():
                head = self._fifo_head(line)
                if head is None:
                    drained.append(priority)
                elif best is None or head < best[:3]:
                    best = (head[0], head[1], head[2], priority, line)
            for priority in drained:
                del lane.fifo[priority]
                del lane.last[priority]  # an empty FIFO takes any job
        return best

    def _next_lane(self) -> tuple[str, Lane, LaneHead] | None:
        """The lane the next lease serves, and its head.

        The most urgent head (by the queue's order, aging included) sets the
        level: lanes whose head is at least as urgent by priority compete,
        and of those the least virtual time wins, ties going to the tenant
        name, so every replica chooses alike whatever its dict order. (With
        aging, comparing aged keys instead would let an old backlog outrank
        every newcomer of the same priority: starvation by age.)
        """
        if len(self.lanes) == 1:
            tenant, lane = next(iter(self.lanes.items()))
            head = self._lane_head(lane)
            return None if head is None else (tenant, lane, head)
        heads = []
        for tenant, lane in self.lanes.items():
            head = self._lane_head(lane)
            if head is not None:
                heads.append((tenant, lane, head))
        if not heads:
            return None
        level = min(heads, key=lambda h: h[2][:3])[2][3]
        return min(
            (h for h in heads if h[2][3] <= level),
            key=lambda h: (max(h[1].vtime, self.vclock), h[0]),
        )

    def peek_ready(self) -> Job | None:
        """The job the next lease would take, dropping stale entries."""
        chosen = self._next_lane()
        return None if chosen is None else self.jobs.get(chosen[2][2])

    def take_ready(self) -> Job | None:
        """Take the job the next lease gets off its heap or FIFO, charging
        its lane; a job in the compact form becomes a ``Job``."""
        if len(self.lanes) == 1:
            [(tenant, lane)] = self.lanes.items()
            if not lane.ready and len(lane.fifo) == 1:
                return self._take_only_fifo(tenant, lane)
        return self._take_next()

    def _take_next(self) -> Job | None:
        """``take_ready``'s general path, over every lane, heap and FIFO."""
        chosen = self._next_lane()
        if chosen is None:
            return None
        tenant, lane, head = chosen
        line = head[4]
        if line is None:
            heapq.heappop(lane.ready)
            self.entries -= 1
        else:
            line.popleft()
        start = max(lane.vtime, self.vclock)
        lane.vtime = start - (-FAIR_SCALE // self.weights.get(tenant, 1))
        self.vclock = start
        return self.jobs.promote(head[2])

    def _take_only_fifo(self, tenant: str, lane: Lane) -> Job | None:
        """``take_ready`` where the queue's one lane has no heap entry and one
        FIFO (a queue of waiting jobs of one priority, the common shape):
        its head, with no comparison to make. The same steps as the general
        path (``_next_lane``, ``_lane_head``, ``_fifo_head``) in the same
        order, so the state is the same either way."""
        [(priority, line)] = lane.fifo.items()
        rows = self.jobs
        while line and rows.row(line[0]) is None:
            line.popleft()  # left the form or the queue
        if not line:
            del lane.fifo[priority]
            del lane.last[priority]  # an empty FIFO takes any job
            return None
        job_id = line.popleft()
        start = max(lane.vtime, self.vclock)
        lane.vtime = start - (-FAIR_SCALE // self.weights.get(tenant, 1))
        self.vclock = start
        return rows.promote(job_id)

    def oldest_ready_at(self) -> int | None:
        """The earliest ready time among READY jobs, dropping stale entries."""
        oldest = None
        while self.oldest:
            ready_at, job_id = self.oldest[0]
            job = self.jobs.get(job_id)
            if (
                job is not None
                and job.state == READY
                and job.ready_at_ms == ready_at
                and self.jobs.row(job_id) is None
            ):
                oldest = ready_at
                break
            heapq.heappop(self.oldest)
        for lane in self.lanes.values():
            for line in lane.fifo.values():
                head = self._fifo_head(line)
                if head is not None and (oldest is None or head[1] < oldest):
                    oldest = head[1]
        return oldest

    def stats(self, now_ms: int) -> pb.QueueStats:
        """Counts and totals at ``now_ms``."""
        oldest = self.oldest_ready_at()
        return pb.QueueStats(
            queue=self.name,
            ready=self.counts[READY],
            delayed=self.counts[DELAYED],
            leased=self.counts[LEASED],
            dead=self.counts[DEAD],
            completed=self.counts[COMPLETED],
            cancelled=self.counts[CANCELLED],
            paused=self.paused,
            oldest_ready_age_ms=max(0, now_ms - oldest) if oldest is not None else 0,
            **self.counters.to_stats(),
        )


#: A lane's next leasable job: (key, ready_at_ms, job id, priority, the FIFO
#: holding it, or None for the lane's heap).
LaneHead = tuple[int, int, int, int, "deque[int] | None"]


def mix64(a: int, b: int) -> int:
    """splitmix64 of two integers: a deterministic, well-spread 64-bit hash."""
    z = (a * 0x9E3779B97F4A7C15 + b + 0x632BE59BD9B4E019) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return z ^ (z >> 31)


def backoff_ms(config: pb.QueueConfig, job_id: int, attempt: int) -> int:
    """Exponential backoff with deterministic "equal jitter".

    The base delay is ``backoff_base_ms * 2^(attempt-1)`` capped at
    ``backoff_max_ms``; the result lies in [delay/2, delay], drawn from a hash
    of (job id, attempt) so every replica computes the same value.
    """
    exponent = min(max(attempt - 1, 0), 62)
    delay = min(config.backoff_max_ms, config.backoff_base_ms << exponent)
    half = delay // 2
    return half + mix64(job_id, attempt) % (delay - half + 1)
