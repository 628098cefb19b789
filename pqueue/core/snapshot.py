"""Snapshot and restore of the queue state machine.

A snapshot lists queues by name, jobs by id and dedup keys by key, and is
serialized deterministically, so two machines in the same state give the same
bytes (``state_hash`` compares replicas). Jobs that the compact form can hold
(``Job.packable``) are written as rows in ``PackedJobs`` blocks after every
queue, whichever form a replica holds them in; the rest as ``JobRecord``s in
their queue. Restore rebuilds every index (ready heaps and FIFOs, delayed,
lease and dedup heaps; groups; counts) from them.

``freeze`` is cheap and happens on the node's loop: it copies out the
fields of the jobs held as mutable ``Job`` objects (a tuple of values each,
taken in C; the records a queue keeps are thousands of them) and of each
queue, and opens a copy-on-write view of each queue's compact rows
(``JobTable.freeze``: a row that leaves the table is kept for the view).
``SnapshotView.chunks`` then serializes piece by piece, the head of queues
and records first, so the machine goes on applying entries while a
snapshot of a million jobs is written.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from pqueue.core import limits
from pqueue.core.features import LIFECYCLE, check_snapshot
from pqueue.core.jobs import (
    READY,
    RECORD_FIELDS,
    RECORD_HEAD,
    Counters,
    FrozenJobs,
    Job,
    QueueState,
    record_values,
    unpack_row,
)
from pqueue.core.machine import QueueMachine
from pqueue.v1 import log_pb2 as logpb
from pqueue.v1 import queue_pb2 as pb

#: Bytes per piece ``SnapshotView.chunks`` yields (about; the last is shorter):
#: the shell makes each on its event loop, so a piece is also how long other
#: work waits (about a millisecond here).
CHUNK_BYTES = 64 << 10
#: Jobs per ``PackedJobs`` block (blocks never span queues), and the rows'
#: bytes after which a block ends sooner (big payloads): a block is what a
#: restore holds twice at a time, and what a piece of ``chunks`` waits for.
PACKED_BLOCK_JOBS = 4096
PACKED_BLOCK_BYTES = 64 << 10


@dataclass(frozen=True, slots=True)
class _FrozenQueue:
    name: str
    jobs: FrozenJobs


@dataclass(frozen=True, slots=True)
class _QueueHead:
    """One queue's fields but its compact rows, as values copied at the
    freeze (messages copied, jobs as ``record_values`` tuples): what
    ``_serialize_head`` serializes later, whatever the machine does meanwhile."""

    name: str
    config: pb.QueueConfig
    counters: dict[str, Any]
    vclock: int
    paused: bool
    dispatch_tokens: int
    dispatch_at_ms: int
    schedules: list[pb.Schedule]
    lanes: list[tuple[str, int]]
    #: (record fields, errors) of the jobs not packable, in no order.
    jobs: list[tuple[tuple[Any, ...], tuple[tuple[int, int, str], ...]]]
    dedup: list[tuple[tuple[str, str], tuple[int, int]]]


@dataclass(frozen=True, slots=True)
class _Head:
    """The machine's fields but the compact rows, copied at the freeze."""

    index: int
    time_ms: int
    next_job_id: int
    next_lease_id: int
    features: frozenset[str]
    queues: tuple[_QueueHead, ...]


