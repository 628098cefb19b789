"""In-memory structures of the queue state machine: jobs, queues, groups, heaps.

Pure. Heaps use lazy deletion: an entry is valid only while the job it names
still matches it (state, token, lease id or expiry), so removing a job is O(1)
and leasing the next one is O(log n) amortized.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

from pqueue.v1 import queue_pb2 as pb

READY = pb.JOB_STATE_READY
DELAYED = pb.JOB_STATE_DELAYED
LEASED = pb.JOB_STATE_LEASED
DEAD = pb.JOB_STATE_DEAD
WAITING = (READY, DELAYED)

#: Heaps are rebuilt once stale entries outnumber live ones by this much.
_SLACK = 64

#: (aged key, ready_at_ms, job_id, token): smallest is served first.
ReadyEntry = tuple[int, int, int, int]


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
    #: (attempt, at_ms, reason), oldest first, at most MAX_ERROR_HISTORY.
    errors: list[tuple[int, int, str]] = field(default_factory=list)
    #: Bumped each time the job enters the ready or delayed heap; older heap
    #: entries then no longer match and are skipped.
    token: int = 0

    def to_proto(self) -> pb.Job:
        """The public view (never the lease id: that is the consumer's secret)."""
        return pb.Job(
            job_id=self.job_id,
            queue=self.queue,
            priority=self.priority,
            payload=self.payload,
            state=self.state,  # type: ignore[arg-type]
            attempts=self.attempts,
            group=self.group,
            idempotency_key=self.idempotency_key,
            enqueued_at_ms=self.enqueued_at_ms,
            ready_at_ms=self.ready_at_ms,
            lease_expires_at_ms=self.lease_expires_at_ms if self.state == LEASED else 0,
            consumer_id=self.consumer_id,
            errors=[pb.JobError(attempt=a, at_ms=t, reason=r) for a, t, r in self.errors],
        )


@dataclass(slots=True)
class Group:
    """An ordering key: FIFO by job id, at most one job in flight."""

    #: Heap of ids of the group's READY/DELAYED jobs (lazy: may hold stale ids).
    waiting: list[int] = field(default_factory=list)
    in_flight: int = 0


@dataclass(slots=True)
class Counters:
    """Monotonic per-queue totals."""

    enqueued: int = 0
    leased: int = 0
    acked: int = 0
    nacked: int = 0
    expired: int = 0
    dead: int = 0


@dataclass(slots=True)
class QueueState:
    """One named queue: its config, jobs and indexes."""

    name: str
    config: pb.QueueConfig
    jobs: dict[int, Job] = field(default_factory=dict)
    ready: list[ReadyEntry] = field(default_factory=list)
    #: (ready_at_ms, job_id) of every READY job, for the oldest-ready age.
    oldest: list[tuple[int, int]] = field(default_factory=list)
    groups: dict[str, Group] = field(default_factory=dict)
    dead_ids: set[int] = field(default_factory=set)
    counts: dict[int, int] = field(
        default_factory=lambda: {READY: 0, DELAYED: 0, LEASED: 0, DEAD: 0}
    )
    counters: Counters = field(default_factory=Counters)
    #: idempotency key -> (job_id, expires_at_ms)
    dedup: dict[str, tuple[int, int]] = field(default_factory=dict)

    def ready_key(self, job: Job) -> ReadyEntry:
        """Priority then FIFO; with aging, the static key priority*I + ready time."""
        interval = self.config.aging_interval_ms
        first = job.priority * interval + job.ready_at_ms if interval else job.priority
        return (first, job.ready_at_ms, job.job_id, job.token)

    def push_ready(self, job: Job) -> None:
        """Make ``job`` (READY, eligible) a candidate for the next lease."""
        job.token += 1
        heapq.heappush(self.ready, self.ready_key(job))
        if len(self.ready) > 2 * self.counts[READY] + _SLACK:
            self._rebuild_ready()

    def note_ready(self, job: Job) -> None:
        """Track a job that became READY (eligible or behind its group's head)."""
        heapq.heappush(self.oldest, (job.ready_at_ms, job.job_id))
        if len(self.oldest) > 2 * self.counts[READY] + _SLACK:
            self.oldest = [
                (j.ready_at_ms, j.job_id) for j in self.jobs.values() if j.state == READY
            ]
            heapq.heapify(self.oldest)

    def _rebuild_ready(self) -> None:
        """Drop stale entries: the heap holds only leasable jobs again."""
        self.ready = []
        for job in self.jobs.values():
            if job.state == READY and (not job.group or self.group_head(job.group) is job):
                group = self.groups.get(job.group) if job.group else None
                if group is None or not group.in_flight:
                    job.token += 1
                    self.ready.append(self.ready_key(job))
        heapq.heapify(self.ready)

    def group_head(self, name: str) -> Job | None:
        """The group's first waiting job, dropping stale heap entries."""
        group = self.groups[name]
        while group.waiting:
            job = self.jobs.get(group.waiting[0])
            if job is not None and job.group == name and job.state in WAITING:
                return job
            heapq.heappop(group.waiting)
        return None

    def is_eligible(self, job: Job, token: int) -> bool:
        """Whether a ready-heap entry still names a job that may be leased now."""
        if job.token != token or job.state != READY:
            return False
        if not job.group:
            return True
        group = self.groups.get(job.group)
        if group is None or group.in_flight:
            return False
        head = self.group_head(job.group)
        return head is job

    def peek_ready(self) -> Job | None:
        """The job the next lease would take, dropping stale entries."""
        while self.ready:
            _, _, job_id, token = self.ready[0]
            job = self.jobs.get(job_id)
            if job is not None and self.is_eligible(job, token):
                return job
            heapq.heappop(self.ready)
        return None

    def oldest_ready_at(self) -> int | None:
        """The earliest ready time among READY jobs, dropping stale entries."""
        while self.oldest:
            ready_at, job_id = self.oldest[0]
            job = self.jobs.get(job_id)
            if job is not None and job.state == READY and job.ready_at_ms == ready_at:
                return ready_at
            heapq.heappop(self.oldest)
        return None

    def stats(self, now_ms: int) -> pb.QueueStats:
        """Counts and totals at ``now_ms``."""
        oldest = self.oldest_ready_at()
        c = self.counters
        return pb.QueueStats(
            queue=self.name,
            ready=self.counts[READY],
            delayed=self.counts[DELAYED],
            leased=self.counts[LEASED],
            dead=self.counts[DEAD],
            oldest_ready_age_ms=max(0, now_ms - oldest) if oldest is not None else 0,
            enqueued_total=c.enqueued,
            leased_total=c.leased,
            acked_total=c.acked,
            nacked_total=c.nacked,
            expired_total=c.expired,
            dead_total=c.dead,
        )


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
