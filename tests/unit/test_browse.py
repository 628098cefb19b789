"""ListJobs on the state machine (``pqueue.core.browse``): each state's order,
the filters, stable pages, refusals, and a hypothesis property that paging
gives exactly the sorted, filtered list, even with changes between pages."""

from __future__ import annotations

from collections import deque
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pqueue.core import browse
from pqueue.core.jobs import (
    CANCELLED,
    COMPLETED,
    DEAD,
    DELAYED,
    LEASED,
    MAX_FIFO_PRIORITIES,
    READY,
    STATES,
    Job,
    QueueState,
)
from pqueue.core.snapshot import state_hash
from pqueue.errors import InvalidArgumentError, NotFoundError
from pqueue.v1 import log_pb2 as logpb
from pqueue.v1 import queue_pb2 as pb
from tests.machine_driver import Driver

Q = "acme/q"


def listing(
    d: Driver, state: pb.JobState.ValueType, queue: str = Q, **req: Any
) -> pb.ListJobsResponse:
    query = browse.parse(pb.ListJobsRequest(queue=queue, state=state, **req))
    return d.m.list_jobs(queue, query)


def ids(d: Driver, state: pb.JobState.ValueType, queue: str = Q, **req: Any) -> list[int]:
    return [j.job_id for j in listing(d, state, queue, **req).jobs]


def every_page(
    d: Driver,
    state: pb.JobState.ValueType,
    limit: int,
    queue: str = Q,
    page_token: str = "",
    **req: Any,
) -> list[int]:
    """Every job, a page at a time (from ``page_token``)."""
    out: list[int] = []
    token = page_token
    while True:
        page = listing(d, state, queue, limit=limit, page_token=token, **req)
        assert len(page.jobs) <= limit
        got = [j.job_id for j in page.jobs]
        assert not set(got) & set(out), "a job listed twice"
        out += got
        token = page.next_page_token
        if not token:
            return out
        assert len(page.jobs) == limit  # a page is short only when it is the last


def put(d: Driver, tenant: str = "acme", queue: str = Q, **spec: Any) -> int:
    """One job enqueued by ``tenant``'s producer (the leader's stamp)."""
    r = d.ok(
        enqueue=pb.EnqueueBatchRequest(queue=queue, jobs=[pb.JobSpec(payload=b"p", **spec)]),
        caller=logpb.Caller(tenant=tenant),
    )
    return int(r.results[0].job_id)


def shared(d: Driver, aging: int = 0, max_attempts: int = 0) -> None:
    config = pb.QueueConfig(
        aging_interval_ms=aging,
        max_attempts=max_attempts,
        shares=[pb.TenantShare(tenant="beta"), pb.TenantShare(tenant="gamma")],
    )
    d.ok(create_queue=pb.CreateQueueRequest(queue=Q, config=config))


def finish(d: Driver, job_id: int, state: pb.JobState.ValueType, queue: str = Q) -> None:
    """Turn a dead job into a COMPLETED or CANCELLED record now: force-complete
    it, or requeue and cancel it (the operator's actions)."""
    if state == COMPLETED:
        d.ok(complete_job=pb.CompleteJobRequest(queue=queue, job_id=job_id))
        return
    d.ok(requeue_job=pb.RequeueJobRequest(queue=queue, job_id=job_id, delay_ms=60_000))
    d.ok(cancel_job=pb.CancelJobRequest(queue=queue, job_id=job_id))


def cancel_compact(d: Driver, job_id: int, queue: str = Q) -> None:
    """Remove a waiting job from the middle of its FIFO, as a cancel does:
    its id stays behind in the FIFO (lazy), and must be skipped."""
    q = d.m.queues[queue]
    assert q.jobs.row(job_id) is not None
    d.m._remove(q, q.jobs[job_id])


def kill(d: Driver, n: int, queue: str = Q) -> list[int]:
    """Lease and nack ``n`` jobs of a one-attempt queue: dead, in that order."""
    out = []
    for job in d.lease(queue, n=n):
        d.nack(job, queue=queue, reason="boom")
        out.append(job.job_id)
        d.now += 1
    return out


# ------------------------------------------------------------------ order


