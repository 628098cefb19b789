"""Cron schedules in the queue machine: put, delete, pause, and the tick
that enqueues a schedule's job. The machine never reads cron expressions:
the leader computes when ticks fall due (``pqueue.node.scheduler``) and
proposes each as a ``ScheduleTick``; applying one is idempotent.

A schedule's ticks are counted from ``max(last_tick_ms, created_at_ms)``
(its *mark*): a tick at or before the mark changes nothing, so a tick
proposed twice (a failover, a resent round) or late (an older leader's)
is applied at most once, and ticks after the mark come in order because
each one applied moves the mark to itself. Replacing a schedule's cron or
timezone, or resuming it, moves ``last_tick_ms`` to the time it happened:
ticks of the old timing, or that fell while it was paused, are not owed.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from pqueue.core import limits
from pqueue.core.commands import handles
from pqueue.core.job_commands import JobCommands
from pqueue.core.jobs import QueueState
from pqueue.errors import (
    InvalidArgumentError,
    NotFoundError,
    PQueueError,
    ResourceExhaustedError,
)
from pqueue.v1 import log_pb2 as logpb
from pqueue.v1 import queue_pb2 as pb

#: Schedules the whole cluster holds (the leader looks at each every round).
MAX_SCHEDULES = 10_000
#: A cron expression's length; a timezone name's.
MAX_CRON_CHARS = 256
MAX_TIMEZONE_CHARS = 64
#: The ``JobSpec`` fields a schedule's job may not set, and why.
_REFUSED_JOB_FIELDS = {
    "delay_ms": "a schedule's job is ready at its tick",
    "not_before_ms": "a schedule's job is ready at its tick",
    "idempotency_key": "each tick's job is keyed by its tick (schedule:NAME:TICK_MS)",
    "expires_at_ms": "a fixed time would expire every later tick's job; use the queue's job_ttl_ms",
}


def tick_key(name: str, tick_ms: int) -> str:
    """The idempotency key of the job a schedule's tick enqueues."""
    return f"schedule:{name}:{tick_ms}"


def mark(schedule: pb.Schedule) -> int:
    """The time a schedule's ticks are counted from (exclusive)."""
    return max(schedule.last_tick_ms, schedule.created_at_ms)


def check_schedule_name(name: str, field: str = "schedule.name") -> None:
    """A schedule's name: a queue name without a tenant (no slash)."""
    if "/" in name:
        raise InvalidArgumentError(field, "use letters, digits and . _ : - (no slash)")
    limits.check_queue_name(name, field)


