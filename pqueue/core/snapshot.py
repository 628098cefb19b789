"""Snapshot and restore of the queue state machine.

A snapshot lists queues by name, jobs by id and dedup keys by key, and is
serialized deterministically, so two machines in the same state give the same
bytes (``state_hash`` compares replicas). Restore rebuilds every index (ready,
delayed, lease and dedup heaps; groups; counts) from the job records.
"""

from __future__ import annotations

import hashlib

from pqueue.core import limits
from pqueue.core.features import check_snapshot
from pqueue.core.jobs import READY, Counters, Job, QueueState
from pqueue.core.machine import QueueMachine
from pqueue.v1 import log_pb2 as logpb
from pqueue.v1 import queue_pb2 as pb


def take_snapshot(machine: QueueMachine) -> logpb.Snapshot:
    """The machine's whole state at its applied index."""
    snap = logpb.Snapshot(
        index=machine.applied_index,
        time_ms=machine.time_ms,
        next_job_id=machine.next_job_id,
        next_lease_id=machine.next_lease_id,
        required_features=sorted(machine.features),
    )
    for name in sorted(machine.queues):
        queue = machine.queues[name]
        c = queue.counters
        qs = snap.queues.add(
            name=name,
            config=queue.config,
            counters=pb.QueueStats(
                enqueued_total=c.enqueued,
                leased_total=c.leased,
                acked_total=c.acked,
                nacked_total=c.nacked,
                expired_total=c.expired,
                dead_total=c.dead,
            ),
            vclock=queue.vclock,
        )
        for tenant in sorted(queue.lanes):
            # A lane at or behind the clock acts as if at it: only those ahead count.
            if queue.lanes[tenant].vtime > queue.vclock:
                qs.lanes.add(tenant=tenant, vtime=queue.lanes[tenant].vtime)
        for job_id in sorted(queue.jobs):
            job = queue.jobs[job_id]
            qs.jobs.add(
                job_id=job.job_id,
                priority=job.priority,
                payload=job.payload,
                state=job.state,
                attempts=job.attempts,
                group=job.group,
                idempotency_key=job.idempotency_key,
                enqueued_at_ms=job.enqueued_at_ms,
                ready_at_ms=job.ready_at_ms,
                lease_id=job.lease_id,
                leased_at_ms=job.leased_at_ms,
                lease_expires_at_ms=job.lease_expires_at_ms,
                consumer_id=job.consumer_id,
                errors=[pb.JobError(attempt=a, at_ms=t, reason=r) for a, t, r in job.errors],
                tenant=job.tenant,
            )
        for tenant, key in sorted(queue.dedup):
            job_id, expires = queue.dedup[tenant, key]
            qs.dedup.add(key=key, job_id=job_id, expires_at_ms=expires, tenant=tenant)
    return snap


def snapshot_bytes(machine: QueueMachine) -> bytes:
    """The snapshot, serialized deterministically."""
    return take_snapshot(machine).SerializeToString(deterministic=True)


def state_hash(machine: QueueMachine) -> str:
    """A digest of the whole state: equal states, equal hashes."""
    return hashlib.sha256(snapshot_bytes(machine)).hexdigest()


def restore(data: bytes) -> QueueMachine:
    """A machine in exactly the state the snapshot bytes describe."""
    snap = logpb.Snapshot.FromString(data)
    check_snapshot(snap)  # a newer release's snapshot: stop, never drop its fields
    machine = QueueMachine()
    machine.applied_index = snap.index
    machine.time_ms = snap.time_ms
    machine.next_job_id = snap.next_job_id
    machine.next_lease_id = snap.next_lease_id
    machine.features = set(snap.required_features)
    for qs in snap.queues:
        c = qs.counters
        queue = QueueState(
            name=qs.name,
            config=qs.config,
            counters=Counters(
                enqueued=c.enqueued_total,
                leased=c.leased_total,
                acked=c.acked_total,
                nacked=c.nacked_total,
                expired=c.expired_total,
                dead=c.dead_total,
            ),
            vclock=qs.vclock,
        )
        machine.queues[qs.name] = queue
        for lane in qs.lanes:
            queue.lane(lane.tenant).vtime = lane.vtime
        for rec in qs.jobs:
            machine.index_job(queue, _job(queue.name, rec))
        for key in sorted(queue.groups):
            group = queue.groups[key]
            head = queue.group_head(key)
            if not group.in_flight and head is not None and head.state == READY:
                queue.push_ready(head)
        owner = limits.tenant_of(qs.name)
        for d in qs.dedup:
            machine.remember_key(queue, d.tenant or owner, d.key, d.job_id, d.expires_at_ms)
    return machine


def _job(queue: str, rec: logpb.JobRecord) -> Job:
    return Job(
        job_id=rec.job_id,
        queue=queue,
        priority=rec.priority,
        payload=rec.payload,
        state=rec.state,
        group=rec.group,
        idempotency_key=rec.idempotency_key,
        enqueued_at_ms=rec.enqueued_at_ms,
        ready_at_ms=rec.ready_at_ms,
        attempts=rec.attempts,
        lease_id=rec.lease_id,
        leased_at_ms=rec.leased_at_ms,
        lease_expires_at_ms=rec.lease_expires_at_ms,
        consumer_id=rec.consumer_id,
        errors=[(e.attempt, e.at_ms, e.reason) for e in rec.errors],
        tenant=rec.tenant or limits.tenant_of(queue),  # older records: the owner
    )
