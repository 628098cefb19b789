"""``make bench``'s cell order (bench/run.py ``cell_order``): every scenario
runs every system once, and the first cell moves along the columns."""

from __future__ import annotations

from bench.run import cell_order


def test_each_scenario_starts_one_system_further_and_runs_them_all() -> None:
    systems = ["pq-balancer", "pq-direct", "pq-proxy", "postgres", "nats"]
    orders = [cell_order(systems, k) for k in range(7)]
    assert [o[0] for o in orders] == [*systems, *systems[:2]]
    assert all(sorted(o) == sorted(systems) for o in orders)
    assert orders[1] == ["pq-direct", "pq-proxy", "postgres", "nats", "pq-balancer"]
    assert cell_order([], 3) == []
