"""The state machine against a naive reference model (hypothesis stateful test).

The model keeps jobs in a dict and answers every question by scanning, in the
plainest reading of docs/semantics.md "Semantics" (and of fair sharing between tenants:
``QueueConfig.shares``; and of its "Queue controls": updates, pause,
``max_inflight`` and the ``max_dispatch_per_s`` token bucket). The machine,
with its heaps, lazy deletion and group bookkeeping, must agree with it after
every step, including after being replaced by a restore of its own snapshot."""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from pqueue.core import jobs, limits
from pqueue.core.jobs import FAIR_SCALE, backoff_ms
from pqueue.core.snapshot import restore, snapshot_bytes, state_hash
from pqueue.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    LeaseLostError,
    NotFoundError,
    PermissionDeniedError,
    PQueueError,
)
from pqueue.v1 import log_pb2 as logpb
from pqueue.v1 import queue_pb2 as pb
from tests.machine_driver import Driver

READY, DELAYED, LEASED, DEAD, COMPLETED, CANCELLED = (
    pb.JOB_STATE_READY,
    pb.JOB_STATE_DELAYED,
    pb.JOB_STATE_LEASED,
    pb.JOB_STATE_DEAD,
    pb.JOB_STATE_COMPLETED,
    pb.JOB_STATE_CANCELLED,
)
RECORDS = (COMPLETED, CANCELLED)


@dataclass
class MJob:
    id: int
    priority: int
    group: str
    state: int
    ready_at: int
    attempts: int = 0
    lease_id: int = 0
    leased_at: int = 0
    expires: int = 0
    errors: list[str] = field(default_factory=list)
    tenant: str = ""
    #: When it dies unleased ("expired"), 0: never; when it died or ended,
    #: what its ack or completion carried, and why.
    expires_at: int = 0
    finished_at: int = 0
    result: bytes = b""
    reason: str = ""


