"""Completed records and the operator actions on one job (docs/semantics.md "The life
of a job"): acked jobs kept with their results, force-complete, cancel,
requeue, reprioritize, and what each refuses."""

from __future__ import annotations

from typing import Any

import pytest

from pqueue.core.snapshot import restore, snapshot_bytes, state_hash
from pqueue.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    LeaseLostError,
    NotFoundError,
    ResourceExhaustedError,
)
from pqueue.v1 import log_pb2 as logpb
from pqueue.v1 import queue_pb2 as pb
from tests.machine_driver import Driver

COMPLETED = pb.JOB_STATE_COMPLETED
CANCELLED = pb.JOB_STATE_CANCELLED


@pytest.fixture
def d() -> Driver:
    return Driver(lifecycle=True)


def _ack(d: Driver, job: pb.LeasedJob, result: bytes = b"", queue: str = "q") -> Any:
    lease = pb.JobLease(job_id=job.job_id, lease_id=job.lease_id, result=result)
    return d.run(ack=pb.AckRequest(queue=queue, leases=[lease]))


def _job(d: Driver, job_id: int, queue: str = "q") -> pb.Job:
    return d.m.get_job(queue, job_id)


def _action(d: Driver, kind: str, job_id: int, queue: str = "q", **fields: Any) -> Any:
    request = {
        "complete_job": pb.CompleteJobRequest,
        "cancel_job": pb.CancelJobRequest,
        "requeue_job": pb.RequeueJobRequest,
        "reprioritize_job": pb.ReprioritizeJobRequest,
    }[kind]
    return d.run(**{kind: request(queue=queue, job_id=job_id, **fields)})


# ------------------------------------------------------------ completed records


def test_an_acked_job_stays_completed_with_its_result(d: Driver) -> None:
    job_id = d.enqueue(payload=b"work")
    (leased,) = d.lease()
    d.now += 5
    assert _ack(d, leased, b"ok").acked == 1

    job = _job(d, job_id)
    assert job.state == COMPLETED
    assert (job.result, job.finished_at_ms, job.attempts) == (b"ok", d.now, 1)
    assert job.payload == b"work"
    assert job.lease_expires_at_ms == 0
    stats = d.m.stats("q", d.now)[0]
    assert (stats.ready, stats.leased, stats.completed) == (0, 0, 1)
    assert (stats.acked_total, stats.completed_total) == (1, 1)


def test_the_consumer_id_is_kept_on_the_record(d: Driver) -> None:
    job_id = d.enqueue()
    (leased,) = d.ok(lease=pb.LeaseRequest(queue="q", consumer_id="w-7")).jobs
    _ack(d, leased)
    assert _job(d, job_id).consumer_id == "w-7"


def test_a_result_over_the_queue_bound_is_refused_and_changes_nothing(d: Driver) -> None:
    d.create(max_result_bytes=4)
    d.enqueue()
    (leased,) = d.lease()
    before = d.state()
    refused = _ack(d, leased, b"12345")
    assert isinstance(refused, InvalidArgumentError)
    assert refused.field == "leases[0].result"
    assert d.state() == before
    assert _ack(d, leased, b"1234").acked == 1


def test_a_second_ack_of_a_completed_job_is_a_lost_lease(d: Driver) -> None:
    d.enqueue()
    (leased,) = d.lease()
    _ack(d, leased)
    assert isinstance(_ack(d, leased), LeaseLostError)


def test_the_idempotency_key_answers_with_the_completed_job(d: Driver) -> None:
    job_id = d.enqueue(idempotency_key="k")
    (leased,) = d.lease()
    _ack(d, leased)
    again = d.ok(enqueue=pb.EnqueueBatchRequest(queue="q", jobs=[pb.JobSpec(idempotency_key="k")]))
    assert (again.results[0].job_id, again.results[0].duplicate) == (job_id, True)


def test_records_go_after_the_retention(d: Driver) -> None:
    d.create(completed_retention_ms=10_000)
    job_id = d.enqueue()
    (leased,) = d.lease()
    _ack(d, leased)
    due = d.m.next_due_ms()
    assert due is not None
    assert d.now + 10_000 <= due < d.now + 11_000
    d.now = due - 1
    d.tick()
    assert _job(d, job_id).state == COMPLETED
    d.now = due
    d.tick()
    with pytest.raises(NotFoundError):
        _job(d, job_id)
    assert d.m.stats("q", d.now)[0].completed == 0
    assert d.m.next_due_ms() is None


def test_at_most_completed_max_records_oldest_first(d: Driver) -> None:
    d.create(completed_max=2)
    ids = [d.enqueue() for _ in range(3)]
    for leased in d.lease(n=3):
        d.now += 1
        _ack(d, leased)
    with pytest.raises(NotFoundError):
        _job(d, ids[0])
    assert [_job(d, i).state for i in ids[1:]] == [COMPLETED, COMPLETED]
    assert d.m.stats("q", d.now)[0].completed_total == 3