@dataclass(frozen=True, slots=True)
class SnapshotView:
    """The machine's state frozen at ``index``: serialized piece by piece by
    ``chunks`` while the machine goes on applying entries (the shell writes
    the pieces to disk between other work). The pieces joined are the
    deterministic snapshot bytes ``restore`` reads."""

    index: int
    #: Everything but the compact rows (``Snapshot`` fields 1-6), as copied.
    _head: _Head
    _queues: tuple[_FrozenQueue, ...]

    def head_bytes(self) -> bytes:
        """The snapshot's first piece: everything but the compact rows,
        serialized. Made of values copied at the freeze, so any thread may
        make it while the machine goes on (the shell's snapshot thread does:
        with thousands of records kept, it is most of a small state's work)."""
        return _serialize_head(self._head)

    def chunks(self, head: bytes | None = None) -> Iterator[bytes]:
        """The serialized snapshot, in pieces of about ``CHUNK_BYTES``
        (``head``: ``head_bytes()`` if already made); the view is closed
        when they end or the reader stops (``close``)."""
        try:
            if head is None:
                head = self.head_bytes()
            out = [head]
            size = len(head)
            for queue in self._queues:
                for block in _blocks(queue):
                    out.append(block)
                    size += len(block)
                    if size >= CHUNK_BYTES:
                        yield b"".join(out)
                        out, size = [], 0
            if out:
                yield b"".join(out)
        finally:
            self.close()

    def close(self) -> None:
        """Let go of every queue's rows: a reader that stops early (a
        cancelled digest or snapshot) must not leave rows kept for nobody."""
        for queue in self._queues:
            queue.jobs.close()


def _blocks(queue: _FrozenQueue) -> Iterator[bytes]:
    """``Snapshot.packed`` fields (tag, length, ``PackedJobs``) of one queue."""
    pack = RECORD_HEAD.pack
    records: list[bytes] = []
    size = 0
    for job_id, row in queue.jobs.rows():
        records += (pack(job_id, len(row)), row)
        size += len(row)
        if len(records) == 2 * PACKED_BLOCK_JOBS or size >= PACKED_BLOCK_BYTES:
            yield _block(queue.name, records)
            records, size = [], 0
    if records:
        yield _block(queue.name, records)


def _block(name: str, records: list[bytes]) -> bytes:
    """One ``Snapshot.packed`` field, tag and length included: a message with
    only that element serializes to exactly those bytes."""
    block = logpb.PackedJobs(queue=name, records=b"".join(records))
    return logpb.Snapshot(packed=[block]).SerializeToString()


def freeze(machine: QueueMachine) -> SnapshotView:
    """A view of the machine's state now, unaffected by entries applied later.
    Costs O(jobs held as objects + queues + idempotency keys) on the loop,
    not O(jobs): the compact rows are read later, copy-on-write
    (``JobTable.freeze``)."""
    head = _copy_head(machine)
    frozen = tuple(
        _FrozenQueue(name, machine.queues[name].jobs.freeze()) for name in sorted(machine.queues)
    )
    return SnapshotView(machine.applied_index, head, frozen)


def _copy_head(machine: QueueMachine) -> _Head:
    """Every field but the compact rows, copied out of the machine as it is
    now: plain values, copies of the messages it changes in place
    (schedules), and a ``record_values`` tuple per job not packable. No message is
    built per job here: this runs on the node's loop."""
    queues = []
    for name in sorted(machine.queues):
        queue = machine.queues[name]
        lanes = [(tenant, lane.vtime) for tenant, lane in queue.lanes.items()]
        full = queue.jobs.full_values()
        queues.append(
            _QueueHead(
                name=name,
                config=queue.config,  # replaced, never changed in place
                counters=queue.counters.to_stats(),
                vclock=queue.vclock,
                paused=queue.paused,
                dispatch_tokens=queue.dispatch_tokens,
                dispatch_at_ms=queue.dispatch_at_ms,
                schedules=[_copy_schedule(queue.schedules[n]) for n in sorted(queue.schedules)],
                lanes=lanes,
                jobs=[(record_values(j), j.errors) for j in full if not j.packable()],
                dedup=list(queue.dedup.items()),
            )
        )
    return _Head(
        index=machine.applied_index,
        time_ms=machine.time_ms,
        next_job_id=machine.next_job_id,
        next_lease_id=machine.next_lease_id,
        features=machine.features,
        queues=tuple(queues),
    )


