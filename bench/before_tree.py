"""The tree before issue 15, measured on this machine in the same run
(``python -m bench.run --before-commit 891eb5c``; ``make bench`` does).

Issue 15 asks for CPU per end-to-end job to fall 5x from the figure the
README recorded first. That figure was measured on another machine, and a
ratio across machines says little (session 8's machine made every system
about twice as costly). So the bench measures the old tree here, minutes
before the current one: ``BEFORE_ISSUE_15`` is the bench's own first commit,
whose servers and SDK are 4a25ab1's, unchanged (one unary call per enqueue,
lease and ack at every hop; the long-poll ``Worker``). Its own ``bench.run``
runs its single-job cells (``-o json``), in a process of its own, with the
old tree first on the path and this interpreter (the same packages).

The tree comes from this checkout's history (``git archive``) into the
run's temporary directory (outside the source tree, which the linters and
type checker walk); a shallow clone lacks it and says so.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

#: The commit that added ``make bench`` on top of 4a25ab1 (the tree the
#: README's "before issue 15" figures were measured on): nothing but bench/
#: differs from 4a25ab1.
BEFORE_ISSUE_15 = "891eb5c"

#: pqueue's columns that tree knows (``pq-proxy`` came later).
OLD_SYSTEMS = ("pq-balancer", "pq-direct")

ROOT = Path(__file__).resolve().parent.parent


class BeforeTreeError(Exception):
    """The old tree could not be had or measured: the reason, for the table."""


def checkout(commit: str, into: Path, repo: Path = ROOT) -> Path:
    """``commit``'s files under ``into/tree-<commit>`` (extracted once)."""
    tree = into / f"tree-{commit}"
    if (tree / "bench" / "run.py").is_file():
        return tree
    try:
        archive = subprocess.run(
            ["git", "-C", str(repo), "archive", "--format=tar", commit],
            capture_output=True,
            check=True,
            timeout=120,
        ).stdout
    except FileNotFoundError as exc:
        raise BeforeTreeError("git is not installed") from exc
    except subprocess.CalledProcessError as exc:
        why = exc.stderr.decode(errors="replace").strip().splitlines()
        raise BeforeTreeError(
            f"commit {commit} is not in {repo}'s history ({why[-1] if why else exc}); "
            "a shallow clone needs `git fetch --unshallow`"
        ) from exc
    partial = into / f".tree-{commit}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(partial, filter="data")
    shutil.rmtree(tree, ignore_errors=True)
    partial.rename(tree)
    return tree


def command(systems: list[str], seconds: float, out_dir: Path) -> list[str]:
    """The old tree's own bench: its single-job cells for ``systems``, as JSON."""
    return [
        sys.executable,
        "-m",
        "bench.run",
        "--systems",
        ",".join(systems),
        "--scenarios",
        "single",
        "--seconds",
        f"{seconds:g}",
        "--out-dir",
        str(out_dir),
        "-o",
        "json",
        "-q",
    ]


def _resolved(tree: Path, out_dir: Path) -> tuple[Path, Path]:
    tree = tree.resolve()
    if not (tree / "bench" / "run.py").is_file():
        raise BeforeTreeError(f"{tree} has no bench/run.py")
    return tree, out_dir.resolve()


async def measure(tree: Path, systems: list[str], seconds: float, out_dir: Path) -> dict[str, Any]:
    """Run the old tree's single-job cells; its result document."""
    tree, out_dir = _resolved(tree, out_dir)
    env = dict(os.environ, PYTHONPATH=str(tree))
    proc = await asyncio.create_subprocess_exec(
        *command(systems, seconds, out_dir),
        cwd=tree,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await proc.communicate()
    except BaseException:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        raise
    if proc.returncode != 0:
        tail = err.decode(errors="replace").strip().splitlines()[-3:]
        raise BeforeTreeError(f"its bench exited {proc.returncode}: {' / '.join(tail)}")
    try:
        result: dict[str, Any] = json.loads(out)
    except json.JSONDecodeError as exc:
        raise BeforeTreeError(f"its bench printed no JSON: {exc}") from exc
    return result


def summary(before: dict[str, Any]) -> dict[str, Any]:
    """What the result keeps of the old tree's run: per column, its single
    cell's throughput, CPU per job and history check."""
    cells: dict[str, Any] = {}
    for scenario in before.get("scenarios", []):
        if scenario.get("key") != "single":
            continue
        for key, c in scenario["cells"].items():
            cells[key] = {
                "jobs_per_s": c.get("jobs_per_s"),
                "cpu_us_per_job": c.get("cpu_us_per_job"),
                "cpu_us_per_job_by": c.get("cpu_us_per_job_by"),
                "history_ok": c.get("history", {}).get("ok"),
                "error": c.get("error", ""),
            }
    return cells
