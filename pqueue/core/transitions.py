"""The queue machine's state and its transitions: moving a job between
states, the indexes that follow it (ready heaps, groups, timers), and lookups.
Pure, like all of ``pqueue.core``; ``QueueMachine`` (machine.py) composes it
with the commands."""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Iterable, Sequence

from pqueue.core import limits
from pqueue.core.effects import Named
from pqueue.core.jobs import (
    CANCELLED,
    COMPLETED,
    DEAD,
    DELAYED,
    FINISHED,
    LEASED,
    READY,
    WAITING,
    Group,
    GroupKey,
    Job,
    QueueState,
)
from pqueue.core.queue_table import QueueTable
from pqueue.errors import (
    InvalidArgumentError,
    LeaseLostError,
    NotFoundError,
    ResourceExhaustedError,
)
from pqueue.v1 import log_pb2 as logpb
from pqueue.v1 import queue_pb2 as pb

#: End-order heaps are rebuilt once stale entries outnumber live ones by this much.
_SLACK = 64


def _live_ends(
    queue: QueueState, heap: list[tuple[int, int]], states: tuple[int, ...]
) -> list[tuple[int, int]]:
    """An end-order heap (``dead_order``, ``finished``) without its stale
    entries (its oldest live entry stays its front, so the retention already
    scheduled still holds)."""
    live = []
    for entry in heap:
        job = queue.jobs.get(entry[1])
        if job is not None and job.state in states and job.finished_at_ms == entry[0]:
            live.append(entry)
    heapq.heapify(live)
    return live


class MachineState:
    """The fields of ``QueueMachine`` (see there)."""

    def __init__(self) -> None:
        self.queues = QueueTable()
        self.next_job_id = 1
        self.next_lease_id = 1
        self.applied_index = 0
        self.time_ms = 0
        #: Every feature the entries applied so far needed (their
        #: ``required_features``): a snapshot of this state needs them too.
        #: Replaced, never changed in place: it may key a cache.
        self.features: frozenset[str] = frozenset()
        #: (ready_at_ms, job_id, token, queue) of DELAYED jobs, all queues.
        self._delayed: list[tuple[int, int, int, str]] = []
        #: (expires_at_ms, lease_id, job_id, queue) of LEASED jobs, all queues.
        self._leases: list[tuple[int, int, int, str]] = []
        #: (due_ms, job_id, queue) of COMPLETED and CANCELLED records: when
        #: the queue's completed_retention_ms drops them (rounded up to a
        #: second, so pruning asks for at most one tick a second).
        self._retention: list[tuple[int, int, str]] = []
        #: The time heaps' size at which stale entries are next looked for.
        self._compact_at = 1024
        #: (expires_at_ms, queue, tenant, key) of idempotency records.
        self._dedup: list[tuple[int, str, str, str]] = []
        #: (expires_at_ms, job_id, queue) of waiting jobs that expire (lazy:
        #: an entry whose job is no longer waiting, or expires at another
        #: time, is skipped; a job pushes one again when it waits again).
        self._expiry: list[tuple[int, int, str]] = []
        #: (due_ms, queue) of queues whose dead jobs may be due for pruning
        #: (dead_retention_ms) then: at least one entry at or before the due
        #: time of each queue's oldest ``dead_order`` entry (lazy: an early
        #: or stale one only reschedules).
        self._dead_due: list[tuple[int, str]] = []
        #: Per queue, how many jobs became leasable in the entry being applied
        #: (reported in its ``Effects``; reset by ``apply_entry``).
        self._woken: Counter[str] = Counter()
        #: Queues with delete_when_idle that lost their last job this command.
        self._idle: set[str] = set()
        #: The tenant limits stamped on the command being applied (None: none).
        self._limits: logpb.TenantLimits | None = None
        #: The job-lifecycle semantics are on (``features.LIFECYCLE``: an
        #: entry needed it; see ``QueueMachine.apply_entry``).
        self.lifecycle = False
        #: Who sent the command being applied (None: not stamped, auth off).
        self._caller: logpb.Caller | None = None
        #: Ids of jobs changed or removed in the entry being applied (reported
        #: in its ``Effects``; never read by the machine itself).
        self._changed: set[int] = set()
        #: Names of the queues those jobs are (or were) in.
        self._touched: set[str] = set()
        #: The jobs the command being applied named for its events (reported
        #: in its ``Effects.named``; set by the handlers that record them).
        self._named: Named | None = None
        #: Whether the entry being applied has a caller here waiting for its
        #: results (``apply_entry``'s ``respond``). Without one, a lease's
        #: answer lists no jobs: building each job's message (its payload
        #: copied) was a tenth of a follower's time in a batch run, for an
        #: answer nobody reads. Never read for anything the state holds.
        self._responding = True


