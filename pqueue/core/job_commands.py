"""Job commands of the queue machine: enqueue, lease, ack, nack, extend.
Each checks everything before changing anything (an error means no change)."""

from __future__ import annotations

import heapq

from pqueue.core import dispatch, limits
from pqueue.core.commands import handles
from pqueue.core.jobs import (
    COMPLETED,
    DEAD,
    LEASED,
    READY,
    Job,
    backoff_ms,
    pack_row,
)
from pqueue.core.tenancy import TenancyRules
from pqueue.errors import (
    InvalidArgumentError,
)
from pqueue.v1 import queue_pb2 as pb


class JobCommands(TenancyRules):
    """The commands a producer or a consumer sends."""

    @handles("enqueue")
    def _enqueue(self, req: pb.EnqueueBatchRequest, now: int) -> pb.EnqueueBatchResponse:
        limits.check_queue_name(req.queue)
        queue = self.queues.get(req.queue)
        tenant = self._check_producer(req.queue, queue)
        config = (
            queue.config if queue else limits.effective_config(pb.QueueConfig(), self.lifecycle)
        )
        for i, spec in enumerate(req.jobs):
            self._check_spec(config, spec, f"jobs[{i}]")
        self._check_tenant_enqueue(req, queue, tenant)
        if queue is None:
            queue = self._new_queue(req.queue, config)
        lane = queue.lane(tenant)
        out = pb.EnqueueBatchResponse()
        for spec in req.jobs:
            key = spec.idempotency_key
            if key and (tenant, key) in queue.dedup:
                out.results.add(job_id=queue.dedup[tenant, key][0], duplicate=True)
                continue
            job_id = self.next_job_id
            self.next_job_id += 1
            queue.counters.enqueued += 1
            self._changed.add(job_id)
            self._touched.add(queue.name)
            if key:
                self.remember_key(queue, tenant, key, job_id, now + config.dedup_window_ms)
            ready_at = max(now + spec.delay_ms, spec.not_before_ms)
            expires_at = self._expiry_of(config, spec, now)
            if (
                ready_at <= now
                and not spec.group
                and not expires_at
                and queue.add_compact(
                    job_id, pack_row(spec.priority, now, now, tenant, key, spec.payload)
                )
            ):
                # Waiting in the compact form (jobs.py): ready, no Job object.
                lane.held += 1
                queue.counts[READY] += 1
                self._woken[queue.name] += 1
                out.results.add(job_id=job_id)
                continue
            job = Job(
                job_id=job_id,
                queue=queue.name,
                priority=spec.priority,
                payload=spec.payload,
                state=0,
                group=spec.group,
                idempotency_key=key,
                enqueued_at_ms=now,
                ready_at_ms=now,
                tenant=tenant,
                expires_at_ms=expires_at,
            )
            queue.jobs[job_id] = job
            lane.held += 1
            if ready_at > now:
                self._make_delayed(queue, job, ready_at)
            else:
                self._make_ready(queue, job, now)
            if self._expired(job, now):  # expired already: never leasable
                self._expire(queue, job, now)
            out.results.add(job_id=job_id)
        return out

    def _expiry_of(self, config: pb.QueueConfig, spec: pb.JobSpec, now: int) -> int:
        """When a new job expires unleased: the earlier of its own
        ``expires_at_ms`` and the queue's ``job_ttl_ms`` from now (0: never)."""
        if not self.lifecycle:
            return 0
        ttl = config.job_ttl_ms
        return min((t for t in (spec.expires_at_ms, ttl and now + ttl) if t), default=0)

    @handles("lease")
    def _lease(self, req: pb.LeaseRequest, now: int) -> pb.LeaseResponse:
        queue = self._queue(req.queue)
        limits.check_duration(req.lease_ms, "lease_ms")
        # Pause, max_inflight, max_dispatch_per_s: an empty answer, as for no work.
        room = dispatch.lease_room(queue, now, self.lifecycle)
        if room == 0:
            return pb.LeaseResponse()
        max_jobs = min(max(req.max_jobs, 1), limits.MAX_LEASE_JOBS, self._lease_room(req.queue))
        if room is not None:
            max_jobs = min(max_jobs, room)
        lease_ms = min(
            req.lease_ms or queue.config.default_lease_ms, queue.config.max_lease_total_ms
        )
        out = pb.LeaseResponse()
        size = 0
        while len(out.jobs) < max_jobs and size < limits.MAX_LEASE_RESPONSE_BYTES:
            job = queue.take_ready()
            if job is None:
                break
            size += len(job.payload)
            self._set_state(queue, job, LEASED)
            job.attempts += 1
            queue.counters.leased += 1
            job.lease_id = self.next_lease_id
            self.next_lease_id += 1
            job.leased_at_ms = now
            job.lease_expires_at_ms = now + lease_ms
            job.consumer_id = req.consumer_id
            heapq.heappush(
                self._leases, (job.lease_expires_at_ms, job.lease_id, job.job_id, queue.name)
            )
            if job.group:
                queue.groups[job.group_key].in_flight = job.job_id
            out.jobs.add(
                job_id=job.job_id,
                lease_id=job.lease_id,
                priority=job.priority,
                payload=job.payload,
                attempt=job.attempts,
                group=job.group,
                enqueued_at_ms=job.enqueued_at_ms,
                lease_expires_at_ms=job.lease_expires_at_ms,
                queue=queue.name,
                tenant=job.tenant,
            )
        dispatch.charge(queue, now, len(out.jobs), self.lifecycle)
        return out

    @handles("ack")
    def _ack(self, req: pb.AckRequest, now: int) -> pb.AckResponse:
        queue = self._queue(req.queue)
        seen: set[int] = set()
        jobs = []
        for i, lease in enumerate(req.leases):
            if lease.job_id in seen:
                raise InvalidArgumentError(f"leases[{i}].job_id", "job listed twice")
            seen.add(lease.job_id)
            self._check_result(queue, lease.result, f"leases[{i}].result")
            jobs.append(self._leased_job(queue, lease.job_id, lease.lease_id))
        for job, lease in zip(jobs, req.leases, strict=True):
            queue.counters.acked += 1
            if self.lifecycle:
                self._finish(queue, job, COMPLETED, now, lease.result, "")
            else:  # as releases before job records did
                self._end_lease(queue, job)
                self._remove(queue, job)
        return pb.AckResponse(acked=len(jobs))

    @handles("nack")
    def _nack(self, req: pb.NackRequest, now: int) -> pb.NackResponse:
        queue = self._queue(req.queue)
        job = self._leased_job(queue, req.job_id, req.lease_id)
        if req.release:
            delay = req.delay_ms if req.HasField("delay_ms") else 0
            limits.check_duration(delay, "delay_ms")
            job.attempts -= 1  # this delivery does not count
            self._end_lease(queue, job)
            if self._expired(job, now):  # given back past its expiry
                self._expire(queue, job, now)
            elif delay:
                self._make_delayed(queue, job, now + delay)
            else:
                self._make_ready(queue, job, now)
            return pb.NackResponse(
                state=job.state,  # type: ignore[arg-type]
                ready_at_ms=job.ready_at_ms,
                attempts=job.attempts,
            )
        delay = (
            req.delay_ms
            if req.HasField("delay_ms")
            else backoff_ms(queue.config, job.job_id, job.attempts)
        )
        limits.check_duration(delay, "delay_ms")
        queue.counters.nacked += 1
        self._fail_delivery(queue, job, now, req.reason or "nacked", retry_at=now + delay)
        return pb.NackResponse(
            state=job.state,  # type: ignore[arg-type]
            ready_at_ms=job.ready_at_ms if job.state != DEAD else 0,
            attempts=job.attempts,
        )

    @handles("extend")
    def _extend(self, req: pb.ExtendLeaseRequest, now: int) -> pb.ExtendLeaseResponse:
        queue = self._queue(req.queue)
        limits.check_duration(req.lease_ms, "lease_ms")
        job = self._leased_job(queue, req.job_id, req.lease_id)
        wanted = now + (req.lease_ms or queue.config.default_lease_ms)
        cap = job.leased_at_ms + queue.config.max_lease_total_ms
        job.lease_expires_at_ms = min(wanted, cap)
        self._changed.add(job.job_id)
        self._touched.add(queue.name)
        # The older heap entry no longer matches the expiry and is skipped.
        heapq.heappush(
            self._leases, (job.lease_expires_at_ms, job.lease_id, job.job_id, queue.name)
        )
        return pb.ExtendLeaseResponse(
            lease_expires_at_ms=job.lease_expires_at_ms, capped=wanted > cap
        )
