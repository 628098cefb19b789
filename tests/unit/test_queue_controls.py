"""Queue controls on the state machine: UpdateQueue, PauseQueue/ResumeQueue,
and the dispatch limits (max_dispatch_per_s, max_inflight)."""

from __future__ import annotations

from typing import Any

import pytest

from pqueue.core import features, limits
from pqueue.core.effects import Effects
from pqueue.core.queue_commands import config_differences
from pqueue.core.queue_controls import check_update
from pqueue.core.snapshot import restore, snapshot_bytes, state_hash
from pqueue.errors import InvalidArgumentError, NotFoundError, PermissionDeniedError
from pqueue.v1 import log_pb2 as logpb
from pqueue.v1 import queue_pb2 as pb
from tests.machine_driver import Driver


@pytest.fixture
def d() -> Driver:
    return Driver(lifecycle=True)


def apply(d: Driver, advance_ms: int = 0, **command: Any) -> Effects:
    """One command in one entry, stamped as the leader stamps it: its Effects."""
    d.now += advance_ms
    commands = [logpb.Command(**command)] if command else []
    entry = logpb.LogEntry(
        index=d.m.applied_index + 1,
        time_ms=d.now,
        commands=commands,
        required_features=features.required_by(commands),
    )
    return d.m.apply_entry(entry)


def update(d: Driver, queue: str = "q", mask: tuple[str, ...] = (), **config: Any) -> Any:
    req = pb.UpdateQueueRequest(
        queue=queue, config=pb.QueueConfig(**config), update_mask=list(mask)
    )
    return d.run(update_queue=req)


def pause(d: Driver, queue: str = "q") -> Any:
    return d.run(pause_queue=pb.PauseQueueRequest(queue=queue))


def resume(d: Driver, queue: str = "q") -> Any:
    return d.run(resume_queue=pb.ResumeQueueRequest(queue=queue))


def refused(d: Driver, result: Any, field: str, before: bytes) -> None:
    """An INVALID_ARGUMENT naming ``field`` that changed nothing."""
    assert isinstance(result, InvalidArgumentError), result
    assert result.field == field
    assert d.state() == before


# ------------------------------------------------------------------ update


def test_update_changes_only_the_masked_fields(d: Driver) -> None:
    d.create(max_attempts=3, aging_interval_ms=100, min_priority=-5)
    before = d.m.queues["q"].config
    r = update(
        d, mask=("max_attempts", "max_inflight"), max_attempts=7, max_inflight=4, dedup_window_ms=1
    )
    assert isinstance(r, pb.UpdateQueueResponse)
    want = pb.QueueConfig()
    want.CopyFrom(before)
    want.max_attempts, want.max_inflight = 7, 4
    assert r.config == want == d.m.queues["q"].config
    # A masked zero takes the default; a masked unset optional is cleared.
    r = update(d, mask=("max_attempts", "min_priority"))
    assert r.config.max_attempts == limits.DEFAULT_MAX_ATTEMPTS
    assert not r.config.HasField("min_priority")
    assert r.config.aging_interval_ms == 100


def test_an_empty_mask_replaces_the_whole_config(d: Driver) -> None:
    d.create(max_attempts=3, aging_interval_ms=100, max_inflight=2)
    r = update(d, backoff_base_ms=50)
    assert r.config == limits.effective_config(pb.QueueConfig(backoff_base_ms=50))
    assert d.m.queues["q"].config == r.config


