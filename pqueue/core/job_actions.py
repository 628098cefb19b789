"""Operator actions on one job: force-complete, cancel, requeue,
reprioritize. Each checks the job's state first and refuses, naming it,
with FAILED_PRECONDITION."""

from __future__ import annotations

from pqueue.core.commands import handles
from pqueue.core.transitions import Transitions
from pqueue.errors import FailedPreconditionError
from pqueue.v1 import queue_pb2 as pb


class JobActions(Transitions):
    """CompleteJob, CancelJob, RequeueJob, ReprioritizeJob."""

    # PENDING(issue 16): replaced in this issue.
    @handles("complete_job")
    def _complete_job(self, req: pb.CompleteJobRequest, now: int) -> pb.JobActionResponse:
        raise FailedPreconditionError("CompleteJob is not built yet")

    @handles("cancel_job")
    def _cancel_job(self, req: pb.CancelJobRequest, now: int) -> pb.JobActionResponse:
        raise FailedPreconditionError("CancelJob is not built yet")

    @handles("requeue_job")
    def _requeue_job(self, req: pb.RequeueJobRequest, now: int) -> pb.JobActionResponse:
        raise FailedPreconditionError("RequeueJob is not built yet")

    @handles("reprioritize_job")
    def _reprioritize_job(self, req: pb.ReprioritizeJobRequest, now: int) -> pb.JobActionResponse:
        raise FailedPreconditionError("ReprioritizeJob is not built yet")
