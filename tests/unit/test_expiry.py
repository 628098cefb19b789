"""Expiry of waiting jobs (JobSpec.expires_at_ms, QueueConfig.job_ttl_ms) and
the retention of dead jobs (QueueConfig.dead_retention_ms), in the machine."""

from __future__ import annotations

import pytest

from pqueue.core import features, limits
from pqueue.core.effects import Effects
from pqueue.core.snapshot import restore, snapshot_bytes, take_snapshot
from pqueue.errors import InvalidArgumentError, NotFoundError
from pqueue.v1 import log_pb2 as logpb
from pqueue.v1 import queue_pb2 as pb
from tests.machine_driver import Driver

READY, DELAYED, LEASED, DEAD = (
    pb.JOB_STATE_READY,
    pb.JOB_STATE_DELAYED,
    pb.JOB_STATE_LEASED,
    pb.JOB_STATE_DEAD,
)


@pytest.fixture
def d() -> Driver:
    return Driver(lifecycle=True)


def job(d: Driver, job_id: int, queue: str = "q") -> pb.Job:
    return d.m.get_job(queue, job_id)


def stats(d: Driver, queue: str = "q") -> pb.QueueStats:
    return d.m.stats(queue, d.now)[0]


def tick_effects(d: Driver, advance_ms: int) -> Effects:
    """A Tick entry ``advance_ms`` later, and what it did."""
    d.now += advance_ms
    commands = [logpb.Command(tick=logpb.Tick())]
    return d.m.apply_entry(
        logpb.LogEntry(index=d.m.applied_index + 1, time_ms=d.now, commands=commands)
    )


# ------------------------------------------------------------------ expiry


def test_a_ready_job_not_leased_by_its_expiry_becomes_dead_expired(d: Driver) -> None:
    t0 = d.now
    job_id = d.enqueue(expires_at_ms=t0 + 1000)
    assert job(d, job_id).expires_at_ms == t0 + 1000
    assert d.m.next_due_ms() == t0 + 1000  # the leader ticks then
    d.tick(999)
    assert job(d, job_id).state == READY
    effects = tick_effects(d, 1)
    assert job_id in effects.changed
    assert "q" in effects.touched
    got = job(d, job_id)
    assert (got.state, got.reason, got.finished_at_ms, got.attempts) == (DEAD, "expired", d.now, 0)
    s = stats(d)
    assert (s.ready, s.dead, s.ttl_expired_total, s.dead_total) == (0, 1, 1, 1)
    assert d.lease() == []
    assert d.m.next_due_ms() is None


def test_a_delayed_job_expires_before_it_comes_due(d: Driver) -> None:
    job_id = d.enqueue(delay_ms=5000, expires_at_ms=d.now + 1000)
    d.tick(1000)
    got = job(d, job_id)
    assert (got.state, got.reason) == (DEAD, "expired")
    d.tick(5000)  # its stale delayed entry changes nothing
    assert job(d, job_id).state == DEAD
    assert stats(d).delayed == 0


def test_a_leased_job_is_not_cut_off_its_lease_decides(d: Driver) -> None:
    job_id = d.enqueue(expires_at_ms=d.now + 1000)
    leased = d.lease(lease_ms=5000)[0]
    d.tick(2000)  # past its expiry, still leased
    assert job(d, job_id).state == LEASED
    assert d.m.next_due_ms() == leased.lease_expires_at_ms
    assert not isinstance(d.ack(leased), Exception)
    assert stats(d).ttl_expired_total == 0


def test_a_delivery_that_fails_past_the_expiry_is_not_retried(d: Driver) -> None:
    d.create(max_attempts=5)
    by_lease = d.enqueue(expires_at_ms=d.now + 1000)
    by_nack = d.enqueue(expires_at_ms=d.now + 1000)
    by_release = d.enqueue(expires_at_ms=d.now + 1000)
    first, second, third = d.lease(n=3, lease_ms=3000)
    d.now += 2000
    nacked = d.nack(second, reason="boom")
    assert nacked.state == DEAD
    released = d.nack(third, release=True)
    assert released.state == DEAD
    d.tick(1000)  # the first one's lease runs out
    for job_id in (by_lease, by_nack, by_release):
        got = job(d, job_id)
        assert (got.state, got.reason) == (DEAD, "expired"), job_id
    assert [e.reason for e in job(d, by_nack).errors] == ["boom"]
    assert [e.reason for e in job(d, by_lease).errors] == ["lease expired"]
    s = stats(d)
    assert (s.ttl_expired_total, s.dead_total, s.dead) == (3, 3, 3)
    assert first.job_id == by_lease


