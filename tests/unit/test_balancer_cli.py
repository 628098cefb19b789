"""``pq balancer run``'s coalescing and stream flags reach the balancer's config."""

from __future__ import annotations

import pytest

from balancer.config import BalancerConfig
from pqueue.cli import build_parser


def config_of(monkeypatch: pytest.MonkeyPatch, *flags: str) -> BalancerConfig:
    seen: list[BalancerConfig] = []

    def serve(config: BalancerConfig, log_level: str, log_format: str = "text") -> int:
        seen.append(config)
        return 0

    monkeypatch.setattr("balancer.runner.run_balancer", serve)
    args = build_parser().parse_args(["balancer", "run", "--backends", "h:1,h:2", *flags])
    assert args.run(args) == 0
    [config] = seen
    config.validate()
    return config


def test_coalescing_is_on_unless_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    default = config_of(monkeypatch)
    assert (default.coalesce, default.coalesce_in_flight, default.max_streams) == (True, 1, 4096)
    off = config_of(monkeypatch, "--no-coalesce")
    assert not off.coalesce
    tuned = config_of(monkeypatch, "--coalesce-in-flight", "2", "--max-streams", "10")
    assert (tuned.coalesce, tuned.coalesce_in_flight, tuned.max_streams) == (True, 2, 10)


def test_a_setting_that_cannot_work_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        BalancerConfig(backends=("h:1",), coalesce_in_flight=0).validate()