def test_ready_lists_in_lease_order_over_fifos_and_objects() -> None:
    d = Driver(lifecycle=True)
    shared(d)
    a = put(d, priority=2)
    b = put(d, priority=0)
    d.now += 10
    c = put(d, priority=2)
    g1 = put(d, priority=1, group="g")  # grouped: a Job object, the group's head
    g2 = put(d, priority=0, group="g")  # behind g1: listed at its own key
    e = put(d, priority=0)
    [leased] = d.lease(Q)  # b: priority 0, the oldest
    assert leased.job_id == b
    d.now += 5
    d.nack(leased, queue=Q, delay_ms=0)  # ready again, an object, at a later time
    order = ids(d, READY)
    assert order == [g2, e, b, g1, a, c]
    # The same order as leases take them (the group's second job excepted).
    assert [j.job_id for j in d.lease(Q, n=6)] == [e, b, g1, a, c]


def test_ready_with_aging_is_the_aged_key_order() -> None:
    d = Driver(lifecycle=True)
    shared(d, aging=100)
    old = put(d, priority=3)  # key 3*100 + t
    d.now += 250
    new = put(d, priority=1)  # key 1*100 + t + 250: served after the old one
    d.now += 100
    newer = put(d, priority=0)  # key t + 350
    q = d.m.queues[Q]
    expected = sorted((old, new, newer), key=lambda i: q.ready_key(q.jobs[i])[:3])
    assert ids(d, READY) == expected == [old, new, newer]
    assert [j.job_id for j in d.lease(Q, n=3)] == expected
    # Jobs held as objects (grouped) are ordered by the same aged key.
    d.now += 1000
    grouped = [put(d, priority=p, group=f"g{p}") for p in (2, 1, 0)]
    d.now += 150
    late = put(d, priority=0, group="late")
    listed = ids(d, READY)
    assert listed == [grouped[2], grouped[1], late, grouped[0]]
    assert [j.job_id for j in d.lease(Q, n=4)] == listed  # each heads its group


def test_ready_beyond_the_fifo_priorities_is_read_from_objects() -> None:
    d = Driver(lifecycle=True)
    shared(d)
    made = [put(d, priority=p) for p in reversed(range(MAX_FIFO_PRIORITIES + 4))]
    assert d.m.queues[Q].jobs.compact == MAX_FIFO_PRIORITIES  # the rest are objects
    assert ids(d, READY, limit=1000) == list(reversed(made))
    assert every_page(d, READY, 5) == list(reversed(made))


def test_delayed_by_ready_time_then_id() -> None:
    d = Driver(lifecycle=True)
    late = put(d, delay_ms=5000)
    soon = put(d, delay_ms=1000, priority=9)
    tie = put(d, delay_ms=1000)
    put(d)  # ready: not listed
    assert ids(d, DELAYED) == [soon, tie, late]


def test_leased_by_lease_expiry_then_id() -> None:
    d = Driver(lifecycle=True)
    first, second, third = (put(d) for _ in range(3))
    d.lease(Q, lease_ms=9000)  # first
    d.lease(Q, n=2, lease_ms=1000)  # second, third
    jobs = listing(d, LEASED).jobs
    assert [j.job_id for j in jobs] == [second, third, first]
    assert [j.lease_expires_at_ms for j in jobs] == [d.now + 1000] * 2 + [d.now + 9000]


def test_dead_completed_and_cancelled_newest_first() -> None:
    d = Driver(lifecycle=True)
    shared(d, max_attempts=1)
    for _ in range(6):
        put(d)
    dead = kill(d, 6)
    d.now += 100
    finish(d, dead[0], COMPLETED)
    finish(d, dead[3], COMPLETED)
    finish(d, dead[1], CANCELLED)
    assert ids(d, DEAD) == [dead[5], dead[4], dead[2]]
    assert ids(d, COMPLETED) == [dead[3], dead[0]]  # the same time: by id, descending
    assert ids(d, CANCELLED) == [dead[1]]
    dead_jobs = listing(d, DEAD).jobs
    assert [j.reason for j in dead_jobs] == ["attempts exhausted"] * 3
    assert [j.finished_at_ms for j in dead_jobs] == sorted(
        (j.finished_at_ms for j in dead_jobs), reverse=True
    )