def test_a_retried_job_expires_while_it_waits_whatever_its_attempts(d: Driver) -> None:
    job_id = d.enqueue(expires_at_ms=d.now + 1000)
    leased = d.lease()[0]
    # The leader's tick loop asks while the job is leased: its expiry is no
    # longer due (a lease is not cut off), and the entry is dropped then.
    assert d.m.next_due_ms() == leased.lease_expires_at_ms
    assert d.nack(leased, delay_ms=5000).state == DELAYED  # back before its expiry
    assert d.m.next_due_ms() == d.now + 1000
    d.tick(1000)
    got = job(d, job_id)
    assert (got.state, got.reason, got.attempts) == (DEAD, "expired", 1)


def test_a_job_given_back_before_its_expiry_still_expires(d: Driver) -> None:
    job_id = d.enqueue(expires_at_ms=d.now + 1000)
    for _ in range(2):  # each time back: one more heap entry for one expiry
        leased = d.lease()[0]
        assert d.m.next_due_ms() == leased.lease_expires_at_ms  # as the leader asks
        d.nack(leased, release=True)
    assert d.m.next_due_ms() == d.now + 1000
    d.tick(1000)
    assert job(d, job_id).state == DEAD
    assert stats(d).ttl_expired_total == 1  # counted once


def test_exhausted_attempts_name_the_reason_over_expiry(d: Driver) -> None:
    d.create(max_attempts=1)
    job_id = d.enqueue(expires_at_ms=d.now + 1000)
    leased = d.lease()[0]
    d.now += 2000
    d.nack(leased)
    got = job(d, job_id)
    assert (got.state, got.reason) == (DEAD, "attempts exhausted")
    assert stats(d).ttl_expired_total == 0


def test_the_queue_ttl_counts_from_the_enqueue_and_the_earlier_expiry_wins(d: Driver) -> None:
    d.create(job_ttl_ms=1000)
    t0 = d.now
    plain = d.enqueue()
    sooner = d.enqueue(expires_at_ms=t0 + 400)
    later = d.enqueue(expires_at_ms=t0 + 5000)
    assert [job(d, i).expires_at_ms for i in (plain, sooner, later)] == [
        t0 + 1000,
        t0 + 400,
        t0 + 1000,
    ]
    d.tick(400)
    assert [job(d, i).state for i in (plain, sooner, later)] == [READY, DEAD, READY]
    d.tick(600)
    assert [job(d, i).state for i in (plain, sooner, later)] == [DEAD, DEAD, DEAD]


def test_an_expiry_already_past_makes_the_job_dead_at_once(d: Driver) -> None:
    job_id = d.enqueue(expires_at_ms=d.now - 1)
    got = job(d, job_id)
    assert (got.state, got.reason, got.finished_at_ms) == (DEAD, "expired", d.now)
    assert d.lease() == []
    assert stats(d).ttl_expired_total == 1


def test_an_expiring_job_is_kept_as_an_object_not_in_the_compact_form(d: Driver) -> None:
    d.enqueue()
    d.enqueue(expires_at_ms=d.now + 1000)
    assert d.m.queues["q"].jobs.compact == 1


def test_an_expired_group_head_lets_the_next_job_of_its_group_go(d: Driver) -> None:
    head = d.enqueue(group="g", expires_at_ms=d.now + 1000)
    nxt = d.enqueue(group="g")
    d.tick(1000)
    assert job(d, head).state == DEAD
    assert [j.job_id for j in d.lease()] == [nxt]


def test_redrive_of_an_expired_job_drops_the_expiry_it_passed(d: Driver) -> None:
    d.create(max_attempts=1)
    expired = d.enqueue(expires_at_ms=d.now + 1000)
    exhausted = d.enqueue(expires_at_ms=d.now + 10_000, priority=-1)
    d.nack(d.lease()[0])
    d.tick(1000)
    assert job(d, expired).state == DEAD
    assert job(d, exhausted).state == DEAD
    d.ok(redrive=pb.RedriveRequest(queue="q"))
    for job_id in (expired, exhausted):
        got = job(d, job_id)
        assert (got.state, got.reason, got.finished_at_ms) == (READY, "", 0)
    assert job(d, expired).expires_at_ms == 0  # run it after all
    assert job(d, exhausted).expires_at_ms == d.now + 9000  # still ahead: kept
    d.tick(9000)
    assert job(d, exhausted).state == DEAD
    assert job(d, expired).state == READY