def _serialize_head(head: _Head) -> bytes:
    """``Snapshot`` fields 1-6 of a copied head: the queues with their
    configs, counters, lanes, dedup keys and the jobs not packable, as
    records by id (deterministic, as every other part)."""
    snap = logpb.Snapshot(
        index=head.index,
        time_ms=head.time_ms,
        next_job_id=head.next_job_id,
        next_lease_id=head.next_lease_id,
        required_features=sorted(head.features),
    )
    for queue in head.queues:
        qs = snap.queues.add(
            name=queue.name,
            config=queue.config,
            counters=pb.QueueStats(**queue.counters),
            vclock=queue.vclock,
            paused=queue.paused,
            dispatch_tokens=queue.dispatch_tokens,
            dispatch_at_ms=queue.dispatch_at_ms,
            schedules=queue.schedules,
        )
        for tenant, vtime in sorted(queue.lanes):
            # A lane at or behind the clock acts as if at it: only those ahead count.
            if vtime > queue.vclock:
                qs.lanes.add(tenant=tenant, vtime=vtime)
        add_job = qs.jobs.add
        for fields, errors in sorted(queue.jobs, key=_by_record_id):
            add_job(
                errors=[pb.JobError(attempt=a, at_ms=t, reason=r) for a, t, r in errors],
                **dict(zip(RECORD_FIELDS, fields, strict=True)),
            )
        for (tenant, key), (job_id, expires) in sorted(queue.dedup):
            qs.dedup.add(key=key, job_id=job_id, expires_at_ms=expires, tenant=tenant)
    return snap.SerializeToString(deterministic=True)


_JOB_ID_AT = RECORD_FIELDS.index("job_id")


def _by_record_id(job: tuple[tuple[Any, ...], object]) -> int:
    return int(job[0][_JOB_ID_AT])


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
    return restore_chunks([data])


def restore_chunks(chunks: Iterable[bytes]) -> QueueMachine:
    """``restore`` from the snapshot's bytes in pieces (as read from a file):
    each top-level field is parsed on its own, so no more than one queue's
    records or one block of rows is held twice at a time."""
    machine = QueueMachine()
    queues: dict[str, _Restoring] = {}
    head = logpb.Snapshot()
    for number, piece in _fields(chunks):
        part = logpb.Snapshot.FromString(piece)
        check_snapshot(part)  # a newer release's snapshot: stop, never drop its fields
        if number == _QUEUES:
            qs = part.queues[0]
            queues[qs.name] = _Restoring(machine, qs)
        elif number == _PACKED:
            block = part.packed[0]
            restoring = queues.get(block.queue)
            if restoring is None:
                raise ValueError(f"snapshot rows for unknown queue {block.queue!r}")
            restoring.rows(block.records)
        else:
            head.MergeFrom(part)
    machine.applied_index = head.index
    machine.time_ms = head.time_ms
    machine.next_job_id = head.next_job_id
    machine.next_lease_id = head.next_lease_id
    machine.features = frozenset(head.required_features)
    machine.lifecycle = LIFECYCLE in machine.features
    for restoring in queues.values():
        restoring.finish()
    return machine


def _copy_schedule(schedule: pb.Schedule) -> pb.Schedule:
    """A schedule of its own: one held from the parsed queue record would
    keep that whole record (every job in it) alive as long as it lives, and
    a frozen head must not see the ticks applied after it (a tick changes
    its schedule in place)."""
    copy = pb.Schedule()
    copy.CopyFrom(schedule)
    return copy


#: Field numbers of ``Snapshot.queues`` and ``Snapshot.packed``.
_QUEUES = logpb.Snapshot.QUEUES_FIELD_NUMBER
_PACKED = logpb.Snapshot.PACKED_FIELD_NUMBER


