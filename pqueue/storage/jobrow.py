"""A row of the ``jobs`` table that stores with one keep for operators."""

from __future__ import annotations

from dataclasses import dataclass

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

    @staticmethod
    def of(job: pb.Job) -> JobRow:
        """The row for a job as the state machine shows it."""
        state = pb.JobState.Name(job.state).removeprefix("JOB_STATE_").lower()
        return JobRow(
            id=job.job_id,
            queue=job.queue,
            priority=job.priority,
            payload=job.payload,
            state=state,
            attempts=job.attempts,
            group=job.group,
            idempotency_key=job.idempotency_key,
            created_at_ms=job.enqueued_at_ms,
            ready_at_ms=job.ready_at_ms,
            lease_expires_at_ms=job.lease_expires_at_ms or None,
            last_error=job.errors[-1].reason if job.errors else None,
            tenant=job.tenant,
        )
