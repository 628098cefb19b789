"""The tree before issue 15, measured in the same run (``bench/before_tree.py``):
where its files come from, how its bench is run, and how the CPU target reads
its figures. Real git repositories and real processes; the old bench here is
a stand-in tree of a few lines (the real one, in the slow
``test_bench_e2e``, takes a minute)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from bench import before_tree
from bench.report import before_tree_line, targets

LOAD = before_tree.Load(seconds=2.0, concurrency=8, drain_timeout_s=30.0)


def _git(repo: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-C", str(repo), *args], capture_output=True, text=True, check=True
    )
    return done.stdout.strip()


@pytest.fixture
def repo(tmp_path: Path) -> tuple[Path, str]:
    """A real repository with three commits: the old tree, then newer ones."""
    repo = tmp_path / "repo"
    (repo / "bench").mkdir(parents=True)
    _git(repo, "init", "-q")
    _git(repo, "config", "user.email", "t@example.invalid")
    _git(repo, "config", "user.name", "t")
    (repo / "bench" / "run.py").write_text("OLD = True\n")
    _git(repo, "add", ".")
    _git(repo, "commit", "-q", "-m", "old")
    old = _git(repo, "rev-parse", "HEAD")
    (repo / "bench" / "run.py").write_text("OLD = False\n")
    (repo / "new.py").write_text("")
    _git(repo, "add", ".")
    _git(repo, "commit", "-q", "-m", "new")
    (repo / "newer.py").write_text("")
    _git(repo, "add", ".")
    _git(repo, "commit", "-q", "-m", "newer")
    return repo, old


def test_the_old_tree_comes_from_history_as_it_was_and_only_once(
    repo: tuple[Path, str], tmp_path: Path
) -> None:
    path, old = repo
    into = tmp_path / "run"
    into.mkdir()
    assert before_tree.resolve(old[:7], path) == old
    tree = before_tree.checkout(old[:7], into, repo=path)
    assert tree == into / f"tree-{old[:12]}"
    assert (tree / "bench" / "run.py").read_text() == "OLD = True\n"
    assert not (tree / "new.py").exists()
    assert not list(into.glob(".tree-*"))  # no half-extracted leftover
    (tree / "bench" / "run.py").write_text("touched\n")
    assert before_tree.checkout(old, into, repo=path) == tree
    assert (tree / "bench" / "run.py").read_text() == "touched\n"  # not extracted again


def test_a_commit_the_history_lacks_says_so_and_names_a_shallow_clone(
    repo: tuple[Path, str], tmp_path: Path
) -> None:
    path, old = repo
    with pytest.raises(before_tree.BeforeTreeError, match=r"is not in .* history$"):
        before_tree.checkout("0123456789abcdef", tmp_path, repo=path)
    # An option is never taken for a commit (git archive --output=...).
    with pytest.raises(before_tree.BeforeTreeError, match="is not a commit"):
        before_tree.checkout("--output=/tmp/x", tmp_path, repo=path)
    with pytest.raises(before_tree.BeforeTreeError, match="is not a git checkout"):
        before_tree.resolve(old, tmp_path / "nowhere")
    shallow = tmp_path / "shallow"
    _git(tmp_path, "clone", "-q", "--depth", "1", f"file://{path}", str(shallow))
    with pytest.raises(before_tree.BeforeTreeError, match=r"git fetch --unshallow"):
        before_tree.checkout(old, tmp_path, repo=shallow)


def test_the_old_bench_is_asked_for_one_column_with_this_runs_load(tmp_path: Path) -> None:
    cmd = before_tree.command("pq-direct", LOAD, tmp_path)
    assert cmd[1:] == [
        "-m",
        "bench.run",
        "--systems",
        "pq-direct",
        "--scenarios",
        "single",
        "--seconds",
        "2",
        "--concurrency",
        "8",
        "--drain-timeout",
        "30",
        "--out-dir",
        str(tmp_path),
        "-o",
        "json",
        "-q",
    ]


def _stand_in(tree: Path, body: str) -> Path:
    """A tree whose ``bench/run.py`` is ``body``, with a ``pqueue`` of its own."""
    for package in ("bench", "pqueue"):
        (tree / package).mkdir(parents=True, exist_ok=True)
        (tree / package / "__init__.py").write_text("")
    (tree / "bench" / "run.py").write_text(textwrap.dedent(body))
    return tree


async def test_the_old_bench_runs_in_its_own_tree_and_its_json_is_read(tmp_path: Path) -> None:
    tree = _stand_in(
        tmp_path / "old",
        """
        import json, os, sys
        import pqueue
        print(json.dumps({"cwd": os.getcwd(), "pqueue": pqueue.__file__, "argv": sys.argv[1:]}))
        """,
    )
    got = await before_tree.measure(tree, "pq-balancer", LOAD, tmp_path / "out")
    assert got["cwd"] == str(tree.resolve())
    # Its own pqueue, not this checkout's (installed or on the path).
    assert got["pqueue"] == str(tree.resolve() / "pqueue" / "__init__.py")
    assert got["argv"][:2] == ["--systems", "pq-balancer"]


async def test_an_old_bench_that_fails_or_prints_no_json_is_reported(tmp_path: Path) -> None:
    failing = _stand_in(
        tmp_path / "failing", "import sys\nprint('boom', file=sys.stderr)\nsys.exit(3)\n"
    )
    with pytest.raises(before_tree.BeforeTreeError, match="exited 3: boom"):
        await before_tree.measure(failing, "pq-balancer", LOAD, tmp_path / "out")
    chatty = _stand_in(tmp_path / "chatty", "print('a table, not JSON')\n")
    with pytest.raises(before_tree.BeforeTreeError, match="printed no JSON"):
        await before_tree.measure(chatty, "pq-balancer", LOAD, tmp_path / "out")
    with pytest.raises(before_tree.BeforeTreeError, match=r"no bench/run\.py"):
        await before_tree.measure(tmp_path / "empty", "pq-balancer", LOAD, tmp_path / "out")


async def test_an_old_bench_past_its_time_is_stopped_with_what_it_started(
    tmp_path: Path,
) -> None:
    # It starts a child (as the old bench starts its nodes), fills its stderr
    # past any pipe's buffer and ignores SIGINT: the whole group goes, the
    # child included, within the time and the grace.
    pid_file = tmp_path / "child.pid"
    tree = _stand_in(
        tmp_path / "stuck",
        f"""
        import signal, subprocess, sys, time
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        open({str(pid_file)!r}, "w").write(str(child.pid))
        sys.stderr.write("x" * (4 << 20))
        sys.stderr.flush()
        time.sleep(120)
        """,
    )
    before_tree.STOP_GRACE_S, grace = 0.5, before_tree.STOP_GRACE_S
    started = time.monotonic()
    try:
        with pytest.raises(before_tree.BeforeTreeError, match="took over 2 s"):
            await before_tree.measure(tree, "pq-balancer", LOAD, tmp_path / "out", timeout_s=2.0)
    finally:
        before_tree.STOP_GRACE_S = grace
    assert time.monotonic() - started < 2.0 + 0.5 + 5
    child = int(pid_file.read_text())
    for _ in range(50):  # reaped by init once killed
        if not _alive(child):
            break
        await asyncio.sleep(0.1)
    assert not _alive(child)


async def test_an_old_bench_past_its_time_is_asked_to_stop_first(tmp_path: Path) -> None:
    # SIGINT first: the old bench's own cleanup stops its cluster.
    said = tmp_path / "said"
    tree = _stand_in(
        tmp_path / "slow",
        f"""
        import sys, time
        try:
            time.sleep(120)
        except KeyboardInterrupt:
            open({str(said)!r}, "w").write("stopping my cluster")
            sys.exit(1)
        """,
    )
    started = time.monotonic()
    with pytest.raises(before_tree.BeforeTreeError, match="took over 1 s"):
        await before_tree.measure(tree, "pq-balancer", LOAD, tmp_path / "out", timeout_s=1.0)
    assert said.read_text() == "stopping my cluster"
    assert time.monotonic() - started < 1.0 + 5  # not the whole grace: it stopped


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _result(cpu: dict[str, float], history_ok: bool = True) -> dict[str, Any]:
    cells = {
        key: {"cpu_us_per_job": us, "jobs_per_s": 500.0, "history": {"ok": history_ok}}
        for key, us in cpu.items()
    }
    return {"ratios": {}, "scenarios": [{"key": "single", "rate": 0.0, "cells": cells}]}


def _cpu_targets(found: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {t["what"].split("(")[1].split(")")[0]: t for t in found if "CPU" in t["what"]}


def _old(cells: dict[str, Any], error: str = "") -> dict[str, Any]:
    return {"commit": before_tree.BEFORE_ISSUE_15, "cells": cells, "error": error}


def test_the_cpu_target_compares_with_the_old_tree_measured_in_this_run() -> None:
    old_run = _old(before_tree.summary(_result({"pq-balancer": 3_000.0, "pq-direct": 1_500.0})))
    # A file from another machine with a far higher figure is not used.
    elsewhere = _result({"pq-balancer": 90_000.0, "pq-direct": 90_000.0})
    result = _result({"pq-balancer": 590.0, "pq-direct": 600.0})
    found = _cpu_targets(targets(result, [elsewhere], old_run))
    assert found["pq-balancer"]["ok"] is True
    assert found["pq-balancer"]["value"] == (
        "590 us vs 3,000 us before, measured in this run (891eb5c7b4d3): 5.1x less"
    )
    assert found["pq-direct"]["ok"] is False  # 2.5x
    # Without the old tree, the files are what there is, and say so.
    found = _cpu_targets(targets(result, [elsewhere]))
    assert found["pq-balancer"]["ok"] is True
    assert "another run" in found["pq-balancer"]["value"]


def test_an_old_tree_that_did_not_run_or_lost_jobs_leaves_the_target_unmeasured() -> None:
    why = f"commit {before_tree.BEFORE_ISSUE_15[:7]} is not in its history"
    result = _result({"pq-balancer": 590.0})
    found = _cpu_targets(targets(result, [_result({"pq-balancer": 90_000.0})], _old({}, why)))
    assert found["pq-balancer"]["ok"] is None  # and the file from elsewhere is not used
    assert found["pq-balancer"]["value"] == f"590 us/job, the tree before not measured: {why}"
    assert before_tree_line(_old({}, why)) == (
        f"before issue 15 (891eb5c7b4d3), single-job e2e in this run: not measured: {why}"
    )
    lost = _old(before_tree.summary(_result({"pq-balancer": 3_106.4}, history_ok=False)))
    found = _cpu_targets(targets(result, [], lost))
    assert found["pq-balancer"]["ok"] is None
    assert found["pq-balancer"]["value"].endswith("its history check failed")
    assert before_tree_line(lost).endswith(
        "pq-balancer 500 jobs/s, 3,106 us CPU/job (history check FAILED)"
    )


def test_make_bench_measures_the_same_commit_the_bench_names() -> None:
    makefile = Path(__file__).resolve().parents[2] / "Makefile"
    assert f"BEFORE ?= {before_tree.BEFORE_ISSUE_15}\n" in makefile.read_text()


def test_a_run_document_keeps_each_old_column_single_cell() -> None:
    doc = _result({"pq-balancer": 3_000.0})
    doc["scenarios"].append({"key": "batch", "cells": {"pq-balancer": {"cpu_us_per_job": 1.0}}})
    kept = before_tree.summary(json.loads(json.dumps(doc)))
    assert kept == {
        "pq-balancer": {
            "jobs_per_s": 500.0,
            "cpu_us_per_job": 3_000.0,
            "cpu_us_per_job_by": None,
            "history_ok": True,
            "error": "",
        }
    }