class ScheduleCommands(JobCommands):
    """PutSchedule, DeleteSchedule, PauseSchedule and ScheduleTick (a tick
    enqueues as an ``enqueue`` command does: ``JobCommands._enqueue``)."""

    @handles("put_schedule")
    def _put_schedule(self, req: pb.PutScheduleRequest, now: int) -> pb.PutScheduleResponse:
        want = req.schedule
        limits.check_queue_name(want.queue, "schedule.queue")
        check_schedule_name(want.name)
        if not want.cron.strip():
            raise InvalidArgumentError("schedule.cron", "must not be empty")
        limits.check_text(want.cron, "schedule.cron", MAX_CRON_CHARS)
        limits.check_text(want.timezone, "schedule.timezone", MAX_TIMEZONE_CHARS)
        if want.missed not in pb.MissedTicks.values():
            raise InvalidArgumentError("schedule.missed", f"unknown policy {want.missed}")
        queue = self._queue(want.queue)
        for name, why in _REFUSED_JOB_FIELDS.items():
            if getattr(want.job, name):
                raise InvalidArgumentError(f"schedule.job.{name}", f"not allowed: {why}")
        self._check_spec(queue.config, want.job, "schedule.job")
        old = queue.schedules.get(want.name)
        if old is None and self.schedule_count() >= MAX_SCHEDULES:
            raise ResourceExhaustedError(
                f"the cluster holds its limit of {MAX_SCHEDULES} schedules; delete one first"
            )
        stored = pb.Schedule(
            queue=want.queue,
            name=want.name,
            cron=want.cron,
            timezone=want.timezone,
            job=want.job,
            missed=want.missed,
            paused=want.paused,
            created_at_ms=now,
        )
        if old is not None:
            stored.created_at_ms = old.created_at_ms
            stored.last_tick_ms = old.last_tick_ms
            if (old.cron, old.timezone) != (want.cron, want.timezone) or (
                old.paused and not want.paused
            ):
                stored.last_tick_ms = max(old.last_tick_ms, now)
        queue.schedules[want.name] = stored
        return pb.PutScheduleResponse(created=old is None, schedule=stored)

    @handles("delete_schedule")
    def _delete_schedule(
        self, req: pb.DeleteScheduleRequest, now: int
    ) -> pb.DeleteScheduleResponse:
        queue = self._queue(req.queue)
        self._schedule(queue, req.name)
        del queue.schedules[req.name]
        if queue.config.delete_when_idle and not queue.jobs:
            self._idle.add(queue.name)  # kept only for its schedules
        return pb.DeleteScheduleResponse()

    @handles("pause_schedule")
    def _pause_schedule(self, req: pb.PauseScheduleRequest, now: int) -> pb.PauseScheduleResponse:
        queue = self._queue(req.queue)
        schedule = self._schedule(queue, req.name)
        if schedule.paused and not req.paused:  # ticks that fell while paused are not owed
            schedule.last_tick_ms = max(schedule.last_tick_ms, now)
        schedule.paused = req.paused
        return pb.PauseScheduleResponse(schedule=schedule)

    @handles("schedule_tick")
    def _schedule_tick(self, req: logpb.ScheduleTick, now: int) -> logpb.ScheduleTick:
        """Record the tick and, unless ``skip``, enqueue the schedule's job
        keyed ``tick_key``. A tick that is not owed (the schedule is gone or
        paused, the tick at or before its mark, or after the entry's time)
        changes nothing and answers an empty ``ScheduleTick``; one applied
        answers its echo, ``skip`` set when no new job was made (asked to
        skip, or the queue no longer takes the job: its bounds changed)."""
        queue = self.queues.get(req.queue)
        schedule = None if queue is None else queue.schedules.get(req.name)
        if (
            queue is None
            or schedule is None
            or schedule.paused
            or req.tick_ms <= mark(schedule)
            or req.tick_ms > now
        ):
            return logpb.ScheduleTick()
        made = False
        if not req.skip:
            spec = pb.JobSpec()
            spec.CopyFrom(schedule.job)
            spec.idempotency_key = tick_key(req.name, req.tick_ms)
            try:
                out = self._enqueue(pb.EnqueueBatchRequest(queue=queue.name, jobs=[spec]), now)
            except PQueueError:
                pass  # nothing changed: the tick is recorded as skipped
            else:
                made = not out.results[0].duplicate
            self._named = None  # the enqueue's; a tick names no job for its events
        schedule.last_tick_ms = req.tick_ms
        return logpb.ScheduleTick(
            queue=req.queue, name=req.name, tick_ms=req.tick_ms, skip=not made
        )

    # ------------------------------------------------------------------ reads

    def _schedule(self, queue: QueueState, name: str) -> pb.Schedule:
        schedule = queue.schedules.get(name)
        if schedule is None:
            check_schedule_name(name, "name")
            raise NotFoundError(f"schedule {name!r} not found in queue {queue.name!r}")
        return schedule

    def schedule_count(self) -> int:
        """Schedules held, all queues."""
        return sum(len(q.schedules) for q in self.queues.values())

    def all_schedules(self) -> Iterator[pb.Schedule]:
        """Every schedule, in no set order (the stored messages: read only)."""
        for queue in self.queues.values():
            if queue.schedules:
                yield from queue.schedules.values()

    def list_schedules(self, queue_names: Iterable[str] | None = None) -> list[pb.Schedule]:
        """Copies of the schedules of the queues named (each must exist), or
        of every queue with None; by queue, then name."""
        stored = []
        for name in sorted(self.queues) if queue_names is None else queue_names:
            queue = self._queue(name)
            stored += [queue.schedules[key] for key in sorted(queue.schedules)]
        out = []
        for schedule in stored:
            copy = pb.Schedule()
            copy.CopyFrom(schedule)
            out.append(copy)
        return out
