"""The operators' row of a job shows every public field it is meant to."""

from __future__ import annotations

from pqueue.storage.jobrow import NOT_SHOWN, RENAMED, SAME_NAMED, JobRow
from pqueue.v1 import queue_pb2 as pb


def _job() -> pb.Job:
    return pb.Job(
        job_id=7,
        queue="acme/q",
        priority=3,
        payload=b"p",
        state=pb.JOB_STATE_LEASED,
        attempts=2,
        group="g",
        idempotency_key="k",
        enqueued_at_ms=11,
        ready_at_ms=12,
        lease_expires_at_ms=13,
        consumer_id="c",
        errors=[pb.JobError(attempt=1, at_ms=5, reason="first"), pb.JobError(reason="last")],
        tenant="beta",
        finished_at_ms=14,
        result=b"r",
        reason="why",
        expires_at_ms=15,
    )


def test_every_public_job_field_is_placed_in_the_row() -> None:
    job = _job()
    names = set(job.DESCRIPTOR.fields_by_name)
    assert {f.name for f, _ in job.ListFields()} == names  # the example sets them all
    assert names == set(SAME_NAMED) | set(RENAMED) | NOT_SHOWN
    row = JobRow.of(job)
    for name in SAME_NAMED:
        assert getattr(row, name) == getattr(job, name), name
    assert (row.id, row.state, row.created_at_ms) == (7, "leased", 11)
    assert (row.lease_expires_at_ms, row.last_error) == (13, "last")
    assert (row.finished_at_ms, row.expires_at_ms) == (14, 15)


def test_absent_lease_errors_and_times_are_null() -> None:
    job = _job()
    job.lease_expires_at_ms = 0
    del job.errors[:]
    job.finished_at_ms = job.expires_at_ms = 0
    row = JobRow.of(job)
    assert row.lease_expires_at_ms is None
    assert row.last_error is None
    assert (row.finished_at_ms, row.expires_at_ms) == (None, None)


def test_ended_states_are_named_as_operators_query_them() -> None:
    job = _job()
    for state, name in (
        (pb.JOB_STATE_COMPLETED, "completed"),
        (pb.JOB_STATE_CANCELLED, "cancelled"),
        (pb.JOB_STATE_DEAD, "dead"),
    ):
        job.state = state
        assert JobRow.of(job).state == name
