"""The tree before issue 15, measured in the same run (``bench/before_tree.py``):
where its files come from, and how the CPU target reads its figures."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from bench import before_tree
from bench.report import before_tree_line, targets


def _git(repo: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-C", str(repo), *args], capture_output=True, text=True, check=True
    )
    return done.stdout.strip()


@pytest.fixture
def repo(tmp_path: Path) -> tuple[Path, str]:
    """A real repository with two commits: the old tree, then a newer one."""
    repo = tmp_path / "repo"
    (repo / "bench").mkdir(parents=True)
    _git(repo, "init", "-q")
    _git(repo, "config", "user.email", "t@example.invalid")
    _git(repo, "config", "user.name", "t")
    (repo / "bench" / "run.py").write_text("OLD = True\n")
    _git(repo, "add", ".")
    _git(repo, "commit", "-q", "-m", "old")
    old = _git(repo, "rev-parse", "--short", "HEAD")
    (repo / "bench" / "run.py").write_text("OLD = False\n")
    (repo / "new.py").write_text("")
    _git(repo, "commit", "-q", "-am", "new")
    _git(repo, "add", "new.py")
    _git(repo, "commit", "-q", "-m", "newer")
    return repo, old


def test_the_old_tree_comes_from_history_as_it_was_and_only_once(
    repo: tuple[Path, str], tmp_path: Path
) -> None:
    path, old = repo
    into = tmp_path / "run"
    into.mkdir()
    tree = before_tree.checkout(old, into, repo=path)
    assert tree == into / f"tree-{old}"
    assert (tree / "bench" / "run.py").read_text() == "OLD = True\n"
    assert not (tree / "new.py").exists()
    assert not list(into.glob(".tree-*"))  # no half-extracted leftover
    (tree / "bench" / "run.py").write_text("touched\n")
    assert before_tree.checkout(old, into, repo=path) == tree
    assert (tree / "bench" / "run.py").read_text() == "touched\n"  # not extracted again


def test_a_commit_the_history_lacks_says_so(repo: tuple[Path, str], tmp_path: Path) -> None:
    path, _ = repo
    with pytest.raises(before_tree.BeforeTreeError, match=r"not in .*--unshallow"):
        before_tree.checkout("0123456789abcdef", tmp_path, repo=path)


async def test_a_tree_without_a_bench_is_refused_before_anything_runs(tmp_path: Path) -> None:
    with pytest.raises(before_tree.BeforeTreeError, match=r"no bench/run\.py"):
        await before_tree.measure(tmp_path, ["pq-balancer"], 1.0, tmp_path / "out")


def test_the_old_bench_is_asked_for_its_single_cells_as_json(tmp_path: Path) -> None:
    cmd = before_tree.command(["pq-balancer", "pq-direct"], 10.0, tmp_path)
    assert cmd[1:] == [
        "-m",
        "bench.run",
        "--systems",
        "pq-balancer,pq-direct",
        "--scenarios",
        "single",
        "--seconds",
        "10",
        "--out-dir",
        str(tmp_path),
        "-o",
        "json",
        "-q",
    ]


def _result(cpu: dict[str, float]) -> dict[str, Any]:
    cells = {
        key: {"cpu_us_per_job": us, "history": {"ok": True}, "error": ""} for key, us in cpu.items()
    }
    return {"ratios": {}, "scenarios": [{"key": "single", "rate": 0.0, "cells": cells}]}


def _cpu_targets(found: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {t["what"].split("(")[1].split(")")[0]: t for t in found if "CPU" in t["what"]}


def test_the_cpu_target_compares_with_the_old_tree_measured_in_this_run() -> None:
    old_run = {
        "commit": "891eb5c",
        "cells": before_tree.summary(_result({"pq-balancer": 3_000.0, "pq-direct": 1_500.0})),
        "error": "",
    }
    # A file from another machine with a far higher figure is not used.
    elsewhere = _result({"pq-balancer": 90_000.0, "pq-direct": 90_000.0})
    result = _result({"pq-balancer": 590.0, "pq-direct": 600.0})
    found = _cpu_targets(targets(result, [elsewhere], old_run))
    assert found["pq-balancer"]["ok"] is True
    assert found["pq-balancer"]["value"] == (
        "590 us vs 3,000 us before, measured in this run (891eb5c): 5.1x less"
    )
    assert found["pq-direct"]["ok"] is False  # 2.5x
    # Without the old tree's figures, the files are what there is.
    found = _cpu_targets(targets(result, [elsewhere]))
    assert found["pq-balancer"]["ok"] is True
    assert "another run" in found["pq-balancer"]["value"]


def test_an_old_tree_that_could_not_run_leaves_the_target_unmeasured() -> None:
    failed = {"commit": "891eb5c", "cells": {}, "error": "commit 891eb5c is not in ..."}
    found = _cpu_targets(targets(_result({"pq-balancer": 590.0}), [], failed))
    assert found["pq-balancer"]["ok"] is None
    assert found["pq-balancer"]["value"] == "590 us/job, no --before or --before-commit"
    assert before_tree_line(failed) == (
        "before issue 15 (891eb5c), single-job e2e in this run: "
        "not measured: commit 891eb5c is not in ..."
    )
    cells = before_tree.summary(_result({"pq-balancer": 3_106.4}))
    cells["pq-balancer"]["jobs_per_s"] = 540.2
    line = before_tree_line({"commit": "891eb5c", "cells": cells, "error": ""})
    assert line.endswith("pq-balancer 540 jobs/s, 3,106 us CPU/job")


def test_make_bench_measures_the_same_commit_the_bench_names() -> None:
    makefile = Path(__file__).resolve().parents[2] / "Makefile"
    assert f"BEFORE ?= {before_tree.BEFORE_ISSUE_15}\n" in makefile.read_text()