def test_refusals_name_the_field_and_change_nothing(d: Driver) -> None:
    d.create(default_lease_ms=20_000, shares=[pb.TenantShare(tenant="a")])
    d.enqueue()
    before = d.state()
    refused(d, update(d, mask=("max_attempts", "nope")), "update_mask[1]", before)
    refused(d, update(d, mask=("max_attempts",), max_attempts=5000), "config.max_attempts", before)
    refused(
        d,
        update(d, mask=("max_dispatch_per_s",), max_dispatch_per_s=-1),
        "config.max_dispatch_per_s",
        before,
    )
    refused(
        d,
        update(d, mask=("max_dispatch_per_s",), max_dispatch_per_s=0.0001),
        "config.max_dispatch_per_s",
        before,
    )
    refused(d, update(d, mask=("job_ttl_ms",), job_ttl_ms=-1), "config.job_ttl_ms", before)
    # Checked against the queue's other fields, as CreateQueue checks a whole config.
    refused(
        d,
        update(d, mask=("max_lease_total_ms",), max_lease_total_ms=10_000),
        "config.default_lease_ms",
        before,
    )
    refused(
        d,
        update(d, mask=("delete_when_idle",), delete_when_idle=True),
        "config.delete_when_idle",
        before,
    )
    shares = [pb.TenantShare(tenant="b"), pb.TenantShare(tenant="b")]
    refused(d, update(d, mask=("shares",), shares=shares), "config.shares[1].tenant", before)
    r = update(d, queue="nowhere", mask=("max_attempts",), max_attempts=2)
    assert isinstance(r, NotFoundError)
    assert d.state() == before


def test_priority_bounds_are_checked_together_with_the_queues(d: Driver) -> None:
    d.create(max_priority=2)
    before = d.state()
    refused(d, update(d, mask=("min_priority",), min_priority=3), "config.min_priority", before)
    r = update(d, mask=("min_priority", "max_priority"), min_priority=3, max_priority=9)
    assert (r.config.min_priority, r.config.max_priority) == (3, 9)
    # Jobs already in the queue stay; new ones must fit the new bounds.
    assert isinstance(
        d.run(enqueue=pb.EnqueueBatchRequest(queue="q", jobs=[pb.JobSpec(priority=1)])),
        InvalidArgumentError,
    )


def test_the_servicers_check_refuses_only_what_no_queue_could_take() -> None:
    def req(*mask: str, **config: Any) -> pb.UpdateQueueRequest:
        return pb.UpdateQueueRequest(queue="q", config=pb.QueueConfig(**config), update_mask=mask)

    for bad, field in (
        (req("max_attempts", "bogus"), "update_mask[1]"),
        (req("max_attempts", max_attempts=5000), "config.max_attempts"),
        (req("default_lease_ms", default_lease_ms=-1), "config.default_lease_ms"),
        (req("max_dispatch_per_s", max_dispatch_per_s=float("nan")), "config.max_dispatch_per_s"),
        (req(max_lease_total_ms=1000, default_lease_ms=2000), "config.default_lease_ms"),
        (
            req("default_lease_ms", "max_lease_total_ms", default_lease_ms=2, max_lease_total_ms=1),
            "config.default_lease_ms",
        ),
        (req("shares", shares=[pb.TenantShare(tenant="")]), "config.shares[0].tenant"),
        (
            req(
                "shares",
                "delete_when_idle",
                shares=[pb.TenantShare(tenant="a")],
                delete_when_idle=True,
            ),
            "config.delete_when_idle",
        ),
    ):
        with pytest.raises(InvalidArgumentError) as info:
            check_update(bad)
        assert info.value.field == field
    # A field checked against another the update leaves alone depends on the
    # queue: the machine decides.
    for fine in (
        req("max_lease_total_ms", max_lease_total_ms=1000),
        req("default_lease_ms", default_lease_ms=limits.MAX_DURATION_MS),
        req("backoff_base_ms", backoff_base_ms=limits.MAX_DURATION_MS),
        req("backoff_max_ms", backoff_max_ms=1),
        req("min_priority", min_priority=7),
        req("delete_when_idle", delete_when_idle=True),
        req("shares", shares=[pb.TenantShare(tenant="a", weight=3)]),
    ):
        check_update(fine)


