"""Tenancy rules the commands apply: who may produce into a queue (its owner
or a tenant it is shared with), a tenant's job limits, and a tenant's room to
lease. The limits arrive stamped on the command; nothing here reads config."""

from __future__ import annotations

from pqueue.core import limits
from pqueue.core.jobs import (
    LEASED,
    QueueState,
)
from pqueue.core.transitions import Transitions
from pqueue.errors import (
    InvalidArgumentError,
    PermissionDeniedError,
    ResourceExhaustedError,
)
from pqueue.v1 import queue_pb2 as pb


class TenancyRules(Transitions):
    """Checks on the caller stamped on the command being applied."""

    def _check_producer(self, name: str, queue: QueueState | None) -> str:
        """The tenant an enqueue produces for, if the caller may enqueue here.

        The queue's owner, an admin (on the owner's behalf) and an unstamped
        enqueue (auth off, or logged before callers were stamped) produce
        for the owner; a tenant the queue is shared with, for itself. Anyone
        else is refused, alike whether the queue exists, so that does not leak.
        """
        owner = limits.tenant_of(name)
        caller = self._caller
        if caller is None or not caller.tenant or caller.tenant == owner or caller.admin:
            return owner
        if queue is None or caller.tenant not in queue.weights:
            raise PermissionDeniedError(
                f"queue {name!r} belongs to another tenant and is not shared with "
                f"tenant {caller.tenant!r}"
            )
        return caller.tenant

    def _check_tenant_enqueue(
        self, req: pb.EnqueueBatchRequest, queue: QueueState | None, tenant: str
    ) -> None:
        """The stamped tenant limits on payload size and queue depth: all jobs or
        none. Depth counts the producing tenant's jobs in the queue."""
        bound = self._limits
        if bound is None:
            return
        for i, spec in enumerate(req.jobs):
            if bound.max_payload_bytes and len(spec.payload) > bound.max_payload_bytes:
                raise InvalidArgumentError(
                    f"jobs[{i}].payload",
                    f"{len(spec.payload)} bytes exceeds the tenant's limit of "
                    f"{bound.max_payload_bytes}",
                )
        if not bound.max_queue_depth:
            return
        # Dead jobs count: they stay until redriven or deleted.
        lane = None if queue is None else queue.lanes.get(tenant)
        depth = 0 if lane is None else lane.held
        keys = set() if queue is None else queue.dedup.keys()
        new = sum(
            1
            for spec in req.jobs
            if not (spec.idempotency_key and (tenant, spec.idempotency_key) in keys)
        )
        if depth + new > bound.max_queue_depth:
            raise ResourceExhaustedError(
                f"queue {req.queue!r} holds {depth} jobs and the tenant's limit is "
                f"{bound.max_queue_depth}; retry once consumers catch up",
                retry_after_s=1.0,
            )

    def _lease_room(self, queue_name: str) -> int:
        """How many more jobs the stamped limit lets the queue's tenant hold leased."""
        bound = self._limits
        if bound is None or not bound.max_inflight_leases:
            return limits.MAX_LEASE_JOBS
        tenant = limits.tenant_of(queue_name)
        leased = sum(self.queues[name].counts[LEASED] for name in self.queues.names_of(tenant))
        room = bound.max_inflight_leases - leased
        if room <= 0:
            raise ResourceExhaustedError(
                f"the tenant holds {leased} leases, its limit; ack or nack some first",
                retry_after_s=1.0,
            )
        return room
