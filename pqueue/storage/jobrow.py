"""A row of the ``jobs`` table that stores with one keep for operators."""

from __future__ import annotations

from dataclasses import dataclass, fields

from pqueue.v1 import queue_pb2 as pb


@dataclass(frozen=True)
class JobRow:
    """One row of the operators' ``jobs`` table."""

    id: int
    queue: str
    priority: int
    payload: bytes
    state: str
    attempts: int
    group: str
    idempotency_key: str
    created_at_ms: int
    ready_at_ms: int
    lease_expires_at_ms: int | None
    last_error: str | None
    #: The tenant whose producer enqueued the job ("" with auth off).
    tenant: str = ""
    #: COMPLETED, CANCELLED: when it ended; DEAD: when it died (None: not
    #: ended, or died before this was recorded).
    finished_at_ms: int | None = None
    #: COMPLETED: the ack's result.
    result: bytes = b""
    #: An operator's note, or why the job is dead ("expired", ...).
    reason: str = ""
    #: When a waiting job expires unleased (None: never).
    expires_at_ms: int | None = None

    @staticmethod
    def of(job: pb.Job) -> JobRow:
        """The row for a job as the state machine shows it."""
        row = {name: getattr(job, name) for name in SAME_NAMED}
        return JobRow(
            id=job.job_id,
            state=pb.JobState.Name(job.state).removeprefix("JOB_STATE_").lower(),
            created_at_ms=job.enqueued_at_ms,
            lease_expires_at_ms=job.lease_expires_at_ms or None,
            last_error=job.errors[-1].reason if job.errors else None,
            finished_at_ms=job.finished_at_ms or None,
            expires_at_ms=job.expires_at_ms or None,
            **row,
        )


#: ``pb.Job`` fields a row shows under another name or shape.
RENAMED = {
    "job_id": "id",
    "state": "state",
    "enqueued_at_ms": "created_at_ms",
    "lease_expires_at_ms": "lease_expires_at_ms",
    "errors": "last_error",
    "finished_at_ms": "finished_at_ms",
    "expires_at_ms": "expires_at_ms",
}
#: ``pb.Job`` fields the operators' table does not show.
NOT_SHOWN = frozenset({"consumer_id"})
#: ``pb.Job`` fields copied to the row as they are. A ``pb.Job`` field in
#: none of these three stops the import: decide where it goes (and add a
#: column migration in ``postgres.py`` if it is shown).
SAME_NAMED = tuple(
    f.name for f in pb.Job.DESCRIPTOR.fields if f.name not in RENAMED and f.name not in NOT_SHOWN
)
_unplaced = set(SAME_NAMED) - {f.name for f in fields(JobRow)}
if _unplaced:
    raise TypeError(f"pb.Job fields {sorted(_unplaced)} have no JobRow field")