def test_dead_jobs_from_before_lifecycle_come_last_by_id() -> None:
    d = Driver()  # lifecycle off: dead jobs get no finished_at_ms
    shared(d, max_attempts=1)
    for _ in range(3):
        put(d)
    old = kill(d, 3)
    d.ok(tick=logpb.Tick(lifecycle=True))
    put(d)
    new = kill(d, 1)
    assert ids(d, DEAD) == new + sorted(old, reverse=True)
    assert every_page(d, DEAD, 1) == new + sorted(old, reverse=True)


# ---------------------------------------------------------------- filters


def test_filters_priority_group_and_tenant() -> None:
    d = Driver(lifecycle=True)
    shared(d)
    jobs: dict[int, tuple[str, int, str]] = {}
    for i in range(24):
        tenant, priority, group = ("acme", "beta", "gamma")[i % 3], i % 4, ("", "", "g")[i % 2]
        jobs[put(d, tenant, priority=priority, group=group)] = (tenant, priority, group)
    q = d.m.queues[Q]
    everything = ids(d, READY)
    assert everything == sorted(jobs, key=lambda i: q.ready_key(q.jobs[i])[:3])

    def expect(pick: Any) -> list[int]:
        return [i for i in everything if pick(*jobs[i])]

    assert ids(d, READY, min_priority=1, max_priority=2) == expect(lambda t, p, g: 1 <= p <= 2)
    assert ids(d, READY, min_priority=3) == expect(lambda t, p, g: p >= 3)
    assert ids(d, READY, max_priority=0) == expect(lambda t, p, g: p == 0)
    assert ids(d, READY, tenant="beta") == expect(lambda t, p, g: t == "beta")
    assert ids(d, READY, group="g") == expect(lambda t, p, g: g == "g")
    assert ids(d, READY, group="g", tenant="gamma", max_priority=1) == expect(
        lambda t, p, g: g == "g" and t == "gamma" and p <= 1
    )
    assert ids(d, READY, tenant="nobody") == []
    assert every_page(d, READY, 2, tenant="acme", min_priority=1) == expect(
        lambda t, p, g: t == "acme" and p >= 1
    )


# ------------------------------------------------------------ pagination


def test_pages_are_stable_when_jobs_come_and_go_between_them() -> None:
    d = Driver(lifecycle=True)
    shared(d)
    made = [put(d, priority=i % 2) for i in range(10)]  # all at one ready time
    order = made[0::2] + made[1::2]  # priority 0 first, then by id
    first = listing(d, READY, limit=4)
    assert [j.job_id for j in first.jobs] == order[:4]
    # Between pages: a listed job is leased, two unlisted ones leave, and
    # three arrive: one ahead of the cursor (never listed now), two after it.
    assert [j.job_id for j in d.lease(Q)] == order[:1]
    cancel_compact(d, order[5])
    cancel_compact(d, order[6])
    urgent = put(d, priority=-1)
    same = put(d, priority=0)  # priority 0, the same ready time, a larger id
    late = put(d, priority=1)
    rest = every_page(d, READY, 3, page_token=first.next_page_token)
    assert urgent not in rest
    assert rest == [order[4], same, *order[7:], late]


def test_a_stale_run_in_a_fifo_is_skipped_when_resuming() -> None:
    d = Driver(lifecycle=True)
    shared(d)
    made = [put(d) for _ in range(50)]
    for job_id in made[10:40]:  # a long run of ids whose jobs left
        cancel_compact(d, job_id)
    for job_id in made[42:44]:
        cancel_compact(d, job_id)
    left = made[:10] + made[40:42] + made[44:]
    for limit in (1, 3, 7, 10, 11):
        assert every_page(d, READY, limit) == left
    token = browse.encode_token(READY, (0, d.now, made[20]))  # a cursor inside the run
    assert ids(d, READY, page_token=token) == made[40:42] + made[44:]


def test_a_read_changes_nothing() -> None:
    d = Driver(lifecycle=True)
    shared(d, max_attempts=1)
    for i in range(30):
        put(d, ("acme", "beta")[i % 2], priority=i % 3, group="g" if i % 5 == 0 else "")
    kill(d, 3)
    put(d, delay_ms=100)
    before = state_hash(d.m)
    for state in STATES:
        every_page(d, state, 4)
    assert state_hash(d.m) == before