class _Restoring:
    """One queue being restored: its records (from its ``QueueSnapshot``)
    merged by id with its rows (from the blocks that follow), so its table
    is in id order, as ``_blocks`` relies on."""

    def __init__(self, machine: QueueMachine, qs: logpb.QueueSnapshot) -> None:
        self.machine = machine
        self.qs = qs
        self.owner = limits.tenant_of(qs.name)  # older records and keys: the owner's
        self.queue = queue = QueueState(
            name=qs.name,
            config=qs.config,
            counters=Counters.from_stats(qs.counters),
            vclock=qs.vclock,
            paused=qs.paused,
            dispatch_tokens=qs.dispatch_tokens,
            dispatch_at_ms=qs.dispatch_at_ms,
            schedules={s.name: _copy_schedule(s) for s in qs.schedules},
        )
        machine.queues[qs.name] = queue
        for lane_record in qs.lanes:
            queue.lane(lane_record.tenant).vtime = lane_record.vtime
        self.records = iter(qs.jobs)
        self.next = next(self.records, None)

    def _records_before(self, job_id: int | None) -> None:
        """Index the records whose ids come before ``job_id`` (None: all)."""
        rec = self.next
        while rec is not None and (job_id is None or rec.job_id < job_id):
            self.machine.index_job(self.queue, Job.from_record(self.queue.name, rec, self.owner))
            rec = next(self.records, None)
        self.next = rec

    def rows(self, records: bytes) -> None:
        """Adopt a block of compact rows (ordered by id)."""
        queue = self.queue
        for job_id, row in _rows(records):
            self._records_before(job_id)
            lane = queue.add_compact(job_id, row)
            if lane is None:  # its FIFO cannot take it: a Job in the heap, as any
                job = unpack_row(job_id, queue.name, row)
                self.machine.index_job(queue, job, compact=False)
            else:
                queue.counts[READY] += 1
                lane.held += 1

    def finish(self) -> None:
        """The rest of the records, then groups and idempotency keys."""
        self._records_before(None)
        queue = self.queue
        for key in sorted(queue.groups):
            group = queue.groups[key]
            head = queue.group_head(key)
            if not group.in_flight and head is not None and head.state == READY:
                queue.push_ready(head)
        for d in self.qs.dedup:
            self.machine.remember_key(
                queue, d.tenant or self.owner, d.key, d.job_id, d.expires_at_ms
            )
        del self.qs  # its records are indexed: let them go


def _fields(chunks: Iterable[bytes]) -> Iterator[tuple[int, bytes]]:
    """(field number, the field's bytes with its tag) of a serialized
    message arriving in pieces; every field is length-delimited or a varint."""
    buffer = bytearray()
    pos = 0
    source = iter(chunks)
    exhausted = False

    def need(size: int) -> bool:
        nonlocal buffer, pos, exhausted
        while len(buffer) - pos < size and not exhausted:
            chunk = next(source, None)
            if chunk is None:
                exhausted = True
            else:
                buffer += chunk
        return len(buffer) - pos >= size

    def varint() -> int:
        nonlocal pos
        value = shift = 0
        while True:
            if not need(1):
                raise ValueError("snapshot ends inside a varint")
            byte = buffer[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                return value
            shift += 7
            if shift > 63:
                raise ValueError("snapshot holds a varint over 64 bits")

    while True:
        del buffer[:pos]  # the fields before are handed out: drop their bytes
        pos = start = 0
        if not need(1):
            return
        tag = varint()
        number, wire = tag >> 3, tag & 7
        if wire == 2:
            length = varint()
            if not need(length):
                raise ValueError("snapshot ends inside a field")
            pos += length
        elif wire == 0:
            varint()
        else:
            raise ValueError(f"snapshot field {number} has wire type {wire}")
        yield number, bytes(buffer[start:pos])


def _rows(records: bytes) -> Iterator[tuple[int, bytes]]:
    """(job id, compact row) of a ``PackedJobs.records`` block, in order."""
    unpack = RECORD_HEAD.unpack_from
    head = RECORD_HEAD.size
    offset, end = 0, len(records)
    while offset < end:
        job_id, length = unpack(records, offset)
        start = offset + head
        offset = start + length
        if offset > end:
            raise ValueError("a snapshot row runs past its block")
        yield job_id, records[start:offset]