def test_shares_and_weights_follow_an_update(d: Driver) -> None:
    shares = [pb.TenantShare(tenant="a", weight=1), pb.TenantShare(tenant="b", weight=1)]
    d.create(shares=shares)
    for tenant in ("a", "b"):
        d.ok(
            enqueue=pb.EnqueueBatchRequest(queue="q", jobs=[pb.JobSpec()] * 40),
            caller=logpb.Caller(tenant=tenant),
        )
    even = [j.tenant for j in d.lease(n=8)]
    assert even.count("a") == even.count("b") == 4
    r = update(
        d,
        mask=("shares",),
        shares=[pb.TenantShare(tenant="b", weight=3), pb.TenantShare(tenant="a")],
    )
    assert [(s.tenant, s.weight) for s in r.config.shares] == [("a", 1), ("b", 3)]
    assert d.m.queues["q"].weights == {"a": 1, "b": 3}
    weighted = [j.tenant for j in d.lease(n=16)]
    assert (weighted.count("a"), weighted.count("b")) == (4, 12)
    # A tenant no longer listed may not enqueue; its jobs stay and are served.
    update(d, mask=("shares",), shares=[pb.TenantShare(tenant="b")])
    r = d.run(
        enqueue=pb.EnqueueBatchRequest(queue="q", jobs=[pb.JobSpec()]),
        caller=logpb.Caller(tenant="a"),
    )
    assert isinstance(r, PermissionDeniedError)
    assert "a" in {j.tenant for j in d.lease(n=40)}


def _lease_order(d: Driver) -> list[int]:
    return [j.job_id for j in d.lease(n=1000)]


@pytest.mark.parametrize(("old", "new"), [(0, 100), (100, 0), (100, 7), (7, 5000)])
def test_an_aging_change_reorders_compact_and_heap_jobs_alike(
    d: Driver, old: int, new: int
) -> None:
    d.create(aging_interval_ms=old)
    for step in range(30):
        d.now += 37
        d.enqueue(priority=step % 5)  # the compact form
        d.enqueue(priority=(step * 3) % 5, group=f"g{step}")  # objects in the heap
        if step % 4 == 0:
            d.enqueue(priority=step % 3, delay_ms=50)  # heap, once due
    d.now += 100
    update(d, mask=("aging_interval_ms",), aging_interval_ms=new)
    # A machine restored from the snapshot builds its heaps afresh with the new key.
    fresh = Driver(restore(snapshot_bytes(d.m)), now=d.now)
    got = _lease_order(d)
    assert got == _lease_order(fresh)
    assert len(got) == 30 * 2 + 8
    q = d.m.queues["q"]
    keys = [
        (q.first_key(q.jobs[i].priority, q.jobs[i].ready_at_ms), q.jobs[i].ready_at_ms, i)
        for i in got
    ]
    assert keys == sorted(keys)


# ---------------------------------------------------------- pause, resume


def test_a_paused_queue_takes_jobs_leases_none_and_says_so(d: Driver) -> None:
    d.create()
    d.enqueue()
    r = pause(d)
    assert r == pb.PauseQueueResponse(changed=True)
    assert pause(d) == pb.PauseQueueResponse(changed=False)  # idempotent
    d.enqueue()
    before = d.state()
    assert d.lease(n=5) == []
    assert d.state() == before  # an empty lease changes nothing
    assert not d.m.has_ready("q")
    stats = d.m.stats("q", d.now)[0]
    assert (stats.paused, stats.ready) == (True, 2)
    # Time passing releases nothing.
    d.tick(60_000)
    assert d.lease() == []
    eff = apply(d, resume_queue=pb.ResumeQueueRequest(queue="q"))
    assert eff.results[0] == pb.ResumeQueueResponse(changed=True)
    assert eff.woken == {"q": 2}  # waiting leases look again
    assert resume(d) == pb.ResumeQueueResponse(changed=False)
    assert d.m.has_ready("q")
    assert not d.m.stats("q", d.now)[0].paused
    assert len(d.lease(n=5)) == 2


def test_pause_keeps_leases_running_and_survives_a_snapshot(d: Driver) -> None:
    d.create()
    d.enqueue()
    d.enqueue()
    job = d.lease()[0]
    pause(d)
    assert isinstance(d.ack(job), pb.AckResponse)  # leased jobs settle as usual
    copy = restore(snapshot_bytes(d.m))
    assert copy.queues["q"].paused
    assert state_hash(copy) == state_hash(d.m)
    assert not copy.has_ready("q")


