"""``make bench``'s cell order (bench/run.py ``cell_order``): every scenario
runs every system once, and the first cell moves along the columns; and
before each cell, the wait for a quiet machine (bench/e2e.py ``until_quiet``)."""

from __future__ import annotations

from typing import Any

from bench.run import cell_order


def test_each_scenario_starts_one_system_further_and_runs_them_all() -> None:
    systems = ["pq-balancer", "pq-direct", "pq-proxy", "postgres", "nats"]
    orders = [cell_order(systems, k) for k in range(7)]
    assert [o[0] for o in orders] == [*systems, *systems[:2]]
    assert all(sorted(o) == sorted(systems) for o in orders)
    assert orders[1] == ["pq-direct", "pq-proxy", "postgres", "nats", "pq-balancer"]
    assert cell_order([], 3) == []


async def test_a_cell_waits_for_two_quiet_samples_in_a_row_or_gives_up() -> None:
    from bench.e2e import until_quiet

    def sampler(busy: list[float], now: list[float]) -> Any:
        async def sample() -> float:
            now[0] += 0.5
            return busy.pop(0)

        return sample

    now = [0.0]
    waited, quiet = await until_quiet(
        sampler([0.9, 0.1, 0.8, 0.2, 0.1, 0.9], now), 0.25, 20, lambda: now[0]
    )
    assert (waited, quiet) == (2.5, True)  # the 4th and 5th samples: one quiet sample is not enough
    now = [0.0]
    waited, quiet = await until_quiet(sampler([0.9] * 100, now), 0.25, 3.0, lambda: now[0])
    assert (waited, quiet) == (3.0, False)  # never quiet: it gives up, and says so