def test_paging_with_aging_resumes_after_a_config_change() -> None:
    # The token keeps (priority, ready time, id), so the cursor is placed
    # in whatever order the queue has now.
    d = Driver(lifecycle=True)
    shared(d, aging=0)
    made = [put(d, priority=i % 3) for i in range(9)]
    first = listing(d, READY, limit=3)
    q = d.m.queues[Q]
    q.config.aging_interval_ms = 1  # (as UpdateQueue would)
    rest = every_page(d, READY, 2, page_token=first.next_page_token)
    cursor = q.ready_key(q.jobs[first.jobs[-1].job_id])[:3]
    assert rest == sorted(
        (i for i in made if q.ready_key(q.jobs[i])[:3] > cursor),
        key=lambda i: q.ready_key(q.jobs[i])[:3],
    )


def test_the_objects_index_falls_back_to_a_full_pass() -> None:
    # An index that lost a member (a bug elsewhere) must not lose a job here.
    d = Driver(lifecycle=True)
    shared(d)
    for _ in range(20):
        put(d, delay_ms=10)  # objects, not listed as ready
    grouped = [put(d, group="g") for _ in range(3)]
    d.m.queues[Q].oldest.clear()
    assert ids(d, READY) == grouped


# --------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({}, "state"),
        ({"state": 99}, "state"),
        ({"state": READY, "limit": 1001}, "limit"),
        ({"state": READY, "min_priority": 3, "max_priority": 2}, "min_priority"),
        ({"state": READY, "page_token": "%%%"}, "page_token"),
        ({"state": READY, "page_token": "AAAA"}, "page_token"),
        ({"state": DELAYED, "page_token": browse.encode_token(READY, (1, 2, 3))}, "page_token"),
        ({"state": READY, "page_token": browse.encode_token(READY, (1, 2, 3))[:-3]}, "page_token"),
        ({"state": DEAD, "page_token": "Ag" + browse.encode_token(DEAD, (1, 2))[2:]}, "page_token"),
    ],
)
def test_bad_requests_name_the_field(request_fields: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidArgumentError) as err:
        browse.parse(pb.ListJobsRequest(queue=Q, **request_fields))
    assert err.value.field == field


def test_limits_default_and_bound() -> None:
    d = Driver(lifecycle=True)
    for _ in range(150):
        d.enqueue()
    page = listing(d, READY, "q")
    assert len(page.jobs) == 100
    assert page.next_page_token
    page = listing(d, READY, "q", limit=1000)
    assert len(page.jobs) == 150
    assert not page.next_page_token


def test_a_page_stops_short_of_its_byte_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(browse, "MAX_PAGE_BYTES", 250)
    d = Driver(lifecycle=True)
    made = [d.enqueue("q", payload=b"x" * 100) for _ in range(5)]
    big = d.enqueue("q", payload=b"y" * 400)  # over the bound: alone on its page
    pages, token = [], ""
    while True:
        page = listing(d, READY, "q", page_token=token)
        pages.append([j.job_id for j in page.jobs])
        token = page.next_page_token
        if not token:
            break
    assert pages == [made[:2], made[2:4], made[4:], [big]]


def test_an_unknown_queue_is_not_found() -> None:
    d = Driver(lifecycle=True)
    with pytest.raises(NotFoundError):
        listing(d, READY, "nope")
    d.enqueue("q")
    assert ids(d, DEAD, "q") == []


def test_a_fifo_is_read_from_its_nearer_end() -> None:
    for size in range(12):
        line = deque(range(size))
        for start in range(size + 1):
            for chunk in (1, 2, 5):
                assert list(browse._ids_from(line, start, chunk)) == list(range(start, size))


def test_the_token_round_trips() -> None:
    for state in STATES:
        fields = (-(2**31), 2**62, 7) if state == READY else (0, 2**63 - 1)
        assert browse.decode_token(browse.encode_token(state, fields), state) == fields


# ---------------------------------------------------------------- property


def reference_key(queue: QueueState, job: Job) -> tuple[int, ...]:
    """The documented order, computed from the machine's own serving key."""
    if job.state == READY:
        return tuple(queue.ready_key(job)[:3])
    if job.state == DELAYED:
        return (job.ready_at_ms, job.job_id)
    if job.state == LEASED:
        return (job.lease_expires_at_ms, job.job_id)
    return (-job.finished_at_ms, -job.job_id)