def test_completed_max_zero_keeps_no_record(d: Driver) -> None:
    d.create(completed_max=0)
    job_id = d.enqueue()
    (leased,) = d.lease()
    _ack(d, leased)
    with pytest.raises(NotFoundError):
        _job(d, job_id)


def test_a_queue_deleted_when_idle_keeps_no_record_and_still_goes(d: Driver) -> None:
    d.create(delete_when_idle=True)
    d.enqueue()
    (leased,) = d.lease()
    _ack(d, leased)
    assert "q" not in d.m.queues


def test_records_hold_no_room_against_a_tenant_depth_limit(d: Driver) -> None:
    bound = logpb.TenantLimits(max_queue_depth=1)
    spec = pb.EnqueueBatchRequest(queue="acme/q", jobs=[pb.JobSpec()])
    d.ok(enqueue=spec, limits=bound)
    (leased,) = d.lease("acme/q")
    assert isinstance(d.run(enqueue=spec, limits=bound), ResourceExhaustedError)
    _ack(d, leased, queue="acme/q")
    d.ok(enqueue=spec, limits=bound)


def test_before_the_lifecycle_switch_an_ack_forgets_the_job() -> None:
    d = Driver()  # a log written before every member supported records
    job_id = d.enqueue()
    (leased,) = d.lease()
    _ack(d, leased)
    with pytest.raises(NotFoundError):
        _job(d, job_id)
    d.ok(tick=logpb.Tick(lifecycle=True))
    assert d.m.lifecycle
    assert d.m.queues["q"].config.completed_max == 10_000  # the new defaults show
    job_id = d.enqueue()
    (leased,) = d.lease()
    _ack(d, leased)
    assert _job(d, job_id).state == COMPLETED


# ------------------------------------------------------------------ complete


def test_force_complete_a_ready_job_in_the_compact_form(d: Driver) -> None:
    job_id = d.enqueue()
    assert d.m.queues["q"].jobs.row(job_id) is not None
    out = _action(d, "complete_job", job_id, note="done by hand", result=b"r")
    assert (out.job.state, out.job.reason, out.job.result) == (COMPLETED, "done by hand", b"r")
    assert d.lease() == []
    assert d.m.stats("q", d.now)[0].ready == 0


def test_force_complete_a_delayed_and_a_dead_job(d: Driver) -> None:
    d.create(max_attempts=1)
    delayed = d.enqueue(delay_ms=60_000)
    dead = d.enqueue()
    (leased,) = d.lease()
    d.nack(leased)
    assert _job(d, dead).state == pb.JOB_STATE_DEAD
    for job_id in (delayed, dead):
        assert _action(d, "complete_job", job_id).job.state == COMPLETED
    stats = d.m.stats("q", d.now)[0]
    assert (stats.delayed, stats.dead, stats.completed) == (0, 0, 2)
    d.now += 120_000
    d.tick()
    assert d.lease() == []  # the delayed one never comes back
    assert list(d.m.list_dead("q", 10, 0).jobs) == []


def test_force_complete_a_leased_job_fences_its_worker(d: Driver) -> None:
    job_id = d.enqueue()
    (leased,) = d.lease()
    assert _action(d, "complete_job", job_id, note="manual").job.state == COMPLETED
    assert isinstance(_ack(d, leased), LeaseLostError)
    assert isinstance(d.nack(leased), LeaseLostError)
    stats = d.m.stats("q", d.now)[0]
    assert (stats.leased, stats.completed) == (0, 1)


def test_complete_refuses_a_finished_job_naming_its_state(d: Driver) -> None:
    job_id = d.enqueue()
    _action(d, "cancel_job", job_id)
    refused = _action(d, "complete_job", job_id)
    assert isinstance(refused, FailedPreconditionError)
    assert "CANCELLED" in str(refused)


# -------------------------------------------------------------------- cancel


def test_cancel_a_ready_delayed_or_leased_job(d: Driver) -> None:
    ready = d.enqueue()
    delayed = d.enqueue(delay_ms=1000)
    leased_id = d.enqueue(priority=-1)
    (leased,) = d.lease()
    assert leased.job_id == leased_id
    for job_id in (ready, delayed, leased_id):
        out = _action(d, "cancel_job", job_id, note="not needed")
        assert (out.job.state, out.job.reason) == (CANCELLED, "not needed")
    assert isinstance(_ack(d, leased), LeaseLostError)
    stats = d.m.stats("q", d.now)[0]
    assert (stats.ready, stats.delayed, stats.leased, stats.cancelled) == (0, 0, 0, 3)
    assert stats.cancelled_total == 3
    d.now += 2000
    d.tick()
    assert d.lease() == []