def test_an_expiry_turns_the_lifecycle_feature_on() -> None:
    d = Driver()  # an older cluster's machine
    assert not d.m.lifecycle
    job_id = d.enqueue(expires_at_ms=d.now + 10)
    assert d.m.lifecycle
    assert features.LIFECYCLE in d.m.features
    d.tick(10)
    assert job(d, job_id).state == DEAD


def test_bad_expiry_fields_are_refused_naming_them(d: Driver) -> None:
    before = d.state()
    r = d.run(
        enqueue=pb.EnqueueBatchRequest(queue="q", jobs=[pb.JobSpec(), pb.JobSpec(expires_at_ms=-1)])
    )
    assert isinstance(r, InvalidArgumentError)
    assert r.field == "jobs[1].expires_at_ms"
    for name, value in (
        ("job_ttl_ms", -1),
        ("job_ttl_ms", limits.MAX_RETENTION_MS + 1),
        ("dead_retention_ms", -5),
        ("dead_retention_ms", limits.MAX_RETENTION_MS + 1),
    ):
        r = d.create("q", **{name: value})
        assert isinstance(r, InvalidArgumentError), name
        assert r.field == f"config.{name}"
    assert d.state() == before


def test_the_expiry_heap_stays_bounded_under_churn(d: Driver) -> None:
    for _ in range(3000):
        d.enqueue(expires_at_ms=d.now + 10**9)
        d.ack(d.lease()[0])
        d.now += 1
    assert len(d.m._expiry) < 2100


# --------------------------------------------------------------- retention


def _kill(d: Driver, n: int = 1) -> list[int]:
    ids = [d.enqueue() for _ in range(n)]
    for leased in d.lease(n=n):
        d.nack(leased)
    return ids


def test_dead_jobs_are_deleted_their_retention_after_they_died(d: Driver) -> None:
    d.create(max_attempts=1, dead_retention_ms=1000)
    t0 = d.now
    first = _kill(d)[0]
    d.now += 300
    second = _kill(d)[0]
    assert d.m.next_due_ms() == t0 + 1000
    d.tick(699)
    assert job(d, first).state == DEAD
    effects = tick_effects(d, 1)
    assert effects.changed == {first}
    assert effects.touched == {"q"}
    with pytest.raises(NotFoundError):
        job(d, first)
    assert job(d, second).state == DEAD
    assert d.m.next_due_ms() == t0 + 1300
    d.tick(300)
    with pytest.raises(NotFoundError):
        job(d, second)
    s = stats(d)
    assert (s.dead, s.dead_total) == (0, 2)  # totals stay
    assert d.m.next_due_ms() is None


def test_expired_jobs_are_pruned_like_any_dead_job(d: Driver) -> None:
    d.create(job_ttl_ms=100, dead_retention_ms=1000)
    job_id = d.enqueue()
    d.tick(100)
    assert job(d, job_id).reason == "expired"
    d.tick(1000)
    assert d.m.queues["q"].jobs.get(job_id) is None


def test_without_a_retention_dead_jobs_stay(d: Driver) -> None:
    d.create(max_attempts=1)
    job_id = _kill(d)[0]
    d.tick(limits.MAX_RETENTION_MS)
    assert job(d, job_id).state == DEAD
    assert d.m.next_due_ms() is None


def test_a_redriven_job_is_not_pruned_and_dies_again_with_a_new_clock(d: Driver) -> None:
    d.create(max_attempts=1, dead_retention_ms=1000)
    job_id = _kill(d)[0]
    d.now += 500
    d.ok(redrive=pb.RedriveRequest(queue="q"))
    d.tick(500)  # the first death's retention ran out: a stale entry now
    assert job(d, job_id).state == READY
    d.now += 100
    d.nack(d.lease()[0])
    died = d.now
    d.tick(999)
    assert job(d, job_id).finished_at_ms == died
    d.tick(1)
    assert d.m.queues["q"].jobs.get(job_id) is None


