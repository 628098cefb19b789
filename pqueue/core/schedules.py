"""Cron schedules in the queue machine: put, delete, pause, and the tick
that enqueues a schedule's job. The machine never reads cron expressions:
the leader computes when ticks fall due (``pqueue.node.scheduler``) and
proposes each as a ``ScheduleTick``; applying one is idempotent."""

from __future__ import annotations

from pqueue.core.commands import handles
from pqueue.core.transitions import Transitions
from pqueue.errors import FailedPreconditionError
from pqueue.v1 import log_pb2 as logpb
from pqueue.v1 import queue_pb2 as pb


class ScheduleCommands(Transitions):
    """PutSchedule, DeleteSchedule, PauseSchedule and ScheduleTick."""

    # PENDING(issue 16): the schedules helper replaces these.
    @handles("put_schedule")
    def _put_schedule(self, req: pb.PutScheduleRequest, now: int) -> pb.PutScheduleResponse:
        raise FailedPreconditionError("PutSchedule is not built yet")

    @handles("delete_schedule")
    def _delete_schedule(
        self, req: pb.DeleteScheduleRequest, now: int
    ) -> pb.DeleteScheduleResponse:
        raise FailedPreconditionError("DeleteSchedule is not built yet")

    @handles("pause_schedule")
    def _pause_schedule(self, req: pb.PauseScheduleRequest, now: int) -> pb.PauseScheduleResponse:
        raise FailedPreconditionError("PauseSchedule is not built yet")

    @handles("schedule_tick")
    def _schedule_tick(self, req: logpb.ScheduleTick, now: int) -> logpb.ScheduleTick:
        raise FailedPreconditionError("ScheduleTick is not built yet")