def test_pause_and_resume_of_an_unknown_queue_are_not_found(d: Driver) -> None:
    assert isinstance(pause(d, "ghost"), NotFoundError)
    assert isinstance(resume(d, "ghost"), NotFoundError)
    assert isinstance(pause(d, "bad name"), InvalidArgumentError)


# ------------------------------------------------------ max_dispatch_per_s


def test_the_bucket_starts_full_and_refills_at_the_rate(d: Driver) -> None:
    d.create(max_dispatch_per_s=4)
    for _ in range(50):
        d.enqueue()
    assert len(d.lease(n=10)) == 4  # one second of burst
    assert d.lease(n=10) == []
    assert d.m.next_dispatch_ms("q") == d.now + 250
    d.now += 249
    before = d.state()
    assert d.lease() == []
    assert d.state() == before  # a lease finding it empty changes nothing
    d.now += 1
    assert len(d.lease(n=10)) == 1
    d.now += 600  # 2.4 leases' worth
    assert len(d.lease(n=10)) == 2
    assert d.m.next_dispatch_ms("q") == d.now + 150  # the 0.4 left over is kept
    d.now += 3_600_000  # an idle hour banks no more than a second
    assert len(d.lease(n=10)) == 4


def test_a_slow_rate_holds_one_lease_and_keeps_fractions(d: Driver) -> None:
    d.create(max_dispatch_per_s=0.3)
    for _ in range(5):
        d.enqueue()
    assert len(d.lease(n=5)) == 1  # capacity is one lease, never less
    due = d.m.next_dispatch_ms("q")
    assert due == d.now + 3334  # ceil(1000 / 0.3)
    d.now = due - 1
    assert d.lease() == []
    d.now = due
    assert len(d.lease()) == 1


def test_leases_through_the_bucket_are_decided_by_stamped_time_alone() -> None:
    def run() -> tuple[list[int], str]:
        d = Driver(lifecycle=True)
        d.create(max_dispatch_per_s=7.5)
        got = []
        for step in range(200):
            d.now += (step * 37) % 190
            d.enqueue()
            got.append(len(d.lease(n=(step % 4) + 1)))
        return got, state_hash(d.m)

    first, again = run(), run()
    assert first == again
    # 7.5 per second over the stamped span, plus the first second's burst.
    span_s = sum((step * 37) % 190 for step in range(200)) / 1000
    assert sum(first[0]) <= 7.5 * span_s + 7.5 + 1


def test_a_restored_bucket_goes_on_where_it_was(d: Driver) -> None:
    d.create(max_dispatch_per_s=2)
    for _ in range(10):
        d.enqueue()
    d.lease(n=2)
    d.now += 700
    d.lease()
    copy = Driver(restore(snapshot_bytes(d.m)), now=d.now)
    assert copy.m.next_dispatch_ms("q") == d.m.next_dispatch_ms("q")
    for step in range(6):
        d.now += 300 * step
        copy.now = d.now
        assert [j.job_id for j in d.lease(n=3)] == [j.job_id for j in copy.lease(n=3)]
    assert state_hash(copy.m) == state_hash(d.m)


def test_a_rate_change_keeps_what_the_bucket_held(d: Driver) -> None:
    d.create()
    for _ in range(100):
        d.enqueue()
    assert d.m.next_dispatch_ms("q") is None
    update(d, mask=("max_dispatch_per_s",), max_dispatch_per_s=3)  # starts full
    assert len(d.lease(n=10)) == 3
    d.now += 500  # 1.5 leases' worth at 3/s
    eff = apply(
        d,
        update_queue=pb.UpdateQueueRequest(
            queue="q",
            config=pb.QueueConfig(max_dispatch_per_s=1),
            update_mask=["max_dispatch_per_s"],
        ),
    )
    assert eff.woken == {"q": 97}  # a limit changed: waiting leases look again
    assert len(d.lease(n=10)) == 1  # capped at the new capacity: one lease
    assert d.m.next_dispatch_ms("q") == d.now + 1000
    update(d, mask=("max_dispatch_per_s",), max_dispatch_per_s=0)
    assert d.m.next_dispatch_ms("q") is None
    assert len(d.lease(n=10)) == 10
    q = d.m.queues["q"]
    assert (q.dispatch_tokens, q.dispatch_at_ms) == (0, 0)