def test_cancel_refuses_dead_and_completed_jobs_naming_the_state(d: Driver) -> None:
    d.create(max_attempts=1)
    d.enqueue()
    (leased,) = d.lease()
    d.nack(leased)
    done = d.enqueue()
    (second,) = d.lease()
    _ack(d, second)
    for job_id, state in ((leased.job_id, "DEAD"), (done, "COMPLETED")):
        before = d.state()
        refused = _action(d, "cancel_job", job_id)
        assert isinstance(refused, FailedPreconditionError)
        assert f"is {state}" in str(refused)
        assert d.state() == before


def test_cancelling_a_group_head_lets_the_next_job_of_the_group_go(d: Driver) -> None:
    first = d.enqueue(group="g")
    second = d.enqueue(group="g")
    _action(d, "cancel_job", first)
    assert [j.job_id for j in d.lease(n=2)] == [second]


def test_cancelling_a_leased_group_job_frees_the_group(d: Driver) -> None:
    first = d.enqueue(group="g")
    second = d.enqueue(group="g")
    assert [j.job_id for j in d.lease(n=2)] == [first]
    _action(d, "cancel_job", first)
    assert [j.job_id for j in d.lease(n=2)] == [second]


def test_unknown_jobs_and_queues_are_not_found(d: Driver) -> None:
    d.enqueue()
    assert isinstance(_action(d, "cancel_job", 99), NotFoundError)
    assert isinstance(_action(d, "cancel_job", 1, queue="nope"), NotFoundError)


# ------------------------------------------------------------------- requeue


def test_requeue_a_dead_job_with_fresh_attempts_keeping_its_history(d: Driver) -> None:
    d.create(max_attempts=1)
    job_id = d.enqueue()
    (leased,) = d.lease()
    d.nack(leased, reason="boom")
    out = _action(d, "requeue_job", job_id)
    assert (out.job.state, out.job.attempts) == (pb.JOB_STATE_READY, 0)
    assert [e.reason for e in out.job.errors] == ["boom"]
    assert (out.job.reason, out.job.finished_at_ms) == ("", 0)
    (again,) = d.lease()
    assert (again.job_id, again.attempt) == (job_id, 1)
    assert d.m.stats("q", d.now)[0].dead == 0


def test_requeue_a_completed_or_cancelled_job(d: Driver) -> None:
    done = d.enqueue(payload=b"a")
    (leased,) = d.lease()
    _ack(d, leased, b"res")
    cancelled = d.enqueue(payload=b"b")
    _action(d, "cancel_job", cancelled)
    out = _action(d, "requeue_job", done, delay_ms=500)
    assert (out.job.state, out.job.result) == (pb.JOB_STATE_DELAYED, b"")
    assert _action(d, "requeue_job", cancelled).job.state == pb.JOB_STATE_READY
    stats = d.m.stats("q", d.now)[0]
    assert (stats.completed, stats.cancelled, stats.ready, stats.delayed) == (0, 0, 1, 1)
    d.now += 500
    d.tick()
    assert sorted(j.payload for j in d.lease(n=5)) == [b"a", b"b"]


def test_requeue_refuses_a_waiting_job(d: Driver) -> None:
    job_id = d.enqueue()
    refused = _action(d, "requeue_job", job_id)
    assert isinstance(refused, FailedPreconditionError)
    assert "is READY" in str(refused)


# -------------------------------------------------------------- reprioritize


def test_reprioritize_a_compact_ready_job_moves_it_in_line(d: Driver) -> None:
    first = d.enqueue(priority=5)
    d.now += 1
    second = d.enqueue(priority=5)
    out = _action(d, "reprioritize_job", second, priority=1)
    assert out.job.priority == 1
    assert [j.job_id for j in d.lease(n=2)] == [second, first]


def test_reprioritize_moves_ready_times_both_ways(d: Driver) -> None:
    job_id = d.enqueue()
    out = _action(d, "reprioritize_job", job_id, ready_at_ms=d.now + 1000)
    assert (out.job.state, out.job.ready_at_ms) == (pb.JOB_STATE_DELAYED, d.now + 1000)
    assert d.lease() == []
    out = _action(d, "reprioritize_job", job_id, ready_at_ms=d.now)
    assert out.job.state == pb.JOB_STATE_READY
    assert [j.job_id for j in d.lease()] == [job_id]