def test_pruning_the_last_job_drops_a_delete_when_idle_queue(d: Driver) -> None:
    d.create("idle", max_attempts=1, dead_retention_ms=1000, delete_when_idle=True)
    _kill_in(d, "idle")
    assert "idle" in d.m.queues
    d.tick(1000)
    assert "idle" not in d.m.queues


def _kill_in(d: Driver, queue: str) -> int:
    job_id = d.enqueue(queue)
    d.nack(d.lease(queue)[0], queue=queue)
    return job_id


def test_the_dead_order_heap_stays_bounded_without_a_retention(d: Driver) -> None:
    d.create(max_attempts=1)
    job_id = d.enqueue()
    for _ in range(500):
        d.nack(d.lease()[0])
        d.ok(redrive=pb.RedriveRequest(queue="q", job_ids=[job_id]))
        d.now += 1
    assert len(d.m.queues["q"].dead_order) < 200


def test_jobs_dead_before_the_lifecycle_are_pruned_at_once_when_a_retention_is_set() -> None:
    old = Driver()  # before the switch: a dead job records no time
    old.create(max_attempts=1)
    job_id = old.enqueue()
    old.nack(old.lease()[0])
    assert old.m.get_job("q", job_id).finished_at_ms == 0
    # The queue's retention set afterwards (as UpdateQueue would).
    snap = take_snapshot(old.m)
    snap.queues[0].config.dead_retention_ms = 60_000
    snap.required_features.append(features.LIFECYCLE)
    d = Driver(restore(snap.SerializeToString()), now=old.now)
    d.tick(1)
    assert d.m.queues["q"].jobs.get(job_id) is None


# ------------------------------------------------------ snapshot / restore


def _scenario(d: Driver) -> list[int]:
    """Times (ms after the start) to step through: jobs that expire ready,
    delayed, after a nack and under a lease, and dead jobs pruned."""
    d.create(max_attempts=2, job_ttl_ms=3000, dead_retention_ms=2000, backoff_base_ms=500)
    d.create("other", dead_retention_ms=1500, max_attempts=1)
    for i in range(6):
        d.enqueue(
            delay_ms=i * 700, expires_at_ms=d.now + 1000 + i * 450, group="g" if i % 2 else ""
        )
        d.enqueue("other")
        d.now += 10
    for leased in d.lease(n=2):
        d.nack(leased)
    d.lease(n=1, lease_ms=4000)
    d.nack(d.lease("other")[0], queue="other")
    return [250] * 40


def test_restore_then_advance_gives_the_same_state_as_without(d: Driver) -> None:
    steps = _scenario(d)
    for i, step in enumerate(steps):
        twin = Driver(restore(snapshot_bytes(d.m)), now=d.now)
        d.tick(step)
        twin.tick(step)
        assert twin.state() == d.state(), f"step {i}"
        assert twin.m.next_due_ms() == d.m.next_due_ms(), f"step {i}"
        if i % 3 == 0:  # a lease now and then, on both
            assert [j.job_id for j in d.lease()] == [j.job_id for j in twin.lease()]
    q = d.m.queues["q"]
    assert q.counters.ttl_expired > 0
    assert q.counters.dead > q.counts[DEAD]  # some were pruned
    assert d.m.queues["other"].counts[DEAD] == 0


class Leader(Driver):
    """A driver that asks ``next_due_ms`` after each entry, as a leader's
    tick loop does (it drops heap entries no longer due: replicas that never
    ask must still decide alike)."""

    def run(self, **command: object) -> object:  # type: ignore[override]
        result = super().run(**command)
        self.m.next_due_ms()
        return result


def test_the_leaders_next_due_reads_change_no_outcome() -> None:
    leader, follower = Leader(lifecycle=True), Driver(lifecycle=True)
    for d in (leader, follower):
        d.create(max_attempts=1)
        held = d.enqueue(expires_at_ms=d.now + 1000)
        leased = d.lease()[0]  # while leased, the leader drops its expiry entry
        d.tick(100)
        d.nack(leased)  # dead: attempts exhausted, before its expiry
        d.ok(redrive=pb.RedriveRequest(queue="q", job_ids=[held]))  # waiting again
        d.tick(900)
    assert leader.state() == follower.state()
    got = job(leader, held)
    assert (got.state, got.reason) == (DEAD, "expired")