class Transitions(MachineState):
    """Job state changes and the indexes kept with them."""

    # -------------------------------------------------------------- restore

    def index_job(self, queue: QueueState, job: Job, compact: bool = True) -> None:
        """Adopt a job restored from a snapshot, in whatever state it was
        (in the compact form if it can be, unless not ``compact``).

        Group heads are offered for leasing afterwards, once every job of the
        group is known (see ``pqueue.core.snapshot.restore``).
        """
        lane = queue.lane(job.tenant)
        if job.state not in FINISHED:  # a record holds no room (``_finish``)
            lane.held += 1
        queue.counts[job.state] += 1
        if compact and job.packable() and queue.add_compact(job.job_id, job.row()):
            return
        queue.jobs[job.job_id] = job
        if job.state == DEAD or job.state in FINISHED:
            self.note_end(queue, job)
            return
        group = queue.groups.setdefault(job.group_key, Group()) if job.group else None
        if job.state == LEASED:
            heapq.heappush(
                self._leases, (job.lease_expires_at_ms, job.lease_id, job.job_id, queue.name)
            )
            if group is not None:
                group.in_flight = job.job_id
            return
        if group is not None:
            heapq.heappush(group.waiting, job.job_id)
        self._watch_expiry(queue, job)
        if job.state == READY:
            queue.note_ready(job)
        if job.state == DELAYED:
            job.token += 1
            heapq.heappush(self._delayed, (job.ready_at_ms, job.job_id, job.token, queue.name))
        elif group is None:
            queue.push_ready(job)

    def note_end(self, queue: QueueState, job: Job) -> None:
        """Index a job that is DEAD, COMPLETED or CANCELLED (its
        ``finished_at_ms`` set) for retention, and dead ones for ListDead."""
        entry = (job.finished_at_ms, job.job_id)
        if job.state == DEAD:
            queue.dead_ids.add(job.job_id)
            heapq.heappush(queue.dead_order, entry)
            if queue.dead_order[0] == entry:  # a new front: when it is due
                self.watch_retention(queue)
            if len(queue.dead_order) > 2 * queue.counts[DEAD] + _SLACK:
                queue.dead_order = _live_ends(queue, queue.dead_order, (DEAD,))
        else:
            heapq.heappush(queue.finished, entry)
            due = _whole_second(job.finished_at_ms + queue.config.completed_retention_ms)
            heapq.heappush(self._retention, (due, job.job_id, queue.name))

    def watch_retention(self, queue: QueueState) -> None:
        """Schedule a look at the queue's oldest dead job when its
        ``dead_retention_ms`` runs out (none without a retention). Called
        when that job may have changed, and after the retention changed
        (UpdateQueue: a longer one only makes the look early)."""
        retention = queue.config.dead_retention_ms
        if retention and queue.dead_order:
            heapq.heappush(self._dead_due, (queue.dead_order[0][0] + retention, queue.name))

    def remember_key(
        self, queue: QueueState, tenant: str, key: str, job_id: int, expires_at_ms: int
    ) -> None:
        """Record a producing tenant's idempotency key until ``expires_at_ms``
        (per tenant: in a shared queue, one tenant's key never answers for another's)."""
        queue.dedup[tenant, key] = (job_id, expires_at_ms)
        heapq.heappush(self._dedup, (expires_at_ms, queue.name, tenant, key))

    # ----------------------------------------------------------- transitions

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
        """delete_when_idle: drop a queue with no job, no live idempotency key
        (the keys must outlive their jobs, or a retried enqueue makes a twin)
        and no schedule."""
        if (
            queue.config.delete_when_idle
            and not queue.jobs
            and not queue.dedup
            and not queue.schedules
        ):
            self._drop_queue(queue)

    def _drop_queue(self, queue: QueueState) -> None:
        self._changed.update(queue.jobs)
        self._touched.add(queue.name)
        del self.queues[queue.name]

    def _set_state(self, queue: QueueState, job: Job, state: int) -> None:
        self._changed.add(job.job_id)
        self._touched.add(queue.name)
        if job.state == LEASED and state != LEASED:
            self._lease_slot_freed(queue)
        if job.state:
            queue.counts[job.state] -= 1
        queue.counts[state] += 1
        if state in WAITING and job.state not in WAITING:
            # Whatever brought it back (enqueue, retry, release, redrive,
            # requeue): its expiry is watched again. An entry is dropped
            # while the job is not waiting (next_due_ms, on the leader
            # only), so every replica must push one here alike.
            self._watch_expiry(queue, job)
        job.state = state

    def _lease_slot_freed(self, queue: QueueState) -> None:
        """A job is leaving LEASED (still counted there): at the queue's
        ``max_inflight``, its ready jobs become leasable again, so waiting
        leases are woken for one."""
        cap = queue.config.max_inflight if self.lifecycle else 0
        if cap and queue.counts[LEASED] == cap and queue.counts[READY]:
            self._woken[queue.name] += 1

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
        heapq.heappush(self._delayed, (ready_at, job.job_id, job.token, queue.name))
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
        error = (job.attempts, now, reason[: limits.MAX_REASON_CHARS])
        job.errors = (*job.errors, error)[-limits.MAX_ERROR_HISTORY :]
        self._end_lease(queue, job)
        if job.attempts >= queue.config.max_attempts:
            self._make_dead(queue, job, now, "attempts exhausted")
        elif self._expired(job, now):  # not retried past its expiry
            self._expire(queue, job, now)
        elif retry_at > now:
            self._make_delayed(queue, job, retry_at)
        else:
            self._make_ready(queue, job, now)

    def _watch_expiry(self, queue: QueueState, job: Job) -> None:
        """A job waiting (READY or DELAYED) dies at its ``expires_at_ms``
        unless it is leased first (see ``QueueMachine.advance``)."""
        if job.expires_at_ms:
            heapq.heappush(self._expiry, (job.expires_at_ms, job.job_id, queue.name))

    def _expired(self, job: Job, now: int) -> bool:
        """Whether a job that is (or is about to be) waiting is past its expiry."""
        return self.lifecycle and 0 < job.expires_at_ms <= now

    def _expire(self, queue: QueueState, job: Job, now: int) -> None:
        """A job not leased by its ``expires_at_ms`` is dead ("expired")."""
        queue.counters.ttl_expired += 1
        self._make_dead(queue, job, now, "expired")

    def _make_dead(self, queue: QueueState, job: Job, now: int, reason: str) -> None:
        """The job goes to the dead letters (its group's next job may go on)."""
        self._set_state(queue, job, DEAD)
        if self.lifecycle:
            job.finished_at_ms = now
            job.reason = reason
        self.note_end(queue, job)
        queue.counters.dead += 1
        if job.group:
            self._refresh_group(queue, job.group_key)

    def _keeps_records(self, queue: QueueState) -> bool:
        """Whether the queue keeps COMPLETED/CANCELLED records: with the
        lifecycle semantics, unless ``completed_max`` is 0 or the queue goes
        once idle (``delete_when_idle``: its records would keep it)."""
        config = queue.config
        return self.lifecycle and config.completed_max > 0 and not config.delete_when_idle

    def _finish(
        self,
        queue: QueueState,
        job: Job,
        state: int,
        now: int,
        result: bytes,
        reason: str,
        keeps: bool | None = None,
    ) -> None:
        """The job ends (acked, force-completed or cancelled): it leaves every
        index and, where the queue keeps records, stays as a record (the
        oldest records go past ``completed_max``); else it is forgotten.
        ``keeps``: ``_keeps_records(queue)`` where the caller has it (an
        ack of many jobs asks once)."""
        if state == COMPLETED:
            queue.counters.completed += 1
        else:
            queue.counters.cancelled += 1
        if job.state == LEASED:
            self._end_lease(queue, job)
        if not (self._keeps_records(queue) if keeps is None else keeps):
            self._remove(queue, job)
            return
        if job.state == DEAD:
            queue.dead_ids.discard(job.job_id)
        self._set_state(queue, job, state)
        queue.lanes[job.tenant].held -= 1  # a record holds no room in the queue
        job.finished_at_ms = now
        job.result = result
        job.reason = reason
        self.note_end(queue, job)
        if job.group and job.group_key in queue.groups:
            self._refresh_group(queue, job.group_key)
        self._trim_records(queue)

    def _trim_records(self, queue: QueueState) -> None:
        """Drop the oldest records past the queue's ``completed_max``."""
        excess = queue.counts[COMPLETED] + queue.counts[CANCELLED] - queue.config.completed_max
        while excess > 0 and queue.finished:
            finished_at, job_id = heapq.heappop(queue.finished)
            old = queue.jobs.get(job_id)
            if old is not None and old.state in FINISHED and old.finished_at_ms == finished_at:
                self._drop_record(queue, old)
                excess -= 1

    def _drop_record(self, queue: QueueState, job: Job) -> None:
        """Forget a COMPLETED or CANCELLED record (the last thing a queue
        made ``delete_when_idle`` by an update held: it may go now)."""
        self._changed.add(job.job_id)
        self._touched.add(queue.name)
        queue.counts[job.state] -= 1
        del queue.jobs[job.job_id]
        if queue.config.delete_when_idle and not queue.jobs:
            self._idle.add(queue.name)

    def watch_records(self, queue: QueueState) -> None:
        """The queue's completed_retention_ms changed: every record's entry
        at its new due time (older entries are looked at and pushed again
        when their time comes), as a replica restored now would have them."""
        retention = queue.config.completed_retention_ms
        for finished_at, job_id in queue.finished:
            job = queue.jobs.get(job_id)
            if job is not None and job.state in FINISHED and job.finished_at_ms == finished_at:
                due = _whole_second(finished_at + retention)
                heapq.heappush(self._retention, (due, job_id, queue.name))

    def prune_records(self, now: int) -> None:
        """Drop the records whose retention ran out by ``now`` (a record
        whose queue's retention grew since is looked at again then)."""
        heap = self._retention
        while heap and heap[0][0] <= now:
            entry = heapq.heappop(heap)
            job = self._record_of(entry)
            if job is None:
                continue
            _, job_id, name = entry
            queue = self.queues[name]
            due = _whole_second(job.finished_at_ms + queue.config.completed_retention_ms)
            if due > now:
                heapq.heappush(heap, (due, job_id, name))
                continue
            self._drop_record(queue, job)
            if queue.name in self._idle:
                self._idle.discard(queue.name)
                self._drop_if_idle(queue)
                continue
            # Records end in time order, so the queue's oldest go first:
            # drop their entries too (else they would wait for the cap).
            line = queue.finished
            while line:
                finished_at, first = line[0]
                kept = queue.jobs.get(first)
                if (
                    kept is not None
                    and kept.state in FINISHED
                    and kept.finished_at_ms == finished_at
                ):
                    break
                heapq.heappop(line)

    def _record_of(self, entry: tuple[int, int, str]) -> Job | None:
        """The record a retention entry names, if it is still a record."""
        _, job_id, name = entry
        queue = self.queues.get(name)
        job = None if queue is None else queue.jobs.get(job_id)
        return job if job is not None and job.state in FINISHED else None

    def next_prune_ms(self) -> int | None:
        """When the next record's retention runs out, if any record is kept."""
        heap = self._retention
        while heap:
            if self._record_of(heap[0]) is not None:
                return heap[0][0]
            heapq.heappop(heap)
        return None

    def _remove(self, queue: QueueState, job: Job) -> None:
        self._changed.add(job.job_id)
        self._touched.add(queue.name)
        if job.state == LEASED:
            self._lease_slot_freed(queue)
        queue.counts[job.state] -= 1
        del queue.jobs[job.job_id]
        queue.lanes[job.tenant].held -= 1
        queue.dead_ids.discard(job.job_id)
        if job.group and job.group_key in queue.groups:
            self._refresh_group(queue, job.group_key)
        if queue.config.delete_when_idle and not queue.jobs:
            self._idle.add(queue.name)

    def _prune_ended(
        self, queue: QueueState, heap: list[tuple[int, int]], states: tuple[int, ...], upto: int
    ) -> int | None:
        """Remove the jobs of an end-order heap (``dead_order``, ``finished``)
        that ended at or before ``upto`` and are still in one of ``states``,
        from its front, skipping stale entries; when the oldest entry left
        ended (None: none left)."""
        while heap:
            finished_at, job_id = heap[0]
            job = queue.jobs.get(job_id)
            if job is not None and job.state in states and job.finished_at_ms == finished_at:
                if finished_at > upto:
                    return finished_at
                self._remove(queue, job)
            heapq.heappop(heap)
        return None

    # ------------------------------------------------------------- lookups

    def _delayed_job(self, entry: tuple[int, int, int, str]) -> Job | None:
        """The job a delayed-heap entry names, if the entry is still current."""
        _, job_id, token, name = entry
        queue = self.queues.get(name)
        job = None if queue is None else queue.jobs.get(job_id)
        return job if job is not None and job.token == token and job.state == DELAYED else None

    def _leased_by(self, entry: tuple[int, int, int, str]) -> Job | None:
        """The job a lease-heap entry names, if that lease and expiry still hold."""
        expires, lease_id, job_id, name = entry
        queue = self.queues.get(name)
        job = None if queue is None else queue.jobs.get(job_id)
        if (
            job is None
            or job.state != LEASED
            or job.lease_id != lease_id
            or job.lease_expires_at_ms != expires
        ):
            return None
        return job

    def _expiring(self, entry: tuple[int, int, str]) -> Job | None:
        """The job an expiry-heap entry names, if it still waits to expire then."""
        expires, job_id, name = entry
        queue = self.queues.get(name)
        job = None if queue is None else queue.jobs.get(job_id)
        if job is None or job.state not in WAITING or job.expires_at_ms != expires:
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
        if config.HasField("min_priority") or config.HasField("max_priority"):
            self._check_priority(config, spec.priority, f"{field}.priority")

    def _check_specs(self, config: pb.QueueConfig, specs: Sequence[pb.JobSpec]) -> None:
        """``_check_spec`` for each of an enqueue's jobs (``jobs[i]``), with
        the common case, a job every bound admits, found without formatting
        a field name: a job that trips any bound here is checked by
        ``_check_spec``, which raises the error it earns."""
        largest = min(config.max_payload_bytes, limits.MAX_PAYLOAD_BYTES_LIMIT)
        bounded = config.HasField("min_priority") or config.HasField("max_priority")
        longest, longest_delay = limits.MAX_KEY_CHARS, limits.MAX_DURATION_MS
        for i, spec in enumerate(specs):
            if (
                bounded
                or len(spec.payload) > largest
                or not 0 <= spec.delay_ms <= longest_delay
                or spec.not_before_ms < 0
                or spec.expires_at_ms < 0
                or len(spec.idempotency_key) > longest
                or len(spec.group) > longest
            ):
                self._check_spec(config, spec, f"jobs[{i}]")

    def _check_priority(self, config: pb.QueueConfig, priority: int, field: str) -> None:
        """A priority within the queue's bounds."""
        if config.HasField("min_priority") and priority < config.min_priority:
            raise InvalidArgumentError(
                field, f"{priority} is below the queue's min_priority {config.min_priority}"
            )
        if config.HasField("max_priority") and priority > config.max_priority:
            raise InvalidArgumentError(
                field, f"{priority} is above the queue's max_priority {config.max_priority}"
            )

    def _result_bound(self, queue: QueueState) -> int:
        """The largest result the queue takes (``max_result_bytes``)."""
        return queue.config.max_result_bytes or limits.DEFAULT_MAX_RESULT_BYTES

    def _check_result(self, queue: QueueState, result: bytes, field: str) -> None:
        """A job's result fits the queue's ``max_result_bytes``."""
        bound = self._result_bound(queue)
        if len(result) > bound:
            raise InvalidArgumentError(
                field, f"{len(result)} bytes exceeds the queue's max_result_bytes {bound}"
            )

    def _dead_jobs(self, queue: QueueState, job_ids: Iterable[int]) -> list[Job]:
        """The queue's dead jobs, all of them or those listed, by id."""
        wanted = set(job_ids)
        ids = sorted(wanted & queue.dead_ids if wanted else queue.dead_ids)
        return [queue.jobs[i] for i in ids]


def _whole_second(ms: int) -> int:
    """``ms`` rounded up to a whole second."""
    return -(-ms // 1000) * 1000
