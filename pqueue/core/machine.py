"""The queue state machine: deterministic ``apply(entry)`` of logged commands.

Pure: no clock, IO or global random. Time arrives only as ``LogEntry.time_ms``
stamped by the proposer, so every replica applying the same entries reaches
the same state (same snapshot bytes). Each command either succeeds or raises
a ``PQueueError`` *before* changing anything; ``apply_entry`` returns one
result per command (the response message, or that error).

Every entry first advances time: delayed jobs that came due become ready,
leases that expired return their jobs (or make them dead), and idempotency
keys past their window are forgotten. Expiry is therefore decided in the log,
never guessed per replica.
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

from google.protobuf.message import Message

from pqueue.core import limits
from pqueue.core.jobs import (
    DEAD,
    DELAYED,
    LEASED,
    READY,
    WAITING,
    Group,
    GroupKey,
    Job,
    QueueState,
    backoff_ms,
)
from pqueue.core.queue_table import QueueTable
from pqueue.errors import (
    AlreadyExistsError,
    InvalidArgumentError,
    LeaseLostError,
    NotFoundError,
    PermissionDeniedError,
    PQueueError,
    ResourceExhaustedError,
)
from pqueue.v1 import log_pb2 as logpb
from pqueue.v1 import queue_pb2 as pb

Result = Message | PQueueError


class QueueMachine:
    """All queues of one node, advanced only by ``apply_entry``."""

    def __init__(self) -> None:
        self.queues = QueueTable()
        self.jobs: dict[int, Job] = {}
        self.next_job_id = 1
        self.next_lease_id = 1
        self.applied_index = 0
        self.time_ms = 0
        #: Every feature the entries applied so far needed (their
        #: ``required_features``): a snapshot of this state needs them too.
        self.features: set[str] = set()
        #: (ready_at_ms, job_id, token) of DELAYED jobs, all queues.
        self._delayed: list[tuple[int, int, int]] = []
        #: (expires_at_ms, lease_id, job_id) of LEASED jobs, all queues.
        self._leases: list[tuple[int, int, int]] = []
        #: (expires_at_ms, queue, tenant, key) of idempotency records.
        self._dedup: list[tuple[int, str, str, str]] = []
        #: Per queue, how many jobs became leasable since the last ``drain_woken``.
        self._woken: Counter[str] = Counter()
        #: Queues with delete_when_idle that lost their last job this command.
        self._idle: set[str] = set()
        #: The tenant limits stamped on the command being applied (None: none).
        self._limits: logpb.TenantLimits | None = None
        #: Who sent the command being applied (None: not stamped, auth off).
        self._caller: logpb.Caller | None = None
        #: Ids of jobs changed or removed since ``take_changes`` (None: not
        #: tracked). A store that mirrors jobs (PostgreSQL's ``jobs`` table)
        #: turns it on; it never affects what the machine does.
        self.changed: set[int] | None = None
        self._handlers: dict[str, Callable[[Any, int], Message]] = {
            "enqueue": self._enqueue,
            "lease": self._lease,
            "ack": self._ack,
            "nack": self._nack,
            "extend": self._extend,
            "create_queue": self._create_queue,
            "delete_queue": self._delete_queue,
            "purge": self._purge,
            "redrive": self._redrive,
            "delete_dead": self._delete_dead,
            "tick": self._tick,
        }

    # ------------------------------------------------------------------ apply

    def apply_entry(self, entry: logpb.LogEntry) -> list[Result]:
        """Apply one log entry; one result per command, in order."""
        if entry.index != self.applied_index + 1:
            raise ValueError(f"entry {entry.index} applied after {self.applied_index}")
        now = max(entry.time_ms, self.time_ms)  # time never runs backwards
        self.time_ms = now
        self.applied_index = entry.index
        self.features.update(entry.required_features)
        self.advance(now)
        return [self.apply_command(cmd, now) for cmd in entry.commands]

    def apply_command(self, cmd: logpb.Command, now: int) -> Result:
        """Apply one command at ``now``; an error result means nothing changed."""
        kind = cmd.WhichOneof("kind")
        if kind is None:
            return InvalidArgumentError("command", "empty command")
        self._limits = cmd.limits if cmd.HasField("limits") else None
        self._caller = cmd.caller if cmd.HasField("caller") else None
        try:
            return self._handlers[kind](getattr(cmd, kind), now)
        except PQueueError as exc:
            return exc
        finally:
            self._limits = self._caller = None
            for name in self._idle:
                queue = self.queues.get(name)
                if queue is not None:
                    self._drop_if_idle(queue)
            self._idle.clear()

    def advance(self, now: int) -> None:
        """Promote due delayed jobs, expire due leases, forget old dedup keys."""
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
        while self._dedup and self._dedup[0][0] <= now:
            expires, name, tenant, key = heapq.heappop(self._dedup)
            owner = self.queues.get(name)
            if owner is not None and owner.dedup.get((tenant, key), (0, -1))[1] == expires:
                del owner.dedup[tenant, key]
                self._drop_if_idle(owner)

    def _compact_time_heaps(self) -> None:
        """Acked jobs leave lease entries behind until their expiry time: drop
        them once they outnumber the live ones (amortized O(1) per entry)."""
        live = {DELAYED: 0, LEASED: 0}
        if len(self._leases) + len(self._delayed) < 1024:
            return
        for queue in self.queues.values():
            live[DELAYED] += queue.counts[DELAYED]
            live[LEASED] += queue.counts[LEASED]
        if len(self._leases) > 2 * live[LEASED] + 1024:
            # Filter the heap itself: scanning every job instead cost time in
            # proportion to the backlog, not to the entries dropped.
            self._leases = [e for e in self._leases if self._leased_by(e) is not None]
            heapq.heapify(self._leases)
        if len(self._delayed) > 2 * live[DELAYED] + 1024:
            self._delayed = [e for e in self._delayed if self._delayed_job(e) is not None]
            heapq.heapify(self._delayed)

    # ------------------------------------------------------------------ reads

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

    def ready_jobs(self) -> int:
        """Ready jobs over all queues."""
        return sum(q.counts[READY] for q in self.queues.values())

    def has_ready(self, queue_name: str) -> bool:
        """Whether a lease on this queue would find a job now."""
        queue = self.queues.get(queue_name)
        return queue is not None and queue.peek_ready() is not None

    def next_due_ms(self) -> int | None:
        """When the next delayed job comes due or lease expires, if ever."""
        while self._delayed and self._delayed_job(self._delayed[0]) is None:
            heapq.heappop(self._delayed)
        while self._leases and self._leased_by(self._leases[0]) is None:
            heapq.heappop(self._leases)
        due = [h[0][0] for h in (self._delayed, self._leases) if h]
        return min(due) if due else None

    def drain_woken(self) -> Counter[str]:
        """Per queue, how many jobs became leasable since the last call."""
        woken, self._woken = self._woken, Counter()
        return woken

    # --------------------------------------------------------------- commands

    def _enqueue(self, req: pb.EnqueueBatchRequest, now: int) -> pb.EnqueueBatchResponse:
        limits.check_queue_name(req.queue)
        queue = self.queues.get(req.queue)
        tenant = self._check_producer(req.queue, queue)
        config = queue.config if queue else limits.effective_config(pb.QueueConfig())
        for i, spec in enumerate(req.jobs):
            self._check_spec(config, spec, f"jobs[{i}]")
        self._check_tenant_enqueue(req, queue, tenant)
        if queue is None:
            queue = self._new_queue(req.queue, config)
        lane = queue.lane(tenant)
        out = pb.EnqueueBatchResponse()
        for spec in req.jobs:
            key = spec.idempotency_key
            if key and (tenant, key) in queue.dedup:
                out.results.add(job_id=queue.dedup[tenant, key][0], duplicate=True)
                continue
            job = Job(
                job_id=self.next_job_id,
                queue=queue.name,
                priority=spec.priority,
                payload=spec.payload,
                state=0,
                group=spec.group,
                idempotency_key=key,
                enqueued_at_ms=now,
                ready_at_ms=now,
                tenant=tenant,
            )
            self.next_job_id += 1
            queue.jobs[job.job_id] = job
            lane.held += 1
            self.jobs[job.job_id] = job
            queue.counters.enqueued += 1
            if key:
                self.remember_key(queue, tenant, key, job.job_id, now + config.dedup_window_ms)
            ready_at = max(now + spec.delay_ms, spec.not_before_ms)
            if ready_at > now:
                self._make_delayed(queue, job, ready_at)
            else:
                self._make_ready(queue, job, now)
            out.results.add(job_id=job.job_id)
        return out

    def _lease(self, req: pb.LeaseRequest, now: int) -> pb.LeaseResponse:
        queue = self._queue(req.queue)
        limits.check_duration(req.lease_ms, "lease_ms")
        max_jobs = min(max(req.max_jobs, 1), limits.MAX_LEASE_JOBS, self._lease_room(req.queue))
        lease_ms = min(
            req.lease_ms or queue.config.default_lease_ms, queue.config.max_lease_total_ms
        )
        out = pb.LeaseResponse()
        size = 0
        while len(out.jobs) < max_jobs and size < limits.MAX_LEASE_RESPONSE_BYTES:
            job = queue.take_ready()
            if job is None:
                break
            size += len(job.payload)
            self._set_state(queue, job, LEASED)
            job.attempts += 1
            queue.counters.leased += 1
            job.lease_id = self.next_lease_id
            self.next_lease_id += 1
            job.leased_at_ms = now
            job.lease_expires_at_ms = now + lease_ms
            job.consumer_id = req.consumer_id
            heapq.heappush(self._leases, (job.lease_expires_at_ms, job.lease_id, job.job_id))
            if job.group:
                queue.groups[job.group_key].in_flight = job.job_id
            out.jobs.add(
                job_id=job.job_id,
                lease_id=job.lease_id,
                priority=job.priority,
                payload=job.payload,
                attempt=job.attempts,
                group=job.group,
                enqueued_at_ms=job.enqueued_at_ms,
                lease_expires_at_ms=job.lease_expires_at_ms,
                queue=queue.name,
                tenant=job.tenant,
            )
        return out

    def _ack(self, req: pb.AckRequest, now: int) -> pb.AckResponse:
        queue = self._queue(req.queue)
        seen: set[int] = set()
        jobs = []
        for i, lease in enumerate(req.leases):
            if lease.job_id in seen:
                raise InvalidArgumentError(f"leases[{i}].job_id", "job listed twice")
            seen.add(lease.job_id)
            jobs.append(self._leased_job(queue, lease.job_id, lease.lease_id))
        for job in jobs:
            queue.counters.acked += 1
            self._end_lease(queue, job)
            self._remove(queue, job)
        return pb.AckResponse(acked=len(jobs))

    def _nack(self, req: pb.NackRequest, now: int) -> pb.NackResponse:
        queue = self._queue(req.queue)
        job = self._leased_job(queue, req.job_id, req.lease_id)
        if req.release:
            delay = req.delay_ms if req.HasField("delay_ms") else 0
            limits.check_duration(delay, "delay_ms")
            job.attempts -= 1  # this delivery does not count
            self._end_lease(queue, job)
            if delay:
                self._make_delayed(queue, job, now + delay)
            else:
                self._make_ready(queue, job, now)
            return pb.NackResponse(
                state=job.state,  # type: ignore[arg-type]
                ready_at_ms=job.ready_at_ms,
                attempts=job.attempts,
            )
        delay = (
            req.delay_ms
            if req.HasField("delay_ms")
            else backoff_ms(queue.config, job.job_id, job.attempts)
        )
        limits.check_duration(delay, "delay_ms")
        queue.counters.nacked += 1
        self._fail_delivery(queue, job, now, req.reason or "nacked", retry_at=now + delay)
        return pb.NackResponse(
            state=job.state,  # type: ignore[arg-type]
            ready_at_ms=job.ready_at_ms if job.state != DEAD else 0,
            attempts=job.attempts,
        )

    def _extend(self, req: pb.ExtendLeaseRequest, now: int) -> pb.ExtendLeaseResponse:
        queue = self._queue(req.queue)
        limits.check_duration(req.lease_ms, "lease_ms")
        job = self._leased_job(queue, req.job_id, req.lease_id)
        wanted = now + (req.lease_ms or queue.config.default_lease_ms)
        cap = job.leased_at_ms + queue.config.max_lease_total_ms
        job.lease_expires_at_ms = min(wanted, cap)
        if self.changed is not None:
            self.changed.add(job.job_id)
        # The older heap entry no longer matches the expiry and is skipped.
        heapq.heappush(self._leases, (job.lease_expires_at_ms, job.lease_id, job.job_id))
        return pb.ExtendLeaseResponse(
            lease_expires_at_ms=job.lease_expires_at_ms, capped=wanted > cap
        )

    def _create_queue(self, req: pb.CreateQueueRequest, now: int) -> pb.CreateQueueResponse:
        limits.check_queue_name(req.queue)
        config = limits.effective_config(req.config)
        existing = self.queues.get(req.queue)
        if existing is not None:
            if existing.config != config:
                raise AlreadyExistsError(f"queue {req.queue!r} exists with a different config")
            return pb.CreateQueueResponse(created=False, config=existing.config)
        self._new_queue(req.queue, config)
        return pb.CreateQueueResponse(created=True, config=config)

    def _delete_queue(self, req: pb.DeleteQueueRequest, now: int) -> pb.DeleteQueueResponse:
        queue = self._queue(req.queue)
        count = len(queue.jobs)
        self._drop_queue(queue)
        return pb.DeleteQueueResponse(deleted_jobs=count)

    def _purge(self, req: pb.PurgeQueueRequest, now: int) -> pb.PurgeQueueResponse:
        queue = self._queue(req.queue)
        doomed = [job for job in queue.jobs.values() if job.state in WAITING]
        for job in doomed:
            self._remove(queue, job)
        return pb.PurgeQueueResponse(purged=len(doomed))

    def _redrive(self, req: pb.RedriveRequest, now: int) -> pb.RedriveResponse:
        queue = self._queue(req.queue)
        jobs = self._dead_jobs(queue, req.job_ids)
        for job in jobs:
            queue.dead_ids.discard(job.job_id)
            job.attempts = 0
            self._make_ready(queue, job, now)
        return pb.RedriveResponse(redriven=len(jobs))

    def _delete_dead(self, req: pb.DeleteDeadRequest, now: int) -> pb.DeleteDeadResponse:
        queue = self._queue(req.queue)
        jobs = self._dead_jobs(queue, req.job_ids)
        for job in jobs:
            self._remove(queue, job)
        return pb.DeleteDeadResponse(deleted=len(jobs))

    def _tick(self, req: logpb.Tick, now: int) -> logpb.Tick:
        return logpb.Tick()

    # -------------------------------------------------------------- restore

    def index_job(self, queue: QueueState, job: Job) -> None:
        """Adopt a job restored from a snapshot, in whatever state it was.

        Group heads are offered for leasing afterwards, once every job of the
        group is known (see ``pqueue.core.snapshot.restore``).
        """
        queue.jobs[job.job_id] = job
        self.jobs[job.job_id] = job
        queue.lane(job.tenant).held += 1
        queue.counts[job.state] += 1
        if job.state == DEAD:
            queue.dead_ids.add(job.job_id)
            return
        group = queue.groups.setdefault(job.group_key, Group()) if job.group else None
        if job.state == LEASED:
            heapq.heappush(self._leases, (job.lease_expires_at_ms, job.lease_id, job.job_id))
            if group is not None:
                group.in_flight = job.job_id
            return
        if group is not None:
            heapq.heappush(group.waiting, job.job_id)
        if job.state == READY:
            queue.note_ready(job)
        if job.state == DELAYED:
            job.token += 1
            heapq.heappush(self._delayed, (job.ready_at_ms, job.job_id, job.token))
        elif group is None:
            queue.push_ready(job)

    def remember_key(
        self, queue: QueueState, tenant: str, key: str, job_id: int, expires_at_ms: int
    ) -> None:
        """Record a producing tenant's idempotency key until ``expires_at_ms``
        (per tenant: in a shared queue, one tenant's key never answers for another's)."""
        queue.dedup[tenant, key] = (job_id, expires_at_ms)
        heapq.heappush(self._dedup, (expires_at_ms, queue.name, tenant, key))

    # ----------------------------------------------------------- transitions

    def _check_producer(self, name: str, queue: QueueState | None) -> str:
        """The tenant an enqueue produces for, if the caller may enqueue here.

        The queue's owner, an admin (on the owner's behalf) and an unstamped
        enqueue (auth off, or logged before callers were stamped) produce
        for the owner; a tenant the queue is shared with, for itself. Anyone
        else is refused, alike whether the queue exists, so that does not leak.
        """
        owner = limits.tenant_of(name)
        caller = self._caller
        if caller is None or not caller.tenant or caller.tenant == owner or caller.admin:
            return owner
        if queue is None or caller.tenant not in queue.weights:
            raise PermissionDeniedError(
                f"queue {name!r} belongs to another tenant and is not shared with "
                f"tenant {caller.tenant!r}"
            )
        return caller.tenant

    def _check_tenant_enqueue(
        self, req: pb.EnqueueBatchRequest, queue: QueueState | None, tenant: str
    ) -> None:
        """The stamped tenant limits on payload size and queue depth: all jobs or
        none. Depth counts the producing tenant's jobs in the queue."""
        bound = self._limits
        if bound is None:
            return
        for i, spec in enumerate(req.jobs):
            if bound.max_payload_bytes and len(spec.payload) > bound.max_payload_bytes:
                raise InvalidArgumentError(
                    f"jobs[{i}].payload",
                    f"{len(spec.payload)} bytes exceeds the tenant's limit of "
                    f"{bound.max_payload_bytes}",
                )
        if not bound.max_queue_depth:
            return
        # Dead jobs count: they stay until redriven or deleted.
        lane = None if queue is None else queue.lanes.get(tenant)
        depth = 0 if lane is None else lane.held
        keys = set() if queue is None else queue.dedup.keys()
        new = sum(
            1
            for spec in req.jobs
            if not (spec.idempotency_key and (tenant, spec.idempotency_key) in keys)
        )
        if depth + new > bound.max_queue_depth:
            raise ResourceExhaustedError(
                f"queue {req.queue!r} holds {depth} jobs and the tenant's limit is "
                f"{bound.max_queue_depth}; retry once consumers catch up",
                retry_after_s=1.0,
            )

    def _lease_room(self, queue_name: str) -> int:
        """How many more jobs the stamped limit lets the queue's tenant hold leased."""
        bound = self._limits
        if bound is None or not bound.max_inflight_leases:
            return limits.MAX_LEASE_JOBS
        tenant = limits.tenant_of(queue_name)
        leased = sum(self.queues[name].counts[LEASED] for name in self.queues.names_of(tenant))
        room = bound.max_inflight_leases - leased
        if room <= 0:
            raise ResourceExhaustedError(
                f"the tenant holds {leased} leases, its limit; ack or nack some first",
                retry_after_s=1.0,
            )
        return room

    def _new_queue(self, name: str, config: pb.QueueConfig) -> QueueState:
        if len(self.queues) >= limits.MAX_QUEUES:
            raise ResourceExhaustedError(
                f"the cluster holds its limit of {limits.MAX_QUEUES} queues; delete one first"
            )
        bound = self._limits
        if bound is not None and bound.max_queues:
            tenant = limits.tenant_of(name)
            held = self.queues.held_by(tenant)
            if held >= bound.max_queues:
                raise ResourceExhaustedError(
                    f"the tenant holds {held} queues, its limit; delete one first"
                )
        queue = QueueState(name=name, config=config)
        self.queues[name] = queue
        return queue

    def _drop_if_idle(self, queue: QueueState) -> None:
        """delete_when_idle: drop a queue with no job and no live idempotency key
        (the keys must outlive their jobs, or a retried enqueue makes a twin)."""
        if queue.config.delete_when_idle and not queue.jobs and not queue.dedup:
            self._drop_queue(queue)

    def _drop_queue(self, queue: QueueState) -> None:
        for job_id in queue.jobs:
            del self.jobs[job_id]
        if self.changed is not None:
            self.changed.update(queue.jobs)
        del self.queues[queue.name]

    def take_changes(self) -> tuple[list[pb.Job], list[int]]:
        """Jobs changed since the last call (as shown to clients), and ids removed."""
        if not self.changed:
            return [], []
        changed, self.changed = self.changed, set()
        live = [self.jobs[i].to_proto() for i in sorted(changed) if i in self.jobs]
        return live, sorted(i for i in changed if i not in self.jobs)

    def _set_state(self, queue: QueueState, job: Job, state: int) -> None:
        if self.changed is not None:
            self.changed.add(job.job_id)
        if job.state:
            queue.counts[job.state] -= 1
        queue.counts[state] += 1
        job.state = state

    def _make_ready(self, queue: QueueState, job: Job, ready_at: int) -> None:
        self._set_state(queue, job, READY)
        job.ready_at_ms = ready_at
        queue.note_ready(job)
        if job.group:
            self._join_group(queue, job)
        else:
            queue.push_ready(job)
            self._woken[queue.name] += 1

    def _make_delayed(self, queue: QueueState, job: Job, ready_at: int) -> None:
        self._set_state(queue, job, DELAYED)
        job.ready_at_ms = ready_at
        job.token += 1
        heapq.heappush(self._delayed, (ready_at, job.job_id, job.token))
        if job.group:
            self._join_group(queue, job)

    def _join_group(self, queue: QueueState, job: Job) -> None:
        group = queue.groups.setdefault(job.group_key, Group())
        if group.in_flight != job.job_id:
            heapq.heappush(group.waiting, job.job_id)
        self._refresh_group(queue, job.group_key)

    def _refresh_group(self, queue: QueueState, key: GroupKey) -> None:
        """Offer the group's head for leasing when nothing of it is in flight."""
        group = queue.groups[key]
        if group.in_flight:
            return
        head = queue.group_head(key)
        if head is None:
            del queue.groups[key]
        elif head.state == READY:
            queue.push_ready(head)
            self._woken[queue.name] += 1

    def _end_lease(self, queue: QueueState, job: Job) -> None:
        """The delivery is over (ack, nack, expiry): free the job's group."""
        job.lease_expires_at_ms = 0
        if job.group:
            group = queue.groups[job.group_key]
            if group.in_flight == job.job_id:
                group.in_flight = 0

    def _fail_delivery(
        self, queue: QueueState, job: Job, now: int, reason: str, retry_at: int
    ) -> None:
        """Record the failed attempt; retry at ``retry_at`` or make the job dead."""
        job.errors.append((job.attempts, now, reason[: limits.MAX_REASON_CHARS]))
        del job.errors[: -limits.MAX_ERROR_HISTORY]
        self._end_lease(queue, job)
        if job.attempts >= queue.config.max_attempts:
            self._set_state(queue, job, DEAD)
            queue.dead_ids.add(job.job_id)
            queue.counters.dead += 1
            if job.group:
                self._refresh_group(queue, job.group_key)
        elif retry_at > now:
            self._make_delayed(queue, job, retry_at)
        else:
            self._make_ready(queue, job, now)

    def _remove(self, queue: QueueState, job: Job) -> None:
        if self.changed is not None:
            self.changed.add(job.job_id)
        queue.counts[job.state] -= 1
        del queue.jobs[job.job_id]
        del self.jobs[job.job_id]
        queue.lanes[job.tenant].held -= 1
        queue.dead_ids.discard(job.job_id)
        if job.group and job.group_key in queue.groups:
            self._refresh_group(queue, job.group_key)
        if queue.config.delete_when_idle and not queue.jobs:
            self._idle.add(queue.name)

    # ------------------------------------------------------------- lookups

    def _delayed_job(self, entry: tuple[int, int, int]) -> Job | None:
        """The job a delayed-heap entry names, if the entry is still current."""
        _, job_id, token = entry
        job = self.jobs.get(job_id)
        return job if job is not None and job.token == token and job.state == DELAYED else None

    def _leased_by(self, entry: tuple[int, int, int]) -> Job | None:
        """The job a lease-heap entry names, if that lease and expiry still hold."""
        expires, lease_id, job_id = entry
        job = self.jobs.get(job_id)
        if (
            job is None
            or job.state != LEASED
            or job.lease_id != lease_id
            or job.lease_expires_at_ms != expires
        ):
            return None
        return job

    def _queue(self, name: str) -> QueueState:
        queue = self.queues.get(name)
        if queue is None:
            limits.check_queue_name(name)
            raise NotFoundError(f"queue {name!r} not found")
        return queue

    def _leased_job(self, queue: QueueState, job_id: int, lease_id: int) -> Job:
        """The job under this lease, or the error a stale or unknown lease earns."""
        job = queue.jobs.get(job_id)
        if job is None and (job_id == 0 or job_id >= self.next_job_id):
            raise NotFoundError(f"job {job_id} not found in queue {queue.name!r}")
        if job is None or job.state != LEASED or job.lease_id != lease_id:
            raise LeaseLostError(f"job {job_id} is not leased under lease {lease_id}", job_id)
        return job

    def _check_spec(self, config: pb.QueueConfig, spec: pb.JobSpec, field: str) -> None:
        limits.check_job_spec(spec, field)
        if len(spec.payload) > config.max_payload_bytes:
            raise InvalidArgumentError(
                f"{field}.payload",
                f"{len(spec.payload)} bytes exceeds the queue's max_payload_bytes "
                f"{config.max_payload_bytes}",
            )
        if config.HasField("min_priority") and spec.priority < config.min_priority:
            raise InvalidArgumentError(
                f"{field}.priority",
                f"{spec.priority} is below the queue's min_priority {config.min_priority}",
            )
        if config.HasField("max_priority") and spec.priority > config.max_priority:
            raise InvalidArgumentError(
                f"{field}.priority",
                f"{spec.priority} is above the queue's max_priority {config.max_priority}",
            )

    def _dead_jobs(self, queue: QueueState, job_ids: Iterable[int]) -> list[Job]:
        """The queue's dead jobs, all of them or those listed, by id."""
        wanted = set(job_ids)
        ids = sorted(wanted & queue.dead_ids if wanted else queue.dead_ids)
        return [queue.jobs[i] for i in ids]
