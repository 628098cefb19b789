"""Every field of a snapshot's job record and queue counters survives restore.

The records are walked by their message descriptors, so a field added to
``JobRecord`` or ``QueueStats`` is covered without editing this test: if a
conversion drops it, restore loses it and these tests fail.
"""

from __future__ import annotations

from typing import Any

import pytest
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from pqueue.core import jobs
from pqueue.core.snapshot import restore, snapshot_bytes, take_snapshot
from pqueue.v1 import log_pb2 as logpb
from pqueue.v1 import queue_pb2 as pb

#: QueueStats fields a snapshot does not keep: restore derives them from jobs.
DERIVED_STATS = {
    "queue",
    "ready",
    "delayed",
    "leased",
    "dead",
    "completed",
    "cancelled",
    "paused",
    "oldest_ready_age_ms",
}


def _value(field: Any, seed: int) -> Any:
    """A non-default value for a scalar field, different per ``seed``."""
    if field.type == FieldDescriptor.TYPE_ENUM:
        values = [v.number for v in field.enum_type.values if v.number != 0]
        return values[seed % len(values)]
    if field.type == FieldDescriptor.TYPE_BOOL:
        return True
    if field.type == FieldDescriptor.TYPE_STRING:
        return f"{field.name}-{seed}"
    if field.type == FieldDescriptor.TYPE_BYTES:
        return f"{field.name}-{seed}".encode()
    if field.type in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        return 1.5 + seed
    return 1000 + 7 * seed + field.number


def _fill(message: Message, seed: int = 0) -> Message:
    """Set every field of ``message`` (recursively) to a non-default value."""
    for field in message.DESCRIPTOR.fields:
        seed += 1
        repeated = field.is_repeated
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            if repeated:
                for i in range(2):
                    _fill(getattr(message, field.name).add(), seed * 10 + i)
            else:
                _fill(getattr(message, field.name), seed)
        elif repeated:
            getattr(message, field.name).extend([_value(field, seed), _value(field, seed + 1)])
        else:
            setattr(message, field.name, _value(field, seed))
    return message


def _snapshot(queue: logpb.QueueSnapshot) -> bytes:
    snap = logpb.Snapshot(index=5, time_ms=1, next_job_id=1 << 20, next_lease_id=1 << 20)
    snap.queues.append(queue)
    return snap.SerializeToString(deterministic=True)


@pytest.mark.parametrize("state", [jobs.READY, jobs.DELAYED, jobs.LEASED, jobs.DEAD])
def test_every_job_record_field_survives_snapshot_and_restore(state: int) -> None:
    record = _fill(logpb.JobRecord())
    assert isinstance(record, logpb.JobRecord)
    record.state = state  # type: ignore[assignment]
    # The walk left no field at its default (unset fields are not listed).
    assert {f.name for f, _ in record.ListFields()} == set(record.DESCRIPTOR.fields_by_name)
    queue = logpb.QueueSnapshot(name="acme/q", config=pb.QueueConfig(max_attempts=3))
    queue.counters.SetInParent()  # snapshots always carry the counters
    queue.jobs.append(record)
    data = _snapshot(queue)

    again = take_snapshot(restore(data))

    assert again.queues[0].jobs[0] == record
    assert snapshot_bytes(restore(data)) == data


def test_every_queue_counter_survives_snapshot_and_restore() -> None:
    stats = pb.QueueStats()
    kept = [f for f in stats.DESCRIPTOR.fields if f.name not in DERIVED_STATS]
    assert kept, "QueueStats keeps no counters?"
    for seed, field in enumerate(kept):
        setattr(stats, field.name, _value(field, seed))
    data = _snapshot(logpb.QueueSnapshot(name="acme/q", config=pb.QueueConfig(), counters=stats))

    machine = restore(data)

    assert take_snapshot(machine).queues[0].counters == stats
    assert snapshot_bytes(machine) == data
    shown = machine.stats("acme/q", 1)[0]
    for field in kept:  # and the public stats show every one
        assert getattr(shown, field.name) == getattr(stats, field.name), field.name


def test_public_job_view_shows_every_field_the_job_holds() -> None:
    record = _fill(logpb.JobRecord())
    assert isinstance(record, logpb.JobRecord)
    record.state = jobs.LEASED
    job = jobs.Job.from_record("acme/q", record, "acme")
    view = job.to_proto()
    for field in view.DESCRIPTOR.fields:
        if field.name in record.DESCRIPTOR.fields_by_name:
            assert getattr(view, field.name) == getattr(record, field.name), field.name
    assert view.queue == "acme/q"
