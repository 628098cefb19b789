"""The pool's rules: the weight formula, ejection, slow start, the leader."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import replace

import pytest

from balancer.pool import Pool, PoolConfig, Report, load_of, weight_of

A, B, C = "a:1", "b:2", "c:3"


def report(node_id: int, **kw: object) -> Report:
    base = Report(
        node_id=node_id,
        serving=True,
        is_leader=False,
        ballot_round=1,
        leader_id=0,
        cpu_utilization=0.0,
        in_flight_calls=0,
        pending_proposals=0,
        apply_lag_entries=0,
        applied_index=10,
        ready_jobs=0,
    )
    return replace(base, **kw)  # type: ignore[arg-type]


def pool(**config: float) -> Pool:
    p = Pool([A, B, C], random.Random(7), PoolConfig(**config))  # type: ignore[arg-type]
    for i, address in enumerate((A, B, C), start=1):
        p.on_report(address, report(i, is_leader=i == 1), now_s=0.0)
    return p


def test_the_weight_formula() -> None:
    assert weight_of(0.0) == 100  # idle
    assert weight_of(0.1) == 100
    assert weight_of(0.5) == 20
    assert weight_of(1.0) == 10  # saturated: a tenth of an idle node, never zero
    idle = report(1)
    assert load_of(idle, backlog=0) == 0.0
    assert load_of(replace(idle, cpu_utilization=0.7), backlog=0) == 0.7
    assert load_of(idle, backlog=32) == 0.5  # BACKLOG_HALF
    assert load_of(replace(idle, cpu_utilization=0.9), backlog=32) == 0.9  # the larger one


def test_reads_follow_weights_under_controlled_load_reports() -> None:
    p = pool()
    p.on_report(B, report(2, cpu_utilization=0.5), now_s=0.5)  # weight 20
    p.on_report(C, report(3, in_flight_calls=20, pending_proposals=12), now_s=0.5)  # 20
    assert {a: p.backends[a].weight for a in (A, B, C)} == {A: 100, B: 20, C: 20}
    got = Counter(p.pick() for _ in range(1400))
    assert got == Counter({A: 1000, B: 200, C: 200})


def test_probe_failures_eject_after_the_threshold_and_a_good_probe_ramps_back() -> None:
    p = pool(eject_after_failures=3, slow_start_s=10.0)
    for t in (1.0, 2.0):
        p.on_failure(B, "probe: DEADLINE_EXCEEDED", t)
        assert not p.backends[B].ejected
    p.on_failure(B, "probe: DEADLINE_EXCEEDED", 3.0)
    assert p.backends[B].ejected
    assert p.backends[B].weight == 0
    assert B not in {p.pick() for _ in range(50)}
    p.on_report(B, report(2), now_s=4.0)
    assert not p.backends[B].ejected
    assert p.backends[B].weight == 10  # the ramp's floor
    p.on_report(B, report(2), now_s=9.0)
    assert p.backends[B].weight == 50  # halfway through slow start
    p.on_report(B, report(2), now_s=14.0)
    assert p.backends[B].weight == 100
    assert p.backends[B].ejections == 1
    assert [c for c in p.changes if c[0] == B] == [(B, False), (B, True), (B, False)]


def test_an_expired_report_ejects() -> None:
    p = pool(report_expiry_s=3.0)
    for t in (1.0, 2.0, 3.0):
        p.on_report(A, report(1, is_leader=True), t)
        p.on_report(B, report(2), t)
    p.refresh(5.0)  # C last reported at 0.0, A and B at 3.0
    assert p.backends[C].ejected
    assert not p.backends[A].ejected


def test_not_serving_ejects_at_once() -> None:
    p = pool()
    p.on_health(B, False, 0.1)  # draining, or its health stream broke
    assert p.backends[B].ejected
    p.on_health(B, True, 0.2)
    assert not p.backends[B].ejected
    p.on_report(C, report(3, serving=False), 0.3)  # the report says so too
    assert p.backends[C].ejected


def test_the_leader_is_the_highest_ballot_claim_that_is_not_ejected() -> None:
    p = pool()
    assert p.leader() == A
    p.on_report(B, report(2, is_leader=True, ballot_round=2), 1.0)  # A has not heard yet
    assert p.leader() == B
    p.on_health(B, False, 1.1)
    assert p.leader() == A  # B ejected: the next claim


def test_a_not_leader_hint_redirects_until_a_report_says_otherwise() -> None:
    p = pool()
    p.on_not_leader(A, leader_id=3, now_s=1.0)
    assert p.leader() == C
    p.on_report(B, report(2, is_leader=True, ballot_round=5), 2.0)
    assert p.leader() == B


def test_an_unreachable_leader_is_forgotten_until_a_later_probe_says_it_leads() -> None:
    p = pool()
    p.on_unreachable(A, now_s=1.0)
    assert p.leader() is None
    p.on_report(A, report(1, is_leader=True), now_s=1.2, sent_at_s=0.9)  # sent before: stale
    assert p.leader() is None
    p.on_report(A, report(1, is_leader=True), now_s=1.5, sent_at_s=1.1)
    assert p.leader() == A


def test_a_stale_probe_does_not_undo_a_not_leader_hint() -> None:
    p = pool()
    p.on_report(B, report(2), now_s=0.5)
    p.on_not_leader(A, leader_id=2, now_s=1.0)  # B leads now, though B has not said so yet
    p.on_report(A, report(1, is_leader=True), now_s=1.1, sent_at_s=0.95)  # in flight before
    assert p.leader() == B
    p.refresh(5.0)  # the hint is trusted for report_expiry_s only
    assert p.leader() is None


def test_a_slow_leader_is_still_the_leader() -> None:
    p = pool(report_expiry_s=3.0)
    p.on_failure(A, "probe: DEADLINE_EXCEEDED", 1.0)
    p.on_failure(A, "probe: DEADLINE_EXCEEDED", 2.0)
    p.on_failure(A, "probe: DEADLINE_EXCEEDED", 3.0)
    p.refresh(10.0)
    assert p.backends[A].ejected  # no reads go there
    assert p.leader() == A  # but only it can take a write


def test_balancers_do_not_pick_in_lockstep() -> None:
    sequences = set()
    for seed in range(20):
        p = Pool([A, B, C], random.Random(seed))
        for i, address in enumerate((A, B, C), start=1):  # one report at a time, as probes come
            p.on_report(address, report(i), now_s=0.0)
        sequences.add(tuple(p.pick() for _ in range(6)))
    assert len(sequences) > 1


def test_bad_pools_are_refused() -> None:
    with pytest.raises(ValueError, match="distinct"):
        Pool([A, A], random.Random(0))
    with pytest.raises(ValueError, match="eject_after_failures"):
        Pool([A], random.Random(0), PoolConfig(eject_after_failures=0))
