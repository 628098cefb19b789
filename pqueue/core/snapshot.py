"""Snapshot and restore of the queue state machine.

A snapshot lists queues by name, jobs by id and dedup keys by key, and is
serialized deterministically, so two machines in the same state give the same
bytes (``state_hash`` compares replicas). Restore rebuilds every index (ready,
delayed, lease and dedup heaps; groups; counts) from the job records.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

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
        qs = snap.queues.add(
            name=name,
            config=queue.config,
            counters=pb.QueueStats(**queue.counters.to_stats()),
            vclock=queue.vclock,
        )
        for tenant in sorted(queue.lanes):
            # A lane at or behind the clock acts as if at it: only those ahead count.
            if queue.lanes[tenant].vtime > queue.vclock:
                qs.lanes.add(tenant=tenant, vtime=queue.lanes[tenant].vtime)
        for job_id in sorted(queue.jobs):
            qs.jobs.add(**queue.jobs[job_id].record_fields())
        for tenant, key in sorted(queue.dedup):
            job_id, expires = queue.dedup[tenant, key]
            qs.dedup.add(key=key, job_id=job_id, expires_at_ms=expires, tenant=tenant)
    return snap


#: Bytes per piece ``SnapshotView.chunks`` yields (about; the last is shorter).
CHUNK_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class SnapshotView:
    """The machine's state frozen at ``index``: serialized piece by piece by
    ``chunks`` while the machine goes on applying entries (the shell writes
    the pieces to disk between other work). The pieces joined are the
    deterministic snapshot bytes ``restore`` reads."""

    index: int
    _data: bytes

    def chunks(self) -> Iterator[bytes]:
        """The serialized snapshot, in pieces of about ``CHUNK_BYTES``."""
        for start in range(0, len(self._data), CHUNK_BYTES):
            yield self._data[start : start + CHUNK_BYTES]


def freeze(machine: QueueMachine) -> SnapshotView:
    """A view of the machine's state now, unaffected by entries applied later."""
    return SnapshotView(machine.applied_index, snapshot_bytes_eager(machine))


def snapshot_bytes_eager(machine: QueueMachine) -> bytes:
    return take_snapshot(machine).SerializeToString(deterministic=True)


def snapshot_bytes(machine: QueueMachine) -> bytes:
    """The snapshot, serialized deterministically."""
    return b"".join(freeze(machine).chunks())


def state_hash(machine: QueueMachine) -> str:
    """A digest of the whole state: equal states, equal hashes."""
    digest = hashlib.sha256()
    for chunk in freeze(machine).chunks():
        digest.update(chunk)
    return digest.hexdigest()


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
        queue = QueueState(
            name=qs.name,
            config=qs.config,
            counters=Counters.from_stats(qs.counters),
            vclock=qs.vclock,
        )
        machine.queues[qs.name] = queue
        for lane in qs.lanes:
            queue.lane(lane.tenant).vtime = lane.vtime
        owner = limits.tenant_of(qs.name)  # older records and keys: the owner's
        for rec in qs.jobs:
            machine.index_job(queue, Job.from_record(queue.name, rec, owner))
        for key in sorted(queue.groups):
            group = queue.groups[key]
            head = queue.group_head(key)
            if not group.in_flight and head is not None and head.state == READY:
                queue.push_ready(head)
        for d in qs.dedup:
            machine.remember_key(queue, d.tenant or owner, d.key, d.job_id, d.expires_at_ms)
    return machine
