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
    pack_fresh_row,
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
        specs = req.jobs
        self._check_specs(config, specs)
        self._check_tenant_enqueue(req, queue, tenant)
        if queue is None:
            queue = self._new_queue(req.queue, config)
        lane = queue.lane(tenant)
        out = pb.EnqueueBatchResponse()
        # Per job, this runs on every replica for every job: what is the
        # same for the whole batch is read once, and the response's list
        # is bound once (each ``out.results`` read costs a wrapper lookup).
        add_result = out.results.add
        dedup = queue.dedup
        changed = self._changed
        name = queue.name
        ttl = config.job_ttl_ms if self.lifecycle else 0
        ttl_at = now + ttl if ttl else 0
        lifecycle = self.lifecycle
        tenant_bytes = tenant.encode()
        compact = 0
        fresh: list[int] = []
        for spec in specs:
            key = spec.idempotency_key
            if key and (tenant, key) in dedup:
                add_result(job_id=dedup[tenant, key][0], duplicate=True)
                continue
            job_id = self.next_job_id
            self.next_job_id = job_id + 1
            fresh.append(job_id)
            changed.add(job_id)
            if key:
                self.remember_key(queue, tenant, key, job_id, now + config.dedup_window_ms)
            delay, not_before = spec.delay_ms, spec.not_before_ms
            ready_at = now + delay if now + delay >= not_before else not_before
            # When it expires unleased: the earlier of its own expires_at_ms
            # and the queue's job_ttl_ms from now (0: never; lifecycle only).
            own = spec.expires_at_ms if lifecycle else 0
            expires_at = (own if own < ttl_at else ttl_at) if own and ttl_at else own or ttl_at
            if (
                ready_at <= now
                and not spec.group
                and not expires_at
                and queue.add_compact_fresh(
                    job_id,
                    pack_fresh_row(spec.priority, now, tenant_bytes, key, spec.payload),
                    spec.priority,
                    now,
                    lane,
                )
            ):
                # Waiting in the compact form (jobs.py): ready, no Job object.
                # Counted READY at once: push_ready and note_ready size their
                # heaps by counts[READY] - jobs.compact, and add_row has just
                # counted it compact (the lane's and wake-up counts may wait).
                queue.counts[READY] += 1
                compact += 1
                add_result(job_id=job_id)
                continue
            job = Job(
                job_id=job_id,
                queue=name,
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
            add_result(job_id=job_id)
        if fresh:
            queue.counters.enqueued += len(fresh)
            self._touched.add(name)
        if compact:
            lane.held += compact
            self._woken[name] += compact
        self._named = (fresh, None)
        return out

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
        add_job = out.jobs.add  # bound once: each ``out.jobs`` read costs a lookup
        respond = self._responding
        name, consumer_id = queue.name, req.consumer_id
        expires_at = now + lease_ms
        leases = self._leases
        size = 0
        taken: list[int] = []
        while len(taken) < max_jobs and size < limits.MAX_LEASE_RESPONSE_BYTES:
            job = queue.take_ready()
            if job is None:
                break
            taken.append(job.job_id)
            size += len(job.payload)
            self._set_state(queue, job, LEASED)
            job.attempts += 1
            job.lease_id = lease_id = self.next_lease_id
            self.next_lease_id = lease_id + 1
            job.leased_at_ms = now
            job.lease_expires_at_ms = expires_at
            job.consumer_id = consumer_id
            heapq.heappush(leases, (expires_at, lease_id, job.job_id, name))
            if job.group:
                queue.groups[job.group_key].in_flight = job.job_id
            if not respond:
                continue
            add_job(
                job_id=job.job_id,
                lease_id=lease_id,
                priority=job.priority,
                payload=job.payload,
                attempt=job.attempts,
                group=job.group,
                enqueued_at_ms=job.enqueued_at_ms,
                lease_expires_at_ms=expires_at,
                queue=name,
                tenant=job.tenant,
            )
        queue.counters.leased += len(taken)
        dispatch.charge(queue, now, len(taken), self.lifecycle)
        self._named = (taken, None)
        return out

    @handles("ack")
    def _ack(self, req: pb.AckRequest, now: int) -> pb.AckResponse:
        queue = self._queue(req.queue)
        seen: set[int] = set()
        done: list[tuple[Job, bytes]] = []
        bound = self._result_bound(queue)
        for i, lease in enumerate(req.leases):
            job_id, result = lease.job_id, lease.result
            if job_id in seen:
                raise InvalidArgumentError(f"leases[{i}].job_id", "job listed twice")
            seen.add(job_id)
            if len(result) > bound:
                self._check_result(queue, result, f"leases[{i}].result")
            done.append((self._leased_job(queue, job_id, lease.lease_id), result))
        queue.counters.acked += len(done)
        self._named = ([job.job_id for job, _ in done], [len(result) for _, result in done])
        if self.lifecycle:
            keeps = self._keeps_records(queue)
            for job, result in done:
                self._finish(queue, job, COMPLETED, now, result, "", keeps)
        else:  # as releases before job records did
            for job, _ in done:
                self._end_lease(queue, job)
                self._remove(queue, job)
        return pb.AckResponse(acked=len(done))

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
