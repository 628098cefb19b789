"""Operator actions on one job: force-complete, cancel, requeue,
reprioritize. Each checks the job's state first and refuses, naming it,
with FAILED_PRECONDITION; like every command, it checks everything before
changing anything."""

from __future__ import annotations

from pqueue.core import limits
from pqueue.core.commands import handles
from pqueue.core.jobs import (
    CANCELLED,
    COMPLETED,
    DEAD,
    DELAYED,
    FINISHED,
    LEASED,
    READY,
    Job,
    QueueState,
)
from pqueue.core.transitions import Transitions
from pqueue.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError
from pqueue.v1 import queue_pb2 as pb

_NAMES: dict[int, str] = {
    int(state): pb.JobState.Name(state).removeprefix("JOB_STATE_") for state in pb.JobState.values()
}


class JobActions(Transitions):
    """CompleteJob, CancelJob, RequeueJob, ReprioritizeJob."""

    @handles("complete_job")
    def _complete_job(self, req: pb.CompleteJobRequest, now: int) -> pb.JobActionResponse:
        queue = self._queue(req.queue)
        limits.check_text(req.note, "note", limits.MAX_REASON_CHARS)
        self._check_result(queue, req.result, "result")
        job = self._job_in(queue, req.job_id, "completed", (READY, DELAYED, LEASED, DEAD))
        self._finish(queue, job, COMPLETED, now, req.result, req.note or "force-completed")
        return pb.JobActionResponse(job=job.to_proto())

    @handles("cancel_job")
    def _cancel_job(self, req: pb.CancelJobRequest, now: int) -> pb.JobActionResponse:
        queue = self._queue(req.queue)
        limits.check_text(req.note, "note", limits.MAX_REASON_CHARS)
        job = self._job_in(queue, req.job_id, "cancelled", (READY, DELAYED, LEASED))
        self._finish(queue, job, CANCELLED, now, b"", req.note or "cancelled")
        return pb.JobActionResponse(job=job.to_proto())

    @handles("requeue_job")
    def _requeue_job(self, req: pb.RequeueJobRequest, now: int) -> pb.JobActionResponse:
        queue = self._queue(req.queue)
        limits.check_duration(req.delay_ms, "delay_ms")
        job = self._job_in(queue, req.job_id, "requeued", (DEAD, *FINISHED))
        if job.state == DEAD:
            queue.dead_ids.discard(job.job_id)
        else:  # a record comes back into the queue's room
            queue.lanes[job.tenant].held += 1
        job.attempts = 0
        job.finished_at_ms = 0
        job.result = b""
        job.reason = ""
        job.lease_id = 0  # never matched again: ``_leased_job`` checks the state first
        if job.expires_at_ms <= now:
            job.expires_at_ms = 0  # an expired job requeued is run after all, as redrive does
        if req.delay_ms:
            self._make_delayed(queue, job, now + req.delay_ms)
        else:
            self._make_ready(queue, job, now)
        return pb.JobActionResponse(job=job.to_proto())

    @handles("reprioritize_job")
    def _reprioritize_job(self, req: pb.ReprioritizeJobRequest, now: int) -> pb.JobActionResponse:
        queue = self._queue(req.queue)
        if not (req.HasField("priority") or req.HasField("ready_at_ms")):
            raise InvalidArgumentError("priority", "set priority, ready_at_ms or both")
        if req.HasField("priority"):
            self._check_priority(queue.config, req.priority, "priority")
        if req.HasField("ready_at_ms") and req.ready_at_ms < 0:
            raise InvalidArgumentError("ready_at_ms", "must not be negative")
        job = self._job_in(queue, req.job_id, "reprioritized", (READY, DELAYED))
        if req.HasField("priority"):
            job.priority = req.priority
        ready_at = req.ready_at_ms if req.HasField("ready_at_ms") else job.ready_at_ms
        # Re-entering its state re-indexes it (older heap entries go stale).
        if ready_at > now:
            self._make_delayed(queue, job, ready_at)
        else:
            self._make_ready(queue, job, ready_at)
        return pb.JobActionResponse(job=job.to_proto())

    def _job_in(self, queue: QueueState, job_id: int, action: str, allowed: tuple[int, ...]) -> Job:
        """The job, if its state allows the action; FAILED_PRECONDITION naming
        its state otherwise. Every action changes it: a job in the compact
        form becomes a ``Job`` (only once the action is allowed)."""
        job = queue.jobs.get(job_id)
        if job is None:
            raise NotFoundError(f"job {job_id} not found in queue {queue.name!r}")
        if job.state not in allowed:
            may = ", ".join(_NAMES[s] for s in allowed[:-1]) + f" or {_NAMES[allowed[-1]]}"
            raise FailedPreconditionError(
                f"job {job_id} is {_NAMES[job.state]}: only a {may} job can be {action}"
            )
        return queue.jobs.promote(job_id)
