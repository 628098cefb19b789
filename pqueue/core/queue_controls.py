"""Queue controls of the queue machine: update a queue's config, pause and
resume its leases."""

from __future__ import annotations

from pqueue.core.commands import handles
from pqueue.core.transitions import Transitions
from pqueue.errors import FailedPreconditionError
from pqueue.v1 import queue_pb2 as pb


class QueueControls(Transitions):
    """UpdateQueue, PauseQueue, ResumeQueue."""

    # PENDING(issue 16): the queue-controls helper replaces these.
    @handles("update_queue")
    def _update_queue(self, req: pb.UpdateQueueRequest, now: int) -> pb.UpdateQueueResponse:
        raise FailedPreconditionError("UpdateQueue is not built yet")

    @handles("pause_queue")
    def _pause_queue(self, req: pb.PauseQueueRequest, now: int) -> pb.PauseQueueResponse:
        raise FailedPreconditionError("PauseQueue is not built yet")

    @handles("resume_queue")
    def _resume_queue(self, req: pb.ResumeQueueRequest, now: int) -> pb.ResumeQueueResponse:
        raise FailedPreconditionError("ResumeQueue is not built yet")
