"""Snapshot and restore of the queue state machine.

A snapshot lists queues by name, jobs by id and dedup keys by key, and is
serialized deterministically, so two machines in the same state give the same
bytes (``state_hash`` compares replicas). Jobs that the compact form can hold
(``Job.packable``) are written as rows in ``PackedJobs`` blocks after every
queue, whichever form a replica holds them in; the rest as ``JobRecord``s in
their queue. Restore rebuilds every index (ready heaps and FIFOs, delayed,
lease and dedup heaps; groups; counts) from them.

``freeze`` is cheap and happens on the node's loop: it copies each queue's
table of jobs (rows are immutable bytes, shared) and encodes the few jobs
held as mutable ``Job`` objects. ``SnapshotView.chunks`` then serializes the
copy piece by piece, so the machine goes on applying entries while a
snapshot of a million jobs is written.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

from pqueue.core import limits
from pqueue.core.features import check_snapshot
from pqueue.core.jobs import READY, RECORD_HEAD, Counters, Job, QueueState, unpack_row
from pqueue.core.machine import QueueMachine
from pqueue.v1 import log_pb2 as logpb
from pqueue.v1 import queue_pb2 as pb

#: Bytes per piece ``SnapshotView.chunks`` yields (about; the last is shorter).
CHUNK_BYTES = 1 << 20
#: Jobs per ``PackedJobs`` block (blocks never span queues).
PACKED_BLOCK_JOBS = 4096
#: The tag of ``Snapshot.packed`` (field 7, length-delimited).
_PACKED_TAG = bytes([7 << 3 | 2])


@dataclass(frozen=True, slots=True)
class _FrozenQueue:
    name: str
    #: Job id -> compact row, or the encoded JobRecord of a job not packable.
    rows: dict[int, Job | bytes]
    #: Encoded rows of packable jobs held as ``Job`` objects, by id.
    packed_jobs: dict[int, bytes]


@dataclass(frozen=True, slots=True)
class SnapshotView:
    """The machine's state frozen at ``index``: serialized piece by piece by
    ``chunks`` while the machine goes on applying entries (the shell writes
    the pieces to disk between other work). The pieces joined are the
    deterministic snapshot bytes ``restore`` reads."""

    index: int
    #: Everything but the compact rows, serialized (``Snapshot`` fields 1-6).
    _head: bytes
    _queues: tuple[_FrozenQueue, ...]

    def chunks(self) -> Iterator[bytes]:
        """The serialized snapshot, in pieces of about ``CHUNK_BYTES``."""
        out = [self._head]
        size = len(self._head)
        for queue in self._queues:
            for block in _blocks(queue):
                out.append(block)
                size += len(block)
                if size >= CHUNK_BYTES:
                    yield b"".join(out)
                    out, size = [], 0
        if out:
            yield b"".join(out)


def _blocks(queue: _FrozenQueue) -> Iterator[bytes]:
    """``Snapshot.packed`` fields (tag, length, ``PackedJobs``) of one queue."""
    pack = RECORD_HEAD.pack
    records: list[bytes] = []
    for job_id, value in queue.rows.items():
        row = value if type(value) is bytes else queue.packed_jobs.get(job_id)
        if row is None:
            continue
        records += (pack(job_id, len(row)), row)
        if len(records) == 2 * PACKED_BLOCK_JOBS:
            yield _block(queue.name, records)
            records = []
    if records:
        yield _block(queue.name, records)


def _block(name: str, records: list[bytes]) -> bytes:
    message = logpb.PackedJobs(queue=name, records=b"".join(records)).SerializeToString()
    return _PACKED_TAG + _varint(len(message)) + message


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def freeze(machine: QueueMachine) -> SnapshotView:
    """A view of the machine's state now, unaffected by entries applied later:
    O(jobs) dict copying (shared rows) plus encoding the ``Job`` objects."""
    head = _head(machine)
    frozen = []
    for name in sorted(machine.queues):
        queue = machine.queues[name]
        rows = queue.jobs.copy_rows()
        packed: dict[int, bytes] = {}
        for job in queue.jobs.full_values():
            if job.packable():
                packed[job.job_id] = job.row()
        frozen.append(_FrozenQueue(name, rows, packed))
    return SnapshotView(machine.applied_index, head, tuple(frozen))


def _head(machine: QueueMachine) -> bytes:
    """Every field but the compact rows: the queues with their configs,
    counters, lanes, dedup keys and the jobs not packable, as records."""
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
        for job in sorted(queue.jobs.full_values(), key=_by_id):
            if not job.packable():
                qs.jobs.add(**job.record_fields())
        for tenant, key in sorted(queue.dedup):
            job_id, expires = queue.dedup[tenant, key]
            qs.dedup.add(key=key, job_id=job_id, expires_at_ms=expires, tenant=tenant)
    return snap.SerializeToString(deterministic=True)


def _by_id(job: Job) -> int:
    return job.job_id


def take_snapshot(machine: QueueMachine) -> logpb.Snapshot:
    """The machine's whole state at its applied index, as a message."""
    return logpb.Snapshot.FromString(snapshot_bytes(machine))


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
    blocks: dict[str, list[bytes]] = {}
    for block in snap.packed:
        blocks.setdefault(block.queue, []).append(block.records)
    for qs in snap.queues:
        queue = QueueState(
            name=qs.name,
            config=qs.config,
            counters=Counters.from_stats(qs.counters),
            vclock=qs.vclock,
        )
        machine.queues[qs.name] = queue
        for lane_record in qs.lanes:
            queue.lane(lane_record.tenant).vtime = lane_record.vtime
        owner = limits.tenant_of(qs.name)  # older records and keys: the owner's
        # Records and rows merged by id: a table is always in id order (new
        # ids are appended), which ``_blocks`` relies on.
        records = iter(qs.jobs)
        rec = next(records, None)
        for job_id, row in _rows(blocks.pop(qs.name, [])):
            while rec is not None and rec.job_id < job_id:
                machine.index_job(queue, Job.from_record(queue.name, rec, owner))
                rec = next(records, None)
            lane = queue.add_compact(job_id, row)
            if lane is None:  # its FIFO cannot take it: a Job in the heap, as any
                machine.index_job(queue, unpack_row(job_id, queue.name, row), compact=False)
            else:
                queue.counts[READY] += 1
                lane.held += 1
        while rec is not None:
            machine.index_job(queue, Job.from_record(queue.name, rec, owner))
            rec = next(records, None)
        for key in sorted(queue.groups):
            group = queue.groups[key]
            head = queue.group_head(key)
            if not group.in_flight and head is not None and head.state == READY:
                queue.push_ready(head)
        for d in qs.dedup:
            machine.remember_key(queue, d.tenant or owner, d.key, d.job_id, d.expires_at_ms)
    if blocks:
        raise ValueError(f"snapshot rows for unknown queues {sorted(blocks)}")
    return machine


def _rows(blocks: list[bytes]) -> Iterator[tuple[int, bytes]]:
    """(job id, compact row) of ``PackedJobs.records`` blocks, in order."""
    unpack = RECORD_HEAD.unpack_from
    head = RECORD_HEAD.size
    for records in blocks:
        offset, end = 0, len(records)
        while offset < end:
            job_id, length = unpack(records, offset)
            start = offset + head
            offset = start + length
            yield job_id, records[start:offset]