def test_reprioritize_checks_its_fields_and_the_state(d: Driver) -> None:
    d.create(min_priority=0, max_priority=9)
    job_id = d.enqueue()
    missing = _action(d, "reprioritize_job", job_id)
    assert isinstance(missing, InvalidArgumentError)
    assert missing.field == "priority"
    bad = _action(d, "reprioritize_job", job_id, priority=10)
    assert isinstance(bad, InvalidArgumentError)
    assert bad.field == "priority"
    negative = _action(d, "reprioritize_job", job_id, ready_at_ms=-1)
    assert isinstance(negative, InvalidArgumentError)
    assert negative.field == "ready_at_ms"
    d.lease()
    leased = _action(d, "reprioritize_job", job_id, priority=1)
    assert isinstance(leased, FailedPreconditionError)
    assert "is LEASED" in str(leased)


# ------------------------------------------------------------------ snapshots


def test_records_survive_a_snapshot_and_are_pruned_alike_after_it(d: Driver) -> None:
    d.create(completed_retention_ms=5_000, completed_max=3)
    for i in range(5):
        d.enqueue(payload=bytes([i]))
    for leased in d.lease(n=4):
        d.now += 700
        _ack(d, leased, b"r%d" % leased.job_id)
    _action(d, "cancel_job", 5, note="n")
    copy = Driver(restore(snapshot_bytes(d.m)), now=d.now)
    assert state_hash(copy.m) == state_hash(d.m)
    for driver in (d, copy):
        for _ in range(8):
            driver.now += 1000
            driver.tick()
    assert d.state() == copy.state()
    assert d.m.stats("q", d.now)[0].completed == 0
    assert d.m.next_due_ms() == copy.m.next_due_ms() is None


def _update(d: Driver, **fields: Any) -> Any:
    config = pb.QueueConfig(**fields)
    return d.ok(
        update_queue=pb.UpdateQueueRequest(queue="q", config=config, update_mask=list(fields))
    )


def test_a_shorter_retention_prunes_alike_on_a_restored_replica(d: Driver) -> None:
    d.create(completed_retention_ms=60_000)
    for _ in range(3):
        d.enqueue()
    for leased in d.lease(n=3):
        d.now += 100
        _ack(d, leased)
    _update(d, completed_retention_ms=2_000)
    copy = Driver(restore(snapshot_bytes(d.m)), now=d.now)
    for _ in range(4):
        for driver in (d, copy):
            driver.now += 1000
            driver.tick()
        assert d.state() == copy.state()
    assert d.m.stats("q", d.now)[0].completed == 0


def test_a_lower_completed_max_drops_the_oldest_records_at_once(d: Driver) -> None:
    ids = [d.enqueue() for _ in range(4)]
    for leased in d.lease(n=4):
        d.now += 1
        _ack(d, leased)
    _update(d, completed_max=1)
    assert d.m.stats("q", d.now)[0].completed == 1
    assert _job(d, ids[-1]).state == COMPLETED


def test_requeueing_an_expired_job_runs_it_after_all(d: Driver) -> None:
    job_id = d.enqueue(expires_at_ms=d.now + 10)
    d.now += 10
    d.tick()
    assert _job(d, job_id).reason == "expired"
    out = _action(d, "requeue_job", job_id)
    assert (out.job.state, out.job.expires_at_ms) == (pb.JOB_STATE_READY, 0)
    d.now += 1000
    d.tick()
    assert [j.job_id for j in d.lease()] == [job_id]


def test_a_restored_replica_counts_no_record_against_a_tenant_depth(d: Driver) -> None:
    bound = logpb.TenantLimits(max_queue_depth=1)
    spec = pb.EnqueueBatchRequest(queue="acme/q", jobs=[pb.JobSpec()])
    for _ in range(2):
        d.ok(enqueue=spec, limits=bound)
        (leased,) = d.lease("acme/q")
        _ack(d, leased, queue="acme/q")
    copy = Driver(restore(snapshot_bytes(d.m)), now=d.now)
    for driver in (d, copy):
        assert driver.ok(enqueue=spec, limits=bound).results[0].job_id == 3


def test_a_stale_dead_retention_look_drops_no_queue(d: Driver) -> None:
    config: dict[str, Any] = {
        "delete_when_idle": True,
        "dead_retention_ms": 10_000,
        "max_attempts": 1,
    }
    d.create(**config)
    d.enqueue()
    (leased,) = d.lease()
    d.nack(leased)  # dead: a look is due in 10 s
    d.ok(delete_dead=pb.DeleteDeadRequest(queue="q"))  # the queue goes with it
    assert "q" not in d.m.queues
    copy = Driver(restore(snapshot_bytes(d.m)), now=d.now)  # holds no such look
    for driver in (d, copy):
        driver.now += 1000
        driver.create(**config)
        driver.now += 10_000
        driver.tick()
        assert "q" in driver.m.queues
    assert d.state() == copy.state()
