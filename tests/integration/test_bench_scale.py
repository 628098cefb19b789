"""``make bench-scale`` (bench/scale.py) end to end at a tiny depth, so it cannot rot:
real node processes, one alone and three in a cluster, every phase run."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from bench import scale


def leaves(d: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(d, dict):
        for k, v in d.items():
            yield from leaves(v, f"{path}.{k}")
    elif isinstance(d, list):
        for i, v in enumerate(d):
            yield from leaves(v, f"{path}[{i}]")
    else:
        yield path, d


async def test_the_bench_runs_at_2k_jobs_and_fills_every_field(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["--jobs", "2k", "--seconds", "0.5", "--settle-s", "0.2", "-o", "json", "-q"]
    # Snapshots every 100 entries: the writes phase sees one within a second.
    argv.append("--node-arg=--snapshot-every-entries=100")
    assert await scale.main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    [depth] = result["depths"]
    assert depth["jobs"] == 2000
    missing = [path for path, value in leaves(depth) if value is None]
    assert not missing, f"not measured: {missing}"
    failed = [path for path, _ in leaves(depth) if path.endswith(".error")]
    assert not failed, {p: v for p, v in leaves(depth) if p in failed}
    single, cluster = depth["single"], depth["cluster"]
    assert single["fill"]["jobs"] == 2000
    assert single["snapshot"]["taken"] >= 1
    assert single["snapshot"]["bytes"] > 0
    assert single["writes"]["during_snapshot"]["n"] >= 1
    for restart in ("restart", "restart_snapshot"):
        assert single[restart]["jobs_present"] == 2000
        assert single[restart]["all_present"] is True
    assert [m["node"] for m in cluster["memory"]] == ["n1", "n2", "n3"]
    assert cluster["catch_up"]["stats_equal"] is True


async def test_a_node_that_cannot_start_is_reported_not_waited_for(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["--jobs", "2k", "-o", "json", "-q", "--node-arg=--snapshot-every-entries=0"]
    assert await scale.main(argv) == 0
    [depth] = json.loads(capsys.readouterr().out)["depths"]
    for setup in ("single", "cluster"):
        assert "snapshot_every_entries must be at least 1" in depth[setup]["error"]
        assert "cannot run (while starting)" in depth[setup]["error"]
        assert depth[setup]["fill"]["jobs"] is None


def test_a_failed_phase_is_reported_as_such() -> None:
    single = scale.single_template(1_000_000)
    single["restart"]["error"] = "PhaseError: not serving after 120 s: node 1 cannot run: boom"
    lines = scale.report_single(single)
    assert any(
        "log as filled" in line and "FAILED: PhaseError: not serving" in line for line in lines
    )
    assert any("from a snapshot" in line and "not measured" in line for line in lines)
    checks = scale.targets({"jobs": 1_000_000, "single": single, "cluster": None})
    assert "restart (log) <= 10 s, every job back: not measured" in checks[0]
    assert "RSS <= 400 MB: not measured" in checks[0]
