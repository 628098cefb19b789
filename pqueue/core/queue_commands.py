"""Queue commands of the queue machine: create, delete, purge, redrive and
delete dead jobs, and the tick that only advances time."""

from __future__ import annotations

from pqueue.core import limits
from pqueue.core.commands import handles
from pqueue.core.jobs import (
    WAITING,
)
from pqueue.core.transitions import Transitions
from pqueue.errors import (
    AlreadyExistsError,
)
from pqueue.v1 import log_pb2 as logpb
from pqueue.v1 import queue_pb2 as pb


def _shown(config: pb.QueueConfig, name: str) -> str:
    """One config field's value as an error message shows it."""
    field = config.DESCRIPTOR.fields_by_name[name]
    if field.is_repeated:
        return ",".join(f"{s.tenant}={s.weight}" for s in config.shares) or "none"
    if field.has_presence and all(f.name != name for f, _ in config.ListFields()):
        return "unset"
    value = getattr(config, name)
    return str(value).lower() if isinstance(value, bool) else str(value)


def config_differences(have: pb.QueueConfig, asked: pb.QueueConfig) -> list[str]:
    """``max_attempts is 5, asked 3``: each field where two effective
    configs differ, in field order (what ALREADY_EXISTS names)."""
    out = []
    for field in have.DESCRIPTOR.fields:
        was, wants = _shown(have, field.name), _shown(asked, field.name)
        if was != wants:
            out.append(f"{field.name} is {was}, asked {wants}")
    return out


class QueueCommands(Transitions):
    """The commands an admin sends, and ``tick``."""

    @handles("create_queue")
    def _create_queue(self, req: pb.CreateQueueRequest, now: int) -> pb.CreateQueueResponse:
        limits.check_queue_name(req.queue)
        config = limits.effective_config(req.config, self.lifecycle)
        existing = self.queues.get(req.queue)
        if existing is not None:
            if existing.config != config:
                raise AlreadyExistsError(
                    f"queue {req.queue!r} exists with a different config: "
                    + ("; ".join(config_differences(existing.config, config)) or "?")
                )
            return pb.CreateQueueResponse(created=False, config=existing.config)
        self._new_queue(req.queue, config)
        return pb.CreateQueueResponse(created=True, config=config)

    @handles("delete_queue")
    def _delete_queue(self, req: pb.DeleteQueueRequest, now: int) -> pb.DeleteQueueResponse:
        queue = self._queue(req.queue)
        count = len(queue.jobs)
        self._drop_queue(queue)
        return pb.DeleteQueueResponse(deleted_jobs=count)

    @handles("purge")
    def _purge(self, req: pb.PurgeQueueRequest, now: int) -> pb.PurgeQueueResponse:
        queue = self._queue(req.queue)
        table = queue.jobs
        # Ids first (a view of a compact job is made one at a time, not a
        # million at once); a compact job is always waiting.
        doomed = [i for i in table if table.row(i) is not None or table[i].state in WAITING]
        for job_id in doomed:
            self._remove(queue, table[job_id])
        return pb.PurgeQueueResponse(purged=len(doomed))

    @handles("redrive")
    def _redrive(self, req: pb.RedriveRequest, now: int) -> pb.RedriveResponse:
        queue = self._queue(req.queue)
        jobs = self._dead_jobs(queue, req.job_ids)
        for job in jobs:
            queue.dead_ids.discard(job.job_id)
            job.attempts = 0
            job.finished_at_ms, job.reason = 0, ""  # alive again
            if job.expires_at_ms <= now:
                job.expires_at_ms = 0  # run it after all (a later expiry still holds)
            self._make_ready(queue, job, now)
        return pb.RedriveResponse(redriven=len(jobs))

    @handles("delete_dead")
    def _delete_dead(self, req: pb.DeleteDeadRequest, now: int) -> pb.DeleteDeadResponse:
        queue = self._queue(req.queue)
        jobs = self._dead_jobs(queue, req.job_ids)
        for job in jobs:
            self._remove(queue, job)
        return pb.DeleteDeadResponse(deleted=len(jobs))

    @handles("tick")
    def _tick(self, req: logpb.Tick, now: int) -> logpb.Tick:
        return logpb.Tick()