def reference(
    d: Driver, state: pb.JobState.ValueType, flt: dict[str, Any]
) -> list[tuple[tuple[int, ...], int]]:
    q = d.m.queues[Q]
    query = browse.parse(pb.ListJobsRequest(queue=Q, state=state, **flt))
    return sorted(
        (reference_key(q, job), job.job_id)
        for job in q.jobs.values()
        if job.state == state and query.admits(job)
    )


TENANTS = ("acme", "beta", "gamma")

op = st.one_of(
    st.tuples(
        st.just("put"),
        st.sampled_from(TENANTS),
        st.integers(0, 3),
        st.sampled_from(["", "", "", "g", "h"]),
        st.sampled_from([0, 0, 0, 50, 500]),
        st.integers(1, 3),
    ),
    st.tuples(st.just("lease"), st.integers(1, 4), st.sampled_from([100, 1000])),
    st.tuples(st.just("settle"), st.sampled_from(["ack", "nack", "retry", "release"])),
    st.tuples(st.just("time"), st.integers(0, 300)),
    st.tuples(st.just("cancel"), st.integers(0, 10_000)),
    st.tuples(st.just("finish"), st.sampled_from([COMPLETED, CANCELLED])),
)


def _bounds_in_order(flt: dict[str, Any]) -> bool:
    return bool(flt.get("min_priority", 0) <= flt.get("max_priority", 3))


filters: st.SearchStrategy[dict[str, Any]] = st.fixed_dictionaries(
    {},
    optional={
        "min_priority": st.integers(0, 3),
        "max_priority": st.integers(0, 3),
        "group": st.sampled_from(["g", "h"]),
        "tenant": st.sampled_from(TENANTS),
    },
).filter(_bounds_in_order)


def play(d: Driver, ops: list[Any], leased: list[pb.LeasedJob]) -> None:
    for step in ops:
        kind = step[0]
        if kind == "put":
            _, tenant, priority, group, delay, count = step
            for _ in range(count):
                put(d, tenant, priority=priority, group=group, delay_ms=delay)
        elif kind == "lease":
            leased += d.lease(Q, n=step[1], lease_ms=step[2])
        elif kind == "settle" and leased:
            job = leased.pop(0)
            how = step[1]
            if how == "ack":
                d.ack(job, queue=Q)
            else:
                d.nack(job, queue=Q, delay_ms=0 if how == "retry" else 40, release=how == "release")
        elif kind == "time":
            d.tick(step[1])
        elif kind == "cancel":
            q = d.m.queues[Q]
            compact = [i for i in q.jobs if q.jobs.row(i) is not None]
            if compact:
                cancel_compact(d, compact[step[1] % len(compact)])
        elif kind == "finish":
            q = d.m.queues[Q]
            dead = sorted(q.dead_ids)
            if dead:
                finish(d, dead[0], step[1])
        d.now += 1


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    aging=st.sampled_from([0, 0, 7]),
    before=st.lists(op, max_size=40),
    between=st.lists(op, max_size=8),
    state=st.sampled_from((READY, *STATES)),  # READY has most paths
    flt=filters,
    limit=st.integers(1, 6),
)
def test_paging_gives_the_sorted_filtered_list(
    aging: int,
    before: list[Any],
    between: list[Any],
    state: pb.JobState.ValueType,
    flt: dict[str, Any],
    limit: int,
) -> None:
    d = Driver(lifecycle=True)
    shared(d, aging=aging, max_attempts=2)
    leased: list[pb.LeasedJob] = []
    play(d, before, leased)
    expected = reference(d, state, flt)
    # Paging through an unchanging queue: exactly the sorted, filtered list.
    assert every_page(d, state, limit, **flt) == [i for _, i in expected]
    # With changes between two pages: the second page starts right after the
    # first page's last place, in the order as it is now.
    first = listing(d, state, limit=limit, **flt)
    play(d, between, leased)
    if not first.next_page_token:
        return
    cursor = next(k for k, i in expected if i == first.jobs[-1].job_id)
    now = [i for k, i in reference(d, state, flt) if k > cursor]
    assert every_page(d, state, limit, page_token=first.next_page_token, **flt) == now