# ----------------------------------------------------------- max_inflight


def test_max_inflight_caps_leased_jobs_and_a_freed_slot_wakes(d: Driver) -> None:
    d.create(max_inflight=2, default_lease_ms=1000, backoff_base_ms=10, backoff_max_ms=10)
    for _ in range(10):
        d.enqueue()
    a, b = d.lease(n=5)
    assert d.lease() == []
    assert not d.m.has_ready("q")
    leases = [pb.JobLease(job_id=a.job_id, lease_id=a.lease_id)]
    eff = apply(d, ack=pb.AckRequest(queue="q", leases=leases))
    assert eff.woken == {"q": 1}
    assert d.m.has_ready("q")
    assert len(d.lease(n=5)) == 1
    # A nack frees the slot (and its job waits out its backoff).
    eff = apply(d, nack=pb.NackRequest(queue="q", job_id=b.job_id, lease_id=b.lease_id))
    assert eff.woken == {"q": 1}
    assert len(d.lease(n=5)) == 1
    # An expiry frees it too.
    eff = apply(d, advance_ms=1000)
    assert eff.woken.get("q", 0) >= 1
    assert len(d.lease(n=5)) == 2


def test_a_slot_freed_below_the_cap_wakes_nobody(d: Driver) -> None:
    d.create(max_inflight=3)
    for _ in range(5):
        d.enqueue()
    job = d.lease()[0]
    leases = [pb.JobLease(job_id=job.job_id, lease_id=job.lease_id)]
    assert apply(d, ack=pb.AckRequest(queue="q", leases=leases)).woken == {}


def test_lowering_max_inflight_below_the_leased_count_holds_leases(d: Driver) -> None:
    d.create()
    for _ in range(10):
        d.enqueue()
    held = d.lease(n=4)
    update(d, mask=("max_inflight",), max_inflight=2)
    assert d.lease() == []
    assert d.ack(held[0]) is not None
    assert d.lease() == []  # 3 leased, cap 2
    d.ack(held[1])
    eff = apply(
        d,
        ack=pb.AckRequest(
            queue="q", leases=[pb.JobLease(job_id=held[2].job_id, lease_id=held[2].lease_id)]
        ),
    )
    assert eff.woken == {"q": 1}  # 2 -> 1: a slot
    assert len(d.lease(n=5)) == 1
    eff = apply(
        d,
        update_queue=pb.UpdateQueueRequest(
            queue="q", config=pb.QueueConfig(max_inflight=0), update_mask=["max_inflight"]
        ),
    )
    assert eff.woken == {"q": 5}
    assert len(d.lease(n=10)) == 5


def test_limits_combine_the_tightest_wins(d: Driver) -> None:
    d.create(max_inflight=3, max_dispatch_per_s=10)
    for _ in range(20):
        d.enqueue()
    assert len(d.lease(n=20)) == 3  # the cap, though the bucket holds 10
    pause(d)
    d.now += 10_000
    assert d.lease(n=20) == []
    resume(d)
    assert d.lease(n=20) == []  # still 3 leased


def test_create_queue_again_with_another_config_names_the_fields() -> None:
    have = pb.QueueConfig(max_attempts=5, default_lease_ms=30_000, min_priority=0)
    asked = pb.QueueConfig(max_attempts=3, default_lease_ms=30_000, delete_when_idle=True)
    assert config_differences(have, asked) == [
        "max_attempts is 5, asked 3",
        "min_priority is 0, asked unset",
        "delete_when_idle is false, asked true",
    ]
