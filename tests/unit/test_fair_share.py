"""Queues shared between tenants: who may enqueue, and fair leasing by weight."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from pqueue.core.snapshot import restore, snapshot_bytes, state_hash, take_snapshot
from pqueue.errors import PermissionDeniedError, ResourceExhaustedError
from pqueue.v1 import log_pb2 as logpb
from pqueue.v1 import queue_pb2 as pb
from tests.machine_driver import Driver

Q = "acme/jobs"


@pytest.fixture
def d() -> Driver:
    return Driver()


def share(d: Driver, *shares: tuple[str, int], aging: int = 0) -> None:
    config = pb.QueueConfig(
        aging_interval_ms=aging,
        shares=[pb.TenantShare(tenant=t, weight=w) for t, w in shares],
    )
    d.ok(create_queue=pb.CreateQueueRequest(queue=Q, config=config))


def put(d: Driver, tenant: str, n: int = 1, admin: bool = False, **spec: Any) -> Any:
    """Enqueue ``n`` jobs as ``tenant``'s producer (the leader's stamp)."""
    return d.run(
        enqueue=pb.EnqueueBatchRequest(queue=Q, jobs=[pb.JobSpec(**spec) for _ in range(n)]),
        caller=logpb.Caller(tenant=tenant, admin=admin),
    )


def tenants(d: Driver, n: int) -> list[str]:
    """Whose jobs the next ``n`` leases get, in order."""
    return [job.tenant for job in d.lease(Q, n=n)]


def test_only_the_owner_admins_and_listed_tenants_may_enqueue(d: Driver) -> None:
    share(d, ("beta", 1))
    before = d.state()
    refused = put(d, "gamma")
    assert isinstance(refused, PermissionDeniedError)
    assert "not shared with tenant 'gamma'" in str(refused)
    assert d.state() == before
    for tenant, admin in (("acme", False), ("beta", False), ("ops", True)):
        assert isinstance(put(d, tenant, admin=admin), pb.EnqueueBatchResponse)
    # An admin enqueues on the owner's behalf.
    assert sorted(j.tenant for j in d.m.queues[Q].jobs.values()) == ["acme", "acme", "beta"]


def test_a_foreign_enqueue_never_creates_a_queue(d: Driver) -> None:
    # The same refusal as for an unshared queue: existence does not leak.
    refused = put(d, "beta")
    assert isinstance(refused, PermissionDeniedError)
    assert Q not in d.m.queues


def test_unstamped_enqueues_produce_for_the_owner(d: Driver) -> None:
    # Auth off, or logged before callers were stamped: the owner's, as then
    # nobody else could enqueue there.
    job_id = d.enqueue(Q)
    assert d.m.get_job(Q, job_id).tenant == "acme"
    assert d.lease(Q)[0].tenant == "acme"
    assert d.m.get_job("q", d.enqueue("q")).tenant == ""


def test_jobs_from_before_callers_were_stamped_stay_in_the_owners_lane(d: Driver) -> None:
    share(d, ("beta", 1))
    old = [d.enqueue(Q, group="g", idempotency_key=f"k{i}") for i in range(2)]
    put(d, "acme", group="g")  # after the upgrade: the same group, and one lane
    again = put(d, "acme", idempotency_key="k0")
    assert (again.results[0].job_id, again.results[0].duplicate) == (old[0], True)
    assert [j.job_id for j in d.lease(Q, n=3)] == [old[0]]  # one in flight: group FIFO
    assert set(d.m.queues[Q].lanes) == {"acme"}


def test_an_older_snapshot_restores_its_jobs_and_keys_to_the_owner(d: Driver) -> None:
    d.enqueue(Q, group="g", idempotency_key="k")
    before = state_hash(d.m)
    snap = take_snapshot(d.m)
    for queue in snap.queues:  # as written before jobs and keys had tenants
        for job in queue.jobs:
            job.tenant = ""
        for key in queue.dedup:
            key.tenant = ""
    restored = restore(snap.SerializeToString(deterministic=True))
    assert state_hash(restored) == before


def test_idempotency_keys_are_per_producing_tenant(d: Driver) -> None:
    share(d, ("beta", 1))
    theirs = put(d, "beta", idempotency_key="order-42").results[0]
    mine = put(d, "acme", idempotency_key="order-42").results[0]
    assert not mine.duplicate
    assert mine.job_id != theirs.job_id
    again = put(d, "beta", idempotency_key="order-42").results[0]
    assert (again.job_id, again.duplicate) == (theirs.job_id, True)


def test_weights_share_out_a_backlog(d: Driver) -> None:
    share(d, ("acme", 1), ("beta", 3))
    put(d, "acme", 200)  # acme's backlog was there first
    d.now += 1
    put(d, "beta", 200)
    first = tenants(d, 40)
    assert Counter(first) == {"acme": 10, "beta": 30}
    # Interleaved, not in runs: never more than three of beta's in a row.
    assert "beta" * 4 not in "".join("a" if t == "acme" else "beta" for t in first)


def test_equal_weights_alternate(d: Driver) -> None:
    share(d, ("beta", 1))
    put(d, "acme", 50)
    put(d, "beta", 5)
    assert tenants(d, 10) == ["acme", "beta"] * 5


def test_fairness_stays_within_the_priority_order(d: Driver) -> None:
    share(d, ("beta", 1))
    put(d, "acme", 5, priority=0)
    put(d, "beta", 5, priority=1)
    put(d, "acme", 3, priority=1)
    got = [(j.tenant, j.priority) for j in d.lease(Q, n=13)]
    assert got[:5] == [("acme", 0)] * 5
    # At priority 1 the lanes share; acme served more before, but an idle
    # or outranked lane banks nothing, so they start even.
    assert Counter(got[5:11]) == {("acme", 1): 3, ("beta", 1): 3}
    assert got[11:] == [("beta", 1)] * 2


def test_a_late_tenant_gets_its_share_at_once_but_no_back_pay(d: Driver) -> None:
    share(d, ("beta", 1))
    put(d, "acme", 100)
    assert tenants(d, 30) == ["acme"] * 30
    put(d, "beta", 100)
    assert Counter(tenants(d, 20)) == {"acme": 10, "beta": 10}


def test_with_aging_an_old_backlog_does_not_outrank_a_newcomer(d: Driver) -> None:
    share(d, ("beta", 1), aging=1000)
    put(d, "acme", 30)
    d.now += 300_000  # five minutes on: acme's backlog has aged 300 levels
    put(d, "beta", 10)
    assert Counter(tenants(d, 20)) == {"acme": 10, "beta": 10}


def test_with_aging_priority_still_leads_and_age_still_lifts(d: Driver) -> None:
    share(d, ("beta", 1), aging=1000)
    put(d, "beta", 2, priority=3)
    d.now += 1000
    put(d, "acme", 4, priority=0)
    # beta's priority 3 is not yet as urgent as acme's 0 (aged one level only).
    assert tenants(d, 4) == ["acme"] * 4
    d.now += 5000
    put(d, "acme", 4, priority=0)
    # Now acme's fresh jobs are worth less than beta's old ones, which lead and
    # set the level; acme's priority 0 is as urgent, so the two share.
    assert Counter(tenants(d, 4)) == {"acme": 2, "beta": 2}


def test_groups_are_per_tenant(d: Driver) -> None:
    share(d, ("beta", 1))
    put(d, "acme", 2, group="g")
    put(d, "beta", 2, group="g")
    leased = d.lease(Q, n=4)
    # One of each tenant's "g" is in flight at once: they are two groups.
    assert sorted(j.tenant for j in leased) == ["acme", "beta"]
    d.ack(leased[0], queue=Q)
    assert [j.tenant for j in d.lease(Q, n=4)] == [leased[0].tenant]


def test_a_shared_queue_is_not_dropped_when_idle(d: Driver) -> None:
    config = pb.QueueConfig(shares=[pb.TenantShare(tenant="beta")], delete_when_idle=True)
    r = d.run(create_queue=pb.CreateQueueRequest(queue=Q, config=config))
    assert r.__class__.__name__ == "InvalidArgumentError"


def test_depth_counts_the_producing_tenants_jobs(d: Driver) -> None:
    share(d, ("beta", 1))
    put(d, "acme", 5)
    bound = logpb.TenantLimits(max_queue_depth=3)
    ok = d.run(
        enqueue=pb.EnqueueBatchRequest(queue=Q, jobs=[pb.JobSpec()] * 3),
        caller=logpb.Caller(tenant="beta"),
        limits=bound,
    )
    assert isinstance(ok, pb.EnqueueBatchResponse)
    full = d.run(
        enqueue=pb.EnqueueBatchRequest(queue=Q, jobs=[pb.JobSpec()]),
        caller=logpb.Caller(tenant="beta"),
        limits=bound,
    )
    assert isinstance(full, ResourceExhaustedError)


def test_a_restored_replica_chooses_alike(d: Driver) -> None:
    share(d, ("beta", 2), ("gamma", 1))
    put(d, "acme", 30)
    put(d, "beta", 30, group="g")
    put(d, "gamma", 30, priority=1)
    for job in d.lease(Q, n=7):
        d.ack(job, queue=Q)
    twin = Driver(restore(snapshot_bytes(d.m)), now=d.now)
    assert state_hash(twin.m) == state_hash(d.m)
    for _ in range(5):
        mine, theirs = d.lease(Q, n=3), twin.lease(Q, n=3)
        assert [j.job_id for j in mine] == [j.job_id for j in theirs]
        for job in mine:
            d.ack(job, queue=Q)
            twin.ack(job, queue=Q)
        assert state_hash(twin.m) == state_hash(d.m)


def test_shares_are_validated_and_kept_sorted(d: Driver) -> None:
    for bad in (
        [pb.TenantShare(tenant="", weight=1)],
        [pb.TenantShare(tenant="a/b", weight=1)],
        [pb.TenantShare(tenant="a", weight=1001)],
        [pb.TenantShare(tenant="a"), pb.TenantShare(tenant="a")],
        [pb.TenantShare(tenant=f"t{i}") for i in range(65)],
    ):
        r = d.run(create_queue=pb.CreateQueueRequest(queue=Q, config=pb.QueueConfig(shares=bad)))
        assert r.__class__.__name__ == "InvalidArgumentError", bad
    shares = [pb.TenantShare(tenant="zeta"), pb.TenantShare(tenant="beta", weight=4)]
    r = d.ok(create_queue=pb.CreateQueueRequest(queue=Q, config=pb.QueueConfig(shares=shares)))
    assert [(s.tenant, s.weight) for s in r.config.shares] == [("beta", 4), ("zeta", 1)]


def test_lanes_back_from_idle_start_even_whatever_their_past(d: Driver) -> None:
    share(d, ("beta", 1), ("gamma", 1))
    put(d, "beta")
    assert tenants(d, 1) == ["beta"]  # beta has been served once; gamma never
    put(d, "acme", 20)
    assert tenants(d, 10) == ["acme"] * 10
    put(d, "gamma", 5)
    put(d, "beta", 5)
    # Both were idle: both start at the clock, so the name breaks the tie
    # (gamma's never having been served earns it nothing).
    assert tenants(d, 6) == ["beta", "gamma", "acme"] * 2