class Model:
    """docs/semantics.md "Semantics" by brute force."""

    def __init__(self, config: pb.QueueConfig, lifecycle: bool) -> None:
        self.cfg = config
        #: Acks keep COMPLETED records, dead jobs say when and why.
        self.lifecycle = lifecycle
        self.jobs: dict[int, MJob] = {}
        self.next_id = 1
        self.next_lease = 1
        self.dedup: dict[tuple[str, str], tuple[int, int]] = {}
        self.weights = {s.tenant: s.weight for s in config.shares}
        #: Fair sharing: each tenant's virtual time, and the queue's clock.
        self.vtime: dict[str, int] = {}
        self.vclock = 0
        #: Queue controls: paused; the dispatch bucket (thousandths of a
        #: lease) as of ``bucket_at``, filled up to one second of leases.
        self.paused = False
        self.bucket = 0
        self.bucket_at = 0

        self.dead_total = 0
        self.ttl_expired = 0

    def rate(self) -> int:
        """max_dispatch_per_s in thousandths of a lease per second."""
        return round(self.cfg.max_dispatch_per_s * 1000)

    def bucket_now(self, now: int) -> int:
        rate = self.rate()
        return min(max(1000, rate), self.bucket + (now - self.bucket_at) * rate // 1000)

    def update(self, cfg: pb.QueueConfig, now: int) -> None:
        """A new config: the bucket keeps what it held, up to the new size
        (full if there was no rate; none if there is none now)."""
        old, new = self.rate(), round(cfg.max_dispatch_per_s * 1000)
        if old != new:
            held = self.bucket_now(now) if old else max(1000, new)
            self.bucket, self.bucket_at = (min(max(1000, new), held), now) if new else (0, 0)
        self.cfg = cfg
        self.weights = {s.tenant: s.weight for s in cfg.shares}

    def advance(self, now: int) -> None:
        for j in self.jobs.values():
            if j.state == DELAYED and j.ready_at <= now:
                j.state = READY
        for j in sorted(self.jobs.values(), key=lambda j: j.id):
            if j.state == LEASED and j.expires <= now:
                self._fail(j, now, "lease expired", now)
        for j in self.jobs.values():  # waiting past its expiry: dead
            if j.state in (READY, DELAYED) and 0 < j.expires_at <= now:
                self._die(j, now, "expired")
        retention = self.cfg.dead_retention_ms
        if retention:
            self.jobs = {
                i: j
                for i, j in self.jobs.items()
                if j.state != DEAD or j.finished_at + retention > now
            }
        self.dedup = {k: v for k, v in self.dedup.items() if v[1] > now}
        retention = self.cfg.completed_retention_ms
        for j in list(self.jobs.values()):
            if j.state in RECORDS and -(-(j.finished_at + retention) // 1000) * 1000 <= now:
                del self.jobs[j.id]

    def start_lifecycle(self, config: pb.QueueConfig) -> None:
        if not self.lifecycle:
            self.lifecycle = True
            self.cfg = limits.effective_config(config, lifecycle=True)

    def finish(self, j: MJob, state: int, now: int, result: bytes, reason: str) -> None:
        """Acked, force-completed or cancelled: a record, the oldest going
        past the cap (or forgotten when the queue keeps none)."""
        j.expires = 0
        if not self.lifecycle or not self.cfg.completed_max:
            del self.jobs[j.id]
            return
        j.state, j.finished_at, j.result, j.reason = state, now, result, reason
        records = sorted((o.finished_at, o.id) for o in self.jobs.values() if o.state in RECORDS)
        for _, job_id in records[: max(0, len(records) - self.cfg.completed_max)]:
            del self.jobs[job_id]

    def _die(self, j: MJob, now: int, reason: str) -> None:
        j.state = DEAD
        if self.lifecycle:  # before it, a dead job says neither when nor why
            j.finished_at, j.reason = now, reason
        self.dead_total += 1
        self.ttl_expired += reason == "expired"

    def _fail(self, j: MJob, now: int, reason: str, retry_at: int) -> None:
        j.errors.append(reason)
        j.expires = 0
        if j.attempts >= self.cfg.max_attempts:
            self._die(j, now, "attempts exhausted")
        elif 0 < j.expires_at <= now:
            self._die(j, now, "expired")
        elif retry_at > now:
            j.state, j.ready_at = DELAYED, retry_at
        else:
            j.state, j.ready_at = READY, now

    def enqueue(
        self, specs: list[pb.JobSpec], now: int, tenant: str = ""
    ) -> list[tuple[int, bool]] | PQueueError:
        if tenant and tenant not in self.weights:
            return PermissionDeniedError("")
        out = []
        for s in specs:
            if s.idempotency_key and (tenant, s.idempotency_key) in self.dedup:
                out.append((self.dedup[tenant, s.idempotency_key][0], True))
                continue
            ready_at = max(now + s.delay_ms, s.not_before_ms)
            state = DELAYED if ready_at > now else READY
            j = MJob(self.next_id, s.priority, s.group, state, ready_at if ready_at > now else now)
            j.tenant = tenant
            ttl = self.cfg.job_ttl_ms
            j.expires_at = min((t for t in (s.expires_at_ms, ttl and now + ttl) if t), default=0)
            if 0 < j.expires_at <= now:
                self._die(j, now, "expired")
            self.jobs[j.id] = j
            self.next_id += 1
            if s.idempotency_key:
                self.dedup[tenant, s.idempotency_key] = (j.id, now + self.cfg.dedup_window_ms)
            out.append((j.id, False))
        return out

    def _eligible(self, j: MJob) -> bool:
        if j.state != READY:
            return False
        if not j.group:
            return True
        same = [o for o in self.jobs.values() if (o.tenant, o.group) == (j.tenant, j.group)]
        if any(o.state == LEASED for o in same):
            return False
        return j.id == min(o.id for o in same if o.state in (READY, DELAYED))

    def _key(self, j: MJob) -> tuple[int, int, int]:
        i = self.cfg.aging_interval_ms
        return (j.priority * i + j.ready_at if i else j.priority, j.ready_at, j.id)

    def lease(self, n: int, lease_ms: int, now: int) -> list[tuple[int, int]]:
        lease_ms = min(lease_ms or self.cfg.default_lease_ms, self.cfg.max_lease_total_ms)
        if self.paused:
            return []
        if self.cfg.max_inflight:
            leased = sum(1 for j in self.jobs.values() if j.state == LEASED)
            n = min(n, self.cfg.max_inflight - leased)
        if self.rate():
            n = min(n, self.bucket_now(now) // 1000)
        out = []
        for _ in range(n):
            ready = [j for j in self.jobs.values() if self._eligible(j)]
            if not ready:
                break
            j = self._fair_pick(ready)
            j.state, j.attempts = LEASED, j.attempts + 1
            j.lease_id, self.next_lease = self.next_lease, self.next_lease + 1
            j.leased_at, j.expires = now, now + lease_ms
            out.append((j.id, j.lease_id))
        if out and self.rate():
            self.bucket, self.bucket_at = self.bucket_now(now) - 1000 * len(out), now
        return out

    def _fair_pick(self, ready: list[MJob]) -> MJob:
        """Each tenant's most urgent job; of those with at least the priority of
        the most urgent one, the tenant with the least virtual time (never
        below the clock)."""
        heads = {}
        for t in {j.tenant for j in ready}:
            heads[t] = min((j for j in ready if j.tenant == t), key=self._key)
        level = min(heads.values(), key=self._key).priority
        near = [t for t, j in heads.items() if j.priority <= level]
        t = min(near, key=lambda t: (max(self.vtime.get(t, 0), self.vclock), t))
        start = max(self.vtime.get(t, 0), self.vclock)
        weight = self.weights.get(t, 1)
        self.vtime[t] = start + (FAIR_SCALE + weight - 1) // weight
        self.vclock = start
        return heads[t]

    def check(self, job_id: int, lease_id: int) -> MJob | PQueueError:
        j = self.jobs.get(job_id)
        if j is None and (job_id == 0 or job_id >= self.next_id):
            return NotFoundError("")
        if j is None or j.state != LEASED or j.lease_id != lease_id:
            return LeaseLostError("")
        return j


class MachineVsModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.d = Driver()
        self.delivered: list[tuple[int, int]] = []

    @initialize(
        aging=st.sampled_from([0, 100]),
        groups=st.booleans(),
        fifos=st.sampled_from([0, 2, 32]),
        records=st.sampled_from(["before", "kept", "none"]),
        rate=st.sampled_from([0.0, 0.0, 2.5, 10.0]),
        inflight=st.sampled_from([0, 0, 2, 4]),
        ttl=st.sampled_from([0, 0, 700]),
        retention=st.sampled_from([0, 900]),
    )
    def setup(
        self,
        aging: int,
        groups: bool,
        fifos: int,
        records: str,
        rate: float,
        inflight: int,
        ttl: int,
        retention: int,
    ) -> None:
        # How many priorities a lane keeps in the compact form: none (every
        # job an object in a heap), a few (both kinds mixed in one lane), all.
        self.fifos = jobs.MAX_FIFO_PRIORITIES
        jobs.MAX_FIFO_PRIORITIES = fifos
        # Tenants "a" and "b" share the queue, by 1:3 (its owner, "", weighs 1).
        config = pb.QueueConfig(
            max_attempts=3,
            default_lease_ms=1000,
            max_lease_total_ms=3000,
            backoff_base_ms=100,
            backoff_max_ms=1000,
            aging_interval_ms=aging,
            dedup_window_ms=500,
            shares=[pb.TenantShare(tenant="a", weight=1), pb.TenantShare(tenant="b", weight=3)],
        )
        # Records: a log from before the lifecycle switch (an action turns it
        # on later), records kept (a small cap and retention), or none kept.
        # With the lifecycle feature on: queue controls and dispatch limits.
        self.lifecycle = records != "before"
        if self.lifecycle:
            self.d = Driver(lifecycle=True)
            config.max_dispatch_per_s, config.max_inflight = rate, inflight
            config.job_ttl_ms, config.dead_retention_ms = ttl, retention
        if records == "kept":
            config.completed_max, config.completed_retention_ms = 4, 1500
        elif records == "none":
            config.completed_max = 0
        self.d.ok(create_queue=pb.CreateQueueRequest(queue="q", config=config))
        self.config = config
        self.model = Model(limits.effective_config(config, self.lifecycle), self.lifecycle)
        assert self.d.m.lifecycle == self.lifecycle
        self.groups = ["", "a", "b"] if groups else [""]

    def _step(self, **command: object) -> object:
        """Apply at the driver's time in both; return the machine's result."""
        self.model.advance(self.d.now)
        result = self.d.run(**command)
        self.d.m.next_due_ms()  # as a leader's tick loop does after each entry
        return result

    @rule(
        jobs=st.lists(
            st.tuples(
                st.integers(0, 3),
                st.sampled_from([0, 0, 50, 200]),
                st.integers(0, 2),
                st.sampled_from(["", "", "k1", "k2"]),
                # expires_at_ms, after now (0: already past; None: unset)
                st.sampled_from([None, None, None, 0, 150, 400, 1200]),
            ),
            min_size=1,
            max_size=3,
        ),
        tenant=st.sampled_from(["", "a", "b", "b", "c"]),
    )
    def enqueue(self, jobs: list[tuple[int, int, int, str, int | None]], tenant: str) -> None:
        specs = [
            pb.JobSpec(
                priority=p,
                delay_ms=dl,
                group=self.groups[g % len(self.groups)],
                idempotency_key=k,
                # An expiry is a lifecycle field: not in a log from before it.
                expires_at_ms=0 if ex is None or not self.model.lifecycle else self.d.now + ex,
            )
            for p, dl, g, k, ex in jobs
        ]
        caller = logpb.Caller(tenant=tenant) if tenant else None
        r = self._step(enqueue=pb.EnqueueBatchRequest(queue="q", jobs=specs), caller=caller)
        expected = self.model.enqueue(specs, self.d.now, tenant)
        if isinstance(expected, PQueueError):
            assert type(r) is type(expected)
            return
        assert isinstance(r, pb.EnqueueBatchResponse)
        assert [(x.job_id, x.duplicate) for x in r.results] == expected

    @rule(n=st.integers(1, 3), lease_ms=st.sampled_from([0, 100, 300]))
    def lease(self, n: int, lease_ms: int) -> None:
        r = self._step(lease=pb.LeaseRequest(queue="q", max_jobs=n, lease_ms=lease_ms))
        expected = self.model.lease(n, lease_ms, self.d.now)
        assert isinstance(r, pb.LeaseResponse)
        got = [(j.job_id, j.lease_id) for j in r.jobs]
        assert got == expected
        self.delivered += got

    def _pick(self, i: int) -> tuple[int, int]:
        return self.delivered[i % len(self.delivered)] if self.delivered else (99, 99)

    @rule(i=st.integers(0, 50), two=st.booleans())
    def ack(self, i: int, two: bool) -> None:
        picks = list(dict.fromkeys([self._pick(i), self._pick(i + 1)] if two else [self._pick(i)]))
        leases = [pb.JobLease(job_id=j, lease_id=lid) for j, lid in picks]
        if len({j for j, _ in picks}) < len(picks):
            return  # same job under two leases: covered by the unit tests
        if self.model.lifecycle:  # results are lifecycle fields: before it, a plain ack
            for lease in leases:
                lease.result = b"r%d" % lease.job_id
        r = self._step(ack=pb.AckRequest(queue="q", leases=leases))
        self.model.advance(self.d.now)
        checked = [self.model.check(j, lid) for j, lid in picks]
        errors = [c for c in checked if isinstance(c, PQueueError)]
        if errors:
            assert type(r) is type(errors[0])
            return
        assert r == pb.AckResponse(acked=len(picks))
        for c in checked:
            assert isinstance(c, MJob)
            result = b"r%d" % c.id if self.model.lifecycle else b""
            self.model.finish(c, COMPLETED, self.d.now, result, "")

    @rule(i=st.integers(0, 50), delay=st.sampled_from([None, 0, 100]))
    def nack(self, i: int, delay: int | None) -> None:
        job_id, lease_id = self._pick(i)
        req = pb.NackRequest(queue="q", job_id=job_id, lease_id=lease_id, reason="r")
        if delay is not None:
            req.delay_ms = delay
        r = self._step(nack=req)
        c = self.model.check(job_id, lease_id)
        if isinstance(c, PQueueError):
            assert type(r) is type(c)
            return
        wait = delay if delay is not None else backoff_ms(self.model.cfg, c.id, c.attempts)
        self.model._fail(c, self.d.now, "r", self.d.now + wait)
        assert isinstance(r, pb.NackResponse)
        assert r.state == c.state

    @rule(i=st.integers(0, 50), delay=st.sampled_from([None, 100]))
    def release(self, i: int, delay: int | None) -> None:
        job_id, lease_id = self._pick(i)
        req = pb.NackRequest(queue="q", job_id=job_id, lease_id=lease_id, release=True)
        if delay is not None:
            req.delay_ms = delay
        r = self._step(nack=req)
        c = self.model.check(job_id, lease_id)
        if isinstance(c, PQueueError):
            assert type(r) is type(c)
            return
        now = self.d.now
        c.attempts, c.expires = c.attempts - 1, 0
        if 0 < c.expires_at <= now:
            self.model._die(c, now, "expired")
        elif delay:
            c.state, c.ready_at = DELAYED, now + delay
        else:
            c.state, c.ready_at = READY, now
        assert isinstance(r, pb.NackResponse)
        assert r.state == c.state

    @rule(i=st.integers(0, 50), lease_ms=st.sampled_from([0, 150]))
    def extend(self, i: int, lease_ms: int) -> None:
        job_id, lease_id = self._pick(i)
        r = self._step(
            extend=pb.ExtendLeaseRequest(
                queue="q", job_id=job_id, lease_id=lease_id, lease_ms=lease_ms
            )
        )
        c = self.model.check(job_id, lease_id)
        if isinstance(c, PQueueError):
            assert type(r) is type(c)
            return
        cfg = self.model.cfg
        c.expires = min(
            self.d.now + (lease_ms or cfg.default_lease_ms), c.leased_at + cfg.max_lease_total_ms
        )
        assert isinstance(r, pb.ExtendLeaseResponse)
        assert r.lease_expires_at_ms == c.expires

    @rule(ms=st.sampled_from([1, 50, 100, 400, 1000]))
    def advance(self, ms: int) -> None:
        self.d.now += ms
        self._step(tick=logpb.Tick())

    @rule(which=st.integers(0, 20), everything=st.booleans())
    def redrive(self, which: int, everything: bool) -> None:
        dead = sorted(j.id for j in self.model.jobs.values() if j.state == DEAD)
        ids = [] if everything or not dead else [dead[which % len(dead)]]
        r = self._step(redrive=pb.RedriveRequest(queue="q", job_ids=ids))
        chosen = ids if ids else dead
        for job_id in chosen:
            j = self.model.jobs[job_id]
            j.state, j.attempts, j.ready_at = READY, 0, self.d.now
            j.finished_at, j.reason = 0, ""
            if j.expires_at <= self.d.now:
                j.expires_at = 0  # run it after all
        assert isinstance(r, pb.RedriveResponse)
        assert r.redriven == len(chosen)

    @rule()
    def delete_dead(self) -> None:
        r = self._step(delete_dead=pb.DeleteDeadRequest(queue="q"))
        dead = [j.id for j in self.model.jobs.values() if j.state == DEAD]
        for job_id in dead:
            del self.model.jobs[job_id]
        assert isinstance(r, pb.DeleteDeadResponse)
        assert r.deleted == len(dead)

    def _target(self, i: int) -> int:
        """A job the model holds (any state), or now and then one it does not."""
        ids = sorted(self.model.jobs)
        return ids[i % len(ids)] if ids and i % 7 else self.model.next_id + i % 2

    def _act(self, kind: str, allowed: tuple[int, ...], i: int, **fields: object) -> MJob | None:
        """Apply an operator action in both: the model's job if it was allowed."""
        job_id = self._target(i)
        request = getattr(
            pb,
            {
                "complete_job": "CompleteJobRequest",
                "cancel_job": "CancelJobRequest",
                "requeue_job": "RequeueJobRequest",
                "reprioritize_job": "ReprioritizeJobRequest",
            }[kind],
        )
        self.model.start_lifecycle(self.config)
        r = self._step(**{kind: request(queue="q", job_id=job_id, **fields)})
        self.model.advance(self.d.now)
        j = self.model.jobs.get(job_id)
        if j is None:
            assert isinstance(r, NotFoundError), r
            return None
        if j.state not in allowed:
            assert isinstance(r, FailedPreconditionError), r
            return None
        assert isinstance(r, pb.JobActionResponse), r
        return j

    @rule(i=st.integers(0, 60))
    def complete(self, i: int) -> None:
        j = self._act("complete_job", (READY, DELAYED, LEASED, DEAD), i, note="n", result=b"c")
        if j is not None:
            self.model.finish(j, COMPLETED, self.d.now, b"c", "n")

    @rule(i=st.integers(0, 60))
    def cancel(self, i: int) -> None:
        j = self._act("cancel_job", (READY, DELAYED, LEASED), i)
        if j is not None:
            self.model.finish(j, CANCELLED, self.d.now, b"", "cancelled")

    @rule(i=st.integers(0, 60), delay=st.sampled_from([0, 0, 100]))
    def requeue(self, i: int, delay: int) -> None:
        j = self._act("requeue_job", (DEAD, COMPLETED, CANCELLED), i, delay_ms=delay)
        if j is not None:
            j.attempts, j.finished_at, j.result, j.reason = 0, 0, b"", ""
            if j.expires_at <= self.d.now:
                j.expires_at = 0  # run it after all, as a redrive does
            j.state = DELAYED if delay else READY
            j.ready_at = self.d.now + delay

    @rule(
        i=st.integers(0, 60),
        priority=st.sampled_from([None, 0, 3]),
        shift=st.sampled_from([None, -50, 0, 200]),
    )
    def reprioritize(self, i: int, priority: int | None, shift: int | None) -> None:
        if priority is None and shift is None:
            return  # refused before the state: covered by the unit tests
        fields: dict[str, int] = {}
        if priority is not None:
            fields["priority"] = priority
        if shift is not None:
            fields["ready_at_ms"] = self.d.now + shift
        j = self._act("reprioritize_job", (READY, DELAYED), i, **fields)
        if j is None:
            return
        if priority is not None:
            j.priority = priority
        ready_at = self.d.now + shift if shift is not None else j.ready_at
        j.state, j.ready_at = (DELAYED if ready_at > self.d.now else READY), ready_at

    @precondition(lambda self: getattr(self, "lifecycle", False))
    @rule()
    def pause(self) -> None:
        r = self._step(pause_queue=pb.PauseQueueRequest(queue="q"))
        assert r == pb.PauseQueueResponse(changed=not self.model.paused)
        self.model.paused = True

    @precondition(lambda self: getattr(self, "lifecycle", False))
    @rule()
    def resume(self) -> None:
        r = self._step(resume_queue=pb.ResumeQueueRequest(queue="q"))
        assert r == pb.ResumeQueueResponse(changed=self.model.paused)
        self.model.paused = False

    @precondition(lambda self: getattr(self, "lifecycle", False))
    @rule(
        changes=st.dictionaries(
            st.sampled_from(
                [
                    "aging_interval_ms",
                    "max_attempts",
                    "max_inflight",
                    "max_dispatch_per_s",
                    "shares",
                ]
            ),
            st.integers(0, 3),
            min_size=1,
        )
    )
    def update(self, changes: dict[str, int]) -> None:
        values: dict[str, object] = {
            "aging_interval_ms": [0, 1, 100, 1000][changes.get("aging_interval_ms", 0)],
            "max_attempts": [2, 3, 4, 6][changes.get("max_attempts", 0)],
            "max_inflight": [0, 1, 2, 5][changes.get("max_inflight", 0)],
            "max_dispatch_per_s": [0.0, 1.0, 2.5, 20.0][changes.get("max_dispatch_per_s", 0)],
            "shares": [
                [pb.TenantShare(tenant="a", weight=w), pb.TenantShare(tenant="b", weight=3)]
                for w in (1, 2, 5, 9)
            ][changes.get("shares", 0)],
        }
        mask = sorted(changes)
        config = pb.QueueConfig(**{name: values[name] for name in mask})  # type: ignore[arg-type]
        r = self._step(
            update_queue=pb.UpdateQueueRequest(queue="q", config=config, update_mask=mask)
        )
        cfg = pb.QueueConfig()
        cfg.CopyFrom(self.model.cfg)
        for name in mask:
            if name == "shares":
                del cfg.shares[:]
                cfg.shares.extend(values["shares"])  # type: ignore[arg-type]
            else:
                setattr(cfg, name, values[name])
        assert isinstance(r, pb.UpdateQueueResponse)
        assert r.config == cfg
        self.model.update(cfg, self.d.now)

    @rule()
    def invalid_enqueue_changes_nothing(self) -> None:
        before = self.d.state()
        r = self.d.run(
            enqueue=pb.EnqueueBatchRequest(queue="q", jobs=[pb.JobSpec(), pb.JobSpec(delay_ms=-1)])
        )
        assert isinstance(r, InvalidArgumentError)
        assert self.d.state() == before

    @rule()
    def snapshot_and_restore(self) -> None:
        before = state_hash(self.d.m)
        self.d.m = restore(snapshot_bytes(self.d.m))
        assert state_hash(self.d.m) == before

    def teardown(self) -> None:
        if hasattr(self, "fifos"):
            jobs.MAX_FIFO_PRIORITIES = self.fifos

    @invariant()
    def same_jobs(self) -> None:
        if not hasattr(self, "model"):
            return
        q = self.d.m.queues["q"]
        got = {
            j.job_id: (
                j.state,
                j.attempts,
                j.ready_at_ms,
                j.lease_id if j.state == LEASED else 0,
                j.lease_expires_at_ms,
                j.priority,
                j.group,
                [e[2] for e in j.errors],
                j.tenant,
                j.expires_at_ms,
                j.finished_at_ms,
                j.result,
                j.reason,
            )
            for j in q.jobs.values()
        }
        want = {
            j.id: (
                j.state,
                j.attempts,
                j.ready_at,
                j.lease_id if j.state == LEASED else 0,
                j.expires,
                j.priority,
                j.group,
                j.errors,
                j.tenant,
                j.expires_at,
                j.finished_at,
                j.result,
                j.reason,
            )
            for j in self.model.jobs.values()
        }
        assert got == want
        stats = q.stats(self.d.now)
        for state, count in (
            (READY, stats.ready),
            (DELAYED, stats.delayed),
            (LEASED, stats.leased),
            (DEAD, stats.dead),
            (COMPLETED, stats.completed),
            (CANCELLED, stats.cancelled),
        ):
            assert count == sum(1 for j in self.model.jobs.values() if j.state == state)
        assert (stats.dead_total, stats.ttl_expired_total) == (
            self.model.dead_total,
            self.model.ttl_expired,
        )
        ready_at = [j.ready_at for j in self.model.jobs.values() if j.state == READY]
        assert q.oldest_ready_at() == (min(ready_at) if ready_at else None)
        assert stats.paused == self.model.paused
        assert (q.dispatch_tokens, q.dispatch_at_ms) == (self.model.bucket, self.model.bucket_at)


TestMachineVsModel = MachineVsModel.TestCase
TestMachineVsModel.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
