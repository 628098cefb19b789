"""The state machine against a naive reference model (hypothesis stateful test).

The model keeps jobs in a dict and answers every question by scanning, in the
plainest reading of README "Semantics" (and of fair sharing between tenants:
``QueueConfig.shares``). The machine, with its heaps, lazy deletion
and group bookkeeping, must agree with it after every step, including after
being replaced by a restore of its own snapshot.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from pqueue.core import jobs, limits
from pqueue.core.jobs import FAIR_SCALE, backoff_ms
from pqueue.core.snapshot import restore, snapshot_bytes, state_hash
from pqueue.errors import (
    InvalidArgumentError,
    LeaseLostError,
    NotFoundError,
    PermissionDeniedError,
    PQueueError,
)
from pqueue.v1 import log_pb2 as logpb
from pqueue.v1 import queue_pb2 as pb
from tests.machine_driver import Driver

READY, DELAYED, LEASED, DEAD = (
    pb.JOB_STATE_READY,
    pb.JOB_STATE_DELAYED,
    pb.JOB_STATE_LEASED,
    pb.JOB_STATE_DEAD,
)


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
    #: When it dies unleased ("expired"), 0: never; when it died, and why.
    expires_at: int = 0
    finished_at: int = 0
    reason: str = ""


class Model:
    """README "Semantics" by brute force."""

    def __init__(self, config: pb.QueueConfig) -> None:
        self.cfg = config
        self.jobs: dict[int, MJob] = {}
        self.next_id = 1
        self.next_lease = 1
        self.dedup: dict[tuple[str, str], tuple[int, int]] = {}
        self.weights = {s.tenant: s.weight for s in config.shares}
        #: Fair sharing: each tenant's virtual time, and the queue's clock.
        self.vtime: dict[str, int] = {}
        self.vclock = 0
        self.dead_total = 0
        self.ttl_expired = 0

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

    def _die(self, j: MJob, now: int, reason: str) -> None:
        j.state, j.finished_at, j.reason = DEAD, now, reason
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
        self.d = Driver(lifecycle=True)
        self.delivered: list[tuple[int, int]] = []

    @initialize(
        aging=st.sampled_from([0, 100]),
        groups=st.booleans(),
        fifos=st.sampled_from([0, 2, 32]),
        ttl=st.sampled_from([0, 0, 700]),
        retention=st.sampled_from([0, 900]),
    )
    def setup(self, aging: int, groups: bool, fifos: int, ttl: int, retention: int) -> None:
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
            job_ttl_ms=ttl,
            dead_retention_ms=retention,
            shares=[pb.TenantShare(tenant="a", weight=1), pb.TenantShare(tenant="b", weight=3)],
        )
        self.d.ok(create_queue=pb.CreateQueueRequest(queue="q", config=config))
        self.model = Model(limits.effective_config(config))
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
                expires_at_ms=0 if ex is None else self.d.now + ex,
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
            del self.model.jobs[c.id]

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
        ):
            assert count == sum(1 for j in self.model.jobs.values() if j.state == state)
        assert (stats.dead_total, stats.ttl_expired_total) == (
            self.model.dead_total,
            self.model.ttl_expired,
        )
        ready_at = [j.ready_at for j in self.model.jobs.values() if j.state == READY]
        assert q.oldest_ready_at() == (min(ready_at) if ready_at else None)


TestMachineVsModel = MachineVsModel.TestCase
TestMachineVsModel.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
