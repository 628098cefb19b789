"""The queue state machine, rule by rule (docs/semantics.md)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from pqueue.core import limits
from pqueue.core.jobs import backoff_ms
from pqueue.errors import (
    AlreadyExistsError,
    InvalidArgumentError,
    LeaseLostError,
    NotFoundError,
    ResourceExhaustedError,
)
from pqueue.v1 import log_pb2 as logpb
from pqueue.v1 import queue_pb2 as pb
from tests.machine_driver import Driver


@pytest.fixture
def d() -> Driver:
    return Driver()


def test_lower_priority_number_is_served_first(d: Driver) -> None:
    late_urgent = d.enqueue(priority=5)
    d.now += 1
    urgent = d.enqueue(priority=0)
    assert [j.job_id for j in d.lease(n=2)] == [urgent, late_urgent]


def test_fifo_within_a_priority(d: Driver) -> None:
    ids = []
    for _ in range(5):
        ids.append(d.enqueue(priority=2))
        d.now += 1
    assert [j.job_id for j in d.lease(n=5)] == ids


def test_aging_lets_an_old_low_priority_job_overtake_fresh_urgent_ones(d: Driver) -> None:
    d.create(aging_interval_ms=1000)
    old = d.enqueue(priority=5)
    d.now += 4_000  # not yet worth 5 levels: fresh priority 0 still wins
    fresh = d.enqueue(priority=0)
    assert d.lease()[0].job_id == fresh
    d.now += 2_000  # now 6 s old: 5 * 1000 + t0 < 0 * 1000 + t_now
    d.enqueue(priority=0)
    assert d.lease()[0].job_id == old


def test_without_aging_priority_is_strict(d: Driver) -> None:
    old = d.enqueue(priority=5)
    d.now += 10**9
    fresh = d.enqueue(priority=0)
    assert [j.job_id for j in d.lease(n=2)] == [fresh, old]


def test_delayed_job_is_not_leased_before_it_is_due(d: Driver) -> None:
    job = d.enqueue(delay_ms=500)
    assert d.lease() == []
    assert d.m.stats("q", d.now)[0].delayed == 1
    d.now += 500
    assert d.lease()[0].job_id == job


def test_not_before_is_an_absolute_time(d: Driver) -> None:
    job = d.enqueue(not_before_ms=d.now + 1000)
    d.now += 999
    assert d.lease() == []
    d.now += 1
    assert d.lease()[0].job_id == job


def test_each_delivery_gets_a_fresh_larger_lease_id(d: Driver) -> None:
    d.enqueue()
    first = d.lease(lease_ms=100)[0]
    d.now += 100  # lease expires
    second = d.lease()[0]
    assert second.job_id == first.job_id
    assert second.lease_id > first.lease_id
    assert second.attempt == 2


def test_stale_lease_id_is_refused_and_changes_nothing(d: Driver) -> None:
    d.enqueue()
    first = d.lease(lease_ms=100)[0]
    d.now += 100
    d.lease()
    before = d.state()
    assert isinstance(d.ack(first), LeaseLostError)
    assert isinstance(d.nack(first), LeaseLostError)
    assert d.state() == before


def test_ack_completes_and_a_second_ack_is_refused(d: Driver) -> None:
    d.enqueue()
    job = d.lease()[0]
    assert d.ack(job) == pb.AckResponse(acked=1)
    assert isinstance(d.ack(job), LeaseLostError)
    assert d.m.stats("q", d.now)[0].acked_total == 1


def test_ack_is_atomic_over_several_leases(d: Driver) -> None:
    d.enqueue()
    d.enqueue()
    a, b = d.lease(n=2)
    before = d.state()
    leases = [
        pb.JobLease(job_id=a.job_id, lease_id=a.lease_id),
        pb.JobLease(job_id=b.job_id, lease_id=999),
    ]
    assert isinstance(d.run(ack=pb.AckRequest(queue="q", leases=leases)), LeaseLostError)
    assert d.state() == before


def test_unknown_job_is_not_found_but_a_finished_one_is_a_lost_lease(d: Driver) -> None:
    d.enqueue()
    job = d.lease()[0]
    d.ack(job)
    ghost = pb.LeasedJob(job_id=12345, lease_id=1)
    assert isinstance(d.ack(ghost), NotFoundError)
    assert isinstance(d.ack(job), LeaseLostError)


def test_expired_lease_makes_the_job_ready_again_in_the_log(d: Driver) -> None:
    d.enqueue()
    job = d.lease(lease_ms=1000)[0]
    d.tick(999)
    assert d.m.stats("q", d.now)[0].leased == 1
    d.tick(1)
    s = d.m.stats("q", d.now)[0]
    assert (s.ready, s.leased, s.expired_total) == (1, 0, 1)
    assert d.m.get_job("q", job.job_id).errors[0].reason == "lease expired"


def test_extend_moves_expiry_but_not_past_the_total_cap(d: Driver) -> None:
    d.create(default_lease_ms=1000, max_lease_total_ms=2500)
    d.enqueue()
    job = d.lease()[0]
    leased_at = d.now
    d.now += 800
    r = d.ok(extend=pb.ExtendLeaseRequest(queue="q", job_id=job.job_id, lease_id=job.lease_id))
    assert (r.lease_expires_at_ms, r.capped) == (d.now + 1000, False)
    d.now += 900
    r = d.ok(extend=pb.ExtendLeaseRequest(queue="q", job_id=job.job_id, lease_id=job.lease_id))
    assert (r.lease_expires_at_ms, r.capped) == (leased_at + 2500, True)
    d.tick(2500 - 1700 - 1)
    assert d.m.stats("q", d.now)[0].leased == 1
    d.tick(1)
    assert d.m.stats("q", d.now)[0].leased == 0


def test_extension_keeps_the_job_past_its_first_expiry(d: Driver) -> None:
    d.enqueue()
    job = d.lease(lease_ms=1000)[0]
    d.now += 500
    d.ok(
        extend=pb.ExtendLeaseRequest(
            queue="q", job_id=job.job_id, lease_id=job.lease_id, lease_ms=5000
        )
    )
    d.tick(1000)
    assert d.m.stats("q", d.now)[0].leased == 1
    assert d.ack(job) == pb.AckResponse(acked=1)


def test_nack_with_explicit_delay(d: Driver) -> None:
    d.enqueue()
    job = d.lease()[0]
    r = d.nack(job, delay_ms=700, reason="db down")
    assert (r.state, r.ready_at_ms) == (pb.JOB_STATE_DELAYED, d.now + 700)
    assert d.lease() == []
    d.now += 700
    again = d.lease()[0]
    assert again.attempt == 2
    assert d.m.get_job("q", job.job_id).errors[0].reason == "db down"


def test_nack_without_delay_uses_deterministic_backoff(d: Driver) -> None:
    d.create(backoff_base_ms=1000, backoff_max_ms=60_000)
    d.enqueue()
    delays = []
    for attempt in (1, 2, 3):
        job = d.lease()[0]
        r = d.nack(job)
        delays.append(r.ready_at_ms - d.now)
        d.now = r.ready_at_ms
        cfg = d.m.queues["q"].config
        assert delays[-1] == backoff_ms(cfg, job.job_id, attempt)
        base = 1000 * 2 ** (attempt - 1)
        assert base // 2 <= delays[-1] <= base


def test_backoff_is_capped_and_deterministic() -> None:
    cfg = limits.effective_config(pb.QueueConfig(backoff_base_ms=1000, backoff_max_ms=5000))
    assert all(2500 <= backoff_ms(cfg, 7, a) <= 5000 for a in range(4, 80))
    assert backoff_ms(cfg, 7, 3) == backoff_ms(cfg, 7, 3)
    assert len({backoff_ms(cfg, j, 5) for j in range(50)}) > 10  # jitter spreads jobs


def test_max_attempts_makes_the_job_dead_with_its_history(d: Driver) -> None:
    d.create(max_attempts=3)
    d.enqueue()
    for i in range(3):
        job = d.lease()[0]
        r = d.nack(job, delay_ms=0, reason=f"boom {i}")
    assert r.state == pb.JOB_STATE_DEAD
    assert d.lease() == []
    dead = d.m.list_dead("q", 10, 0)
    assert [e.reason for e in dead.jobs[0].errors] == ["boom 0", "boom 1", "boom 2"]
    assert d.m.stats("q", d.now)[0].dead == 1


def test_expiry_counts_toward_max_attempts(d: Driver) -> None:
    d.create(max_attempts=2)
    d.enqueue()
    d.lease(lease_ms=10)
    d.tick(10)
    d.lease(lease_ms=10)
    d.tick(10)
    assert d.m.stats("q", d.now)[0].dead == 1


def test_redrive_resets_attempts_and_keeps_history(d: Driver) -> None:
    d.create(max_attempts=1)
    a = d.enqueue()
    b = d.enqueue()
    for job in d.lease(n=2):
        d.nack(job, reason="bad")
    assert d.ok(redrive=pb.RedriveRequest(queue="q", job_ids=[a])).redriven == 1
    job = d.lease()[0]
    assert (job.job_id, job.attempt) == (a, 1)
    assert len(d.m.get_job("q", a).errors) == 1
    assert d.ok(redrive=pb.RedriveRequest(queue="q")).redriven == 1  # all: just b
    assert d.lease()[0].job_id == b


def test_delete_dead_all_or_some(d: Driver) -> None:
    d.create(max_attempts=1)
    ids = [d.enqueue() for _ in range(3)]
    for job in d.lease(n=3):
        d.nack(job)
    assert d.ok(delete_dead=pb.DeleteDeadRequest(queue="q", job_ids=[ids[0]])).deleted == 1
    assert d.ok(delete_dead=pb.DeleteDeadRequest(queue="q")).deleted == 2
    assert d.m.stats("q", d.now)[0].dead == 0


def test_list_dead_paginates_by_id(d: Driver) -> None:
    d.create(max_attempts=1)
    for _ in range(5):
        d.enqueue()
    for job in d.lease(n=5):
        d.nack(job)
    page = d.m.list_dead("q", 2, 0)
    ids = [j.job_id for j in page.jobs]
    while page.next_after_job_id:
        page = d.m.list_dead("q", 2, page.next_after_job_id)
        ids += [j.job_id for j in page.jobs]
    assert ids == [1, 2, 3, 4, 5]


def test_idempotency_key_returns_the_first_job_within_the_window(d: Driver) -> None:
    d.create(dedup_window_ms=1000)
    first = d.enqueue(idempotency_key="order-7")
    d.now += 999
    r = d.ok(
        enqueue=pb.EnqueueBatchRequest(queue="q", jobs=[pb.JobSpec(idempotency_key="order-7")])
    )
    assert (r.results[0].job_id, r.results[0].duplicate) == (first, True)
    assert d.m.stats("q", d.now)[0].ready == 1
    d.now += 1
    assert d.enqueue(idempotency_key="order-7") != first


def test_duplicate_keys_within_one_batch_collapse(d: Driver) -> None:
    specs = [pb.JobSpec(idempotency_key="k"), pb.JobSpec(idempotency_key="k")]
    r = d.ok(enqueue=pb.EnqueueBatchRequest(queue="q", jobs=specs))
    assert [x.duplicate for x in r.results] == [False, True]
    assert r.results[0].job_id == r.results[1].job_id


def test_group_is_fifo_with_one_in_flight(d: Driver) -> None:
    g1 = d.enqueue(group="user-1", priority=9)
    g2 = d.enqueue(group="user-1", priority=0)
    other = d.enqueue(priority=5)
    leased = d.lease(n=3)
    # user-1's first job goes out alone; its urgent second waits behind it.
    assert [j.job_id for j in leased] == [other, g1]
    d.ack(leased[1])
    assert d.lease()[0].job_id == g2


def test_nacked_group_head_stays_first(d: Driver) -> None:
    g1 = d.enqueue(group="g")
    d.enqueue(group="g")
    job = d.lease()[0]
    d.nack(job, delay_ms=100)
    assert d.lease() == []  # g1 waits for its delay; g2 may not pass it
    d.now += 100
    assert d.lease()[0].job_id == g1


def test_dead_group_head_frees_the_group(d: Driver) -> None:
    d.create(max_attempts=1)
    d.enqueue(group="g")
    g2 = d.enqueue(group="g")
    d.nack(d.lease()[0])
    assert d.lease()[0].job_id == g2


def test_priority_bounds_and_payload_limit(d: Driver) -> None:
    d.create(min_priority=0, max_priority=9, max_payload_bytes=4)
    bad_priority = d.run(enqueue=pb.EnqueueBatchRequest(queue="q", jobs=[pb.JobSpec(priority=10)]))
    assert isinstance(bad_priority, InvalidArgumentError)
    assert bad_priority.field == "jobs[0].priority"
    too_big = d.run(enqueue=pb.EnqueueBatchRequest(queue="q", jobs=[pb.JobSpec(payload=b"12345")]))
    assert isinstance(too_big, InvalidArgumentError)
    assert too_big.field == "jobs[0].payload"


def test_a_bad_job_refuses_the_whole_batch(d: Driver) -> None:
    d.create(max_priority=5)
    before = d.state()
    jobs = [pb.JobSpec(priority=1), pb.JobSpec(priority=6)]
    assert isinstance(
        d.run(enqueue=pb.EnqueueBatchRequest(queue="q", jobs=jobs)), InvalidArgumentError
    )
    assert d.state() == before


def test_default_payload_limit_is_one_mebibyte(d: Driver) -> None:
    d.enqueue(payload=b"x" * (1 << 20))
    r = d.run(
        enqueue=pb.EnqueueBatchRequest(queue="q", jobs=[pb.JobSpec(payload=b"x" * ((1 << 20) + 1))])
    )
    assert isinstance(r, InvalidArgumentError)


def test_enqueue_creates_the_queue_with_defaults(d: Driver) -> None:
    d.enqueue(queue="fresh")
    assert d.m.queues["fresh"].config == limits.effective_config(pb.QueueConfig(), d.m.lifecycle)


def test_create_queue_is_idempotent_but_refuses_a_different_config(d: Driver) -> None:
    assert d.create(max_attempts=3).created
    assert not d.create(max_attempts=3).created
    assert isinstance(d.create(max_attempts=4), AlreadyExistsError)


def test_invalid_configs_are_refused(d: Driver) -> None:
    assert isinstance(d.create(default_lease_ms=10, max_lease_total_ms=5), InvalidArgumentError)
    assert isinstance(d.create(min_priority=5, max_priority=1), InvalidArgumentError)
    assert isinstance(d.create(max_payload_bytes=1 << 30), InvalidArgumentError)
    assert d.m.queues == {}


def test_unknown_queue_is_not_found(d: Driver) -> None:
    assert isinstance(d.run(lease=pb.LeaseRequest(queue="nope")), NotFoundError)
    assert isinstance(d.run(purge=pb.PurgeQueueRequest(queue="nope")), NotFoundError)
    with pytest.raises(NotFoundError):
        d.m.get_job("nope", 1)


def test_purge_keeps_leased_and_dead_jobs(d: Driver) -> None:
    d.create(max_attempts=1)
    d.enqueue()
    d.enqueue()
    d.enqueue(delay_ms=10_000)
    d.enqueue()
    a, b = d.lease(n=2)
    d.nack(b)  # dead
    assert d.ok(purge=pb.PurgeQueueRequest(queue="q")).purged == 2
    s = d.m.stats("q", d.now)[0]
    assert (s.ready, s.delayed, s.leased, s.dead) == (0, 0, 1, 1)
    assert d.ack(a) == pb.AckResponse(acked=1)


def test_delete_queue_makes_its_leases_stale(d: Driver) -> None:
    d.enqueue()
    job = d.lease()[0]
    assert d.ok(delete_queue=pb.DeleteQueueRequest(queue="q")).deleted_jobs == 1
    assert isinstance(d.ack(job), NotFoundError)
    assert d.m.job_count() == 0


def test_delete_when_idle_drops_the_queue_after_its_last_job(d: Driver) -> None:
    d.create(delete_when_idle=True)
    d.enqueue()
    assert "q" in d.m.queues
    d.ack(d.lease()[0])
    assert "q" not in d.m.queues


def test_time_never_runs_backwards(d: Driver) -> None:
    d.enqueue(delay_ms=100)
    d.now -= 10_000  # a proposer with a slow clock
    d.tick()
    d.now += 10_100
    assert d.lease() != []


def test_oldest_ready_age(d: Driver) -> None:
    d.enqueue()
    d.now += 250
    d.enqueue()
    assert d.m.stats("q", d.now + 50)[0].oldest_ready_age_ms == 300


def test_entries_must_follow_in_order(d: Driver) -> None:
    from pqueue.v1 import log_pb2 as logpb

    with pytest.raises(ValueError, match="applied after"):
        d.m.apply_entry(logpb.LogEntry(index=5, time_ms=d.now))


def test_release_gives_the_attempt_back_and_never_kills(d: Driver) -> None:
    d.create(max_attempts=1)
    d.enqueue()
    job = d.lease()[0]
    r = d.nack(job, release=True)
    assert (r.state, r.attempts) == (pb.JOB_STATE_READY, 0)
    again = d.lease()[0]
    assert (again.job_id, again.attempt) == (job.job_id, 1)
    assert list(d.m.get_job("q", job.job_id).errors) == []


def test_a_lease_response_stops_at_its_byte_budget(d: Driver) -> None:
    d.create(max_payload_bytes=limits.MAX_PAYLOAD_BYTES_LIMIT)
    big = b"x" * (6 << 20)
    for _ in range(4):
        d.enqueue(payload=big)
    got = d.lease(n=10)
    assert len(got) == 3  # 18 MiB: past the 16 MiB budget after the third
    assert sum(len(j.payload) for j in got) < limits.MAX_MESSAGE_BYTES


def test_delete_when_idle_keeps_the_queue_while_keys_are_live(d: Driver) -> None:
    d.create(delete_when_idle=True, dedup_window_ms=1000)
    first = d.enqueue(idempotency_key="k")
    d.ack(d.lease()[0])
    assert "q" in d.m.queues  # its key still guards against a twin
    assert d.enqueue(idempotency_key="k") == first
    d.tick(1000)
    assert "q" not in d.m.queues


def test_oldest_ready_counts_jobs_behind_their_group_head(d: Driver) -> None:
    from pqueue.core.snapshot import restore, snapshot_bytes

    d.enqueue(group="g")
    d.now += 100
    d.enqueue(group="g")
    d.lease()  # the head is in flight; the second waits, READY, behind it
    d.now += 400
    assert d.m.stats("q", d.now)[0].oldest_ready_age_ms == 400
    assert restore(snapshot_bytes(d.m)).stats("q", d.now)[0].oldest_ready_age_ms == 400


def test_heaps_stay_bounded_under_churn(d: Driver) -> None:
    for _ in range(3000):
        d.enqueue()
        d.ack(d.lease()[0])
    q = d.m.queues["q"]
    assert q.entries == sum(len(lane.ready) for lane in q.lanes.values()) < 200
    assert len(q.oldest) < 200
    assert len(d.m._leases) < 3000


def test_queues_are_bounded_and_the_refusal_changes_nothing(
    d: Driver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(limits, "MAX_QUEUES", 2)
    d.create("a")
    d.enqueue("b")
    before = d.state()
    for command in (
        {"create_queue": pb.CreateQueueRequest(queue="c")},
        {"enqueue": pb.EnqueueBatchRequest(queue="c", jobs=[pb.JobSpec(payload=b"x")])},
    ):
        assert isinstance(d.run(**command), ResourceExhaustedError)
    assert d.state() == before
    d.enqueue("a")  # existing queues take jobs as before


def _limited(d: Driver, **bound: int) -> Callable[..., object]:
    def run(**command: object) -> object:
        return d.run(**command, limits=logpb.TenantLimits(**bound))

    return run


def test_stamped_tenant_limits_bound_depth_leases_and_payload(d: Driver) -> None:
    run = _limited(d, max_queue_depth=3, max_inflight_leases=2, max_payload_bytes=4)
    jobs = [pb.JobSpec(payload=b"x", idempotency_key=k) for k in ("a", "b")]
    assert not isinstance(run(enqueue=pb.EnqueueBatchRequest(queue="t/q", jobs=jobs)), Exception)
    before = d.state()
    two_more = [pb.JobSpec(payload=b"x"), pb.JobSpec(payload=b"y")]
    refused = run(enqueue=pb.EnqueueBatchRequest(queue="t/q", jobs=two_more))
    assert isinstance(refused, ResourceExhaustedError)  # 2 + 2 > 3: none of them
    assert refused.retriable
    assert d.state() == before
    # Retrying a key already in the queue adds nothing, so it fits.
    again = run(enqueue=pb.EnqueueBatchRequest(queue="t/q", jobs=[*jobs, pb.JobSpec(payload=b"z")]))
    assert not isinstance(again, Exception)
    big = run(enqueue=pb.EnqueueBatchRequest(queue="t/p", jobs=[pb.JobSpec(payload=b"12345")]))
    assert isinstance(big, InvalidArgumentError)
    leased = run(lease=pb.LeaseRequest(queue="t/q", max_jobs=10))
    assert isinstance(leased, pb.LeaseResponse)
    assert len(leased.jobs) == 2  # capped by the tenant's in-flight limit
    assert isinstance(run(lease=pb.LeaseRequest(queue="t/q")), ResourceExhaustedError)
    # Another tenant's leases do not count against this one.
    d.ok(enqueue=pb.EnqueueBatchRequest(queue="u/q", jobs=[pb.JobSpec(payload=b"x")]))
    assert len(run(lease=pb.LeaseRequest(queue="u/q")).jobs) == 1  # type: ignore[attr-defined]
    # Without a stamp (auth off, no quotas) nothing is bounded.
    d.ok(enqueue=pb.EnqueueBatchRequest(queue="t/q", jobs=two_more))


def test_dead_jobs_count_towards_depth_and_queues_per_tenant_are_bounded(d: Driver) -> None:
    run = _limited(d, max_queue_depth=2, max_queues=2)
    d.ok(create_queue=pb.CreateQueueRequest(queue="t/q", config=pb.QueueConfig(max_attempts=1)))
    for _ in range(2):  # each job dies on its first nack: dead jobs must fill the queue
        assert not isinstance(
            run(enqueue=pb.EnqueueBatchRequest(queue="t/q", jobs=[pb.JobSpec(payload=b"x")])),
            Exception,
        )
        [job] = d.lease("t/q")
        d.nack(job, queue="t/q")
    full = run(enqueue=pb.EnqueueBatchRequest(queue="t/q", jobs=[pb.JobSpec(payload=b"x")]))
    assert isinstance(full, ResourceExhaustedError)
    one = pb.EnqueueBatchRequest(queue="t/r", jobs=[pb.JobSpec(payload=b"x")])
    assert not isinstance(run(enqueue=one), Exception)  # the tenant's second queue
    third = run(enqueue=pb.EnqueueBatchRequest(queue="t/s", jobs=[pb.JobSpec(payload=b"x")]))
    assert isinstance(third, ResourceExhaustedError)
    assert "t/s" not in d.m.queues
    d.ok(enqueue=pb.EnqueueBatchRequest(queue="u/s", jobs=[pb.JobSpec(payload=b"x")]))  # not u's


def test_unprefixed_queues_share_one_lease_limit(d: Driver) -> None:
    run = _limited(d, max_inflight_leases=2)
    for name in ("a", "b"):
        d.ok(enqueue=pb.EnqueueBatchRequest(queue=name, jobs=[pb.JobSpec(payload=b"x")] * 2))
    assert len(run(lease=pb.LeaseRequest(queue="a", max_jobs=2)).jobs) == 2  # type: ignore[attr-defined]
    assert isinstance(run(lease=pb.LeaseRequest(queue="b")), ResourceExhaustedError)
