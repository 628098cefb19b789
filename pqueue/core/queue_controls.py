"""Queue controls of the queue machine: update a queue's config, pause and
resume its leases."""

from __future__ import annotations

from collections.abc import Iterable

from google.protobuf.message import Message

from pqueue.core import dispatch, limits
from pqueue.core.commands import handles
from pqueue.core.jobs import READY, QueueState
from pqueue.core.transitions import Transitions
from pqueue.errors import InvalidArgumentError
from pqueue.v1 import queue_pb2 as pb

#: The names an ``UpdateQueueRequest.update_mask`` may list.
CONFIG_FIELDS = {f.name: f for f in pb.QueueConfig.DESCRIPTOR.fields}


def check_mask(mask: Iterable[str]) -> None:
    """Every path names a ``QueueConfig`` field (INVALID_ARGUMENT naming
    ``update_mask[i]`` otherwise)."""
    for i, name in enumerate(mask):
        if name not in CONFIG_FIELDS:
            raise InvalidArgumentError(f"update_mask[{i}]", f"{name!r} is not a QueueConfig field")


def masked(base: pb.QueueConfig, req: pb.UpdateQueueRequest) -> pb.QueueConfig:
    """``base`` with the fields ``req.update_mask`` names taken from
    ``req.config`` (a repeated field whole; an optional one cleared when
    unset), not yet validated. The mask must have been checked."""
    out = pb.QueueConfig()
    out.CopyFrom(base)
    # As plain messages: the field names are strings, not literals.
    into: Message = out
    source: Message = req.config
    for name in req.update_mask:
        field = CONFIG_FIELDS[name]
        into.ClearField(name)
        if field.is_repeated:
            getattr(into, name).extend(getattr(source, name))
        elif not field.has_presence or source.HasField(name):
            setattr(into, name, getattr(source, name))
    return out


def updated_config(
    current: pb.QueueConfig, req: pb.UpdateQueueRequest, lifecycle: bool
) -> pb.QueueConfig:
    """The effective config ``req`` gives a queue configured ``current``:
    validated as CreateQueue validates (zero fields take their defaults)."""
    check_mask(req.update_mask)
    if not req.update_mask:
        return limits.effective_config(req.config, lifecycle)
    return limits.effective_config(masked(current, req), lifecycle)


#: Fields checked against another; an update naming one but not the other
#: is checked statelessly against the partner value no config can conflict with.
_PARTNERS = {
    "default_lease_ms": ("max_lease_total_ms", limits.MAX_DURATION_MS),
    "max_lease_total_ms": ("default_lease_ms", 1),
    "backoff_base_ms": ("backoff_max_ms", limits.MAX_DURATION_MS),
    "backoff_max_ms": ("backoff_base_ms", 1),
}


def check_update(req: pb.UpdateQueueRequest) -> None:
    """What an UpdateQueue can be refused for whatever the queue's config
    (the servicer's check before proposing): unknown mask paths, and every
    field the update sets out of its bounds. Relations with fields it does
    not set are the machine's to check, against the queue's config."""
    check_mask(req.update_mask)
    if not req.update_mask:
        limits.effective_config(req.config)
        return
    probe = masked(pb.QueueConfig(), req)
    for name, (partner, neutral) in _PARTNERS.items():
        if name in req.update_mask and partner not in req.update_mask:
            setattr(probe, partner, neutral)
    limits.effective_config(probe)


class QueueControls(Transitions):
    """UpdateQueue, PauseQueue, ResumeQueue."""

    @handles("update_queue")
    def _update_queue(self, req: pb.UpdateQueueRequest, now: int) -> pb.UpdateQueueResponse:
        queue = self._queue(req.queue)
        config = updated_config(queue.config, req, self.lifecycle)
        old = queue.config
        dispatch.settle(queue, now, config)
        queue.config = config
        queue.weights = {s.tenant: s.weight or 1 for s in config.shares}
        if config.aging_interval_ms != old.aging_interval_ms:
            # The ready heaps hold keys computed with the old interval (the
            # compact FIFOs are per priority: their order holds under any).
            queue._rebuild_ready()
        if (
            config.max_inflight != old.max_inflight
            or config.max_dispatch_per_s != old.max_dispatch_per_s
        ):
            self._wake_ready(queue)
        # Retention is read again when due; a restored replica computes it
        # from the config of the moment, so every replica looks again now.
        if config.dead_retention_ms != old.dead_retention_ms:
            self.watch_retention(queue)
        if config.completed_retention_ms != old.completed_retention_ms:
            self.watch_records(queue)
        if config.completed_max < old.completed_max:
            self._trim_records(queue)
        return pb.UpdateQueueResponse(config=config)

    @handles("pause_queue")
    def _pause_queue(self, req: pb.PauseQueueRequest, now: int) -> pb.PauseQueueResponse:
        queue = self._queue(req.queue)
        changed = not queue.paused
        queue.paused = True
        return pb.PauseQueueResponse(changed=changed)

    @handles("resume_queue")
    def _resume_queue(self, req: pb.ResumeQueueRequest, now: int) -> pb.ResumeQueueResponse:
        queue = self._queue(req.queue)
        changed = queue.paused
        queue.paused = False
        if changed:
            self._wake_ready(queue)
        return pb.ResumeQueueResponse(changed=changed)

    def _wake_ready(self, queue: QueueState) -> None:
        """The queue's ready jobs may be leasable now that were not (its
        controls changed): report them woken, so waiting leases look again."""
        if queue.counts[READY]:
            self._woken[queue.name] += queue.counts[READY]
