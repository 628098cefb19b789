"""The tree before issue 15, measured on this machine in the same run
(``python -m bench.run --before-commit 891eb5c``; ``make bench`` does).

Issue 15 asks for CPU per end-to-end job to fall 5x from the figure the
README recorded first. That figure was measured on another machine, and a
ratio across machines says little (session 8's machine made every system
about twice as costly). So the bench measures the old tree here, minutes
before the current one: ``BEFORE_ISSUE_15`` is the bench's own first commit,
whose servers and SDK are 4a25ab1's, unchanged (one unary call per enqueue,
lease and ack at every hop; the long-poll ``Worker``). Its own ``bench.run``
runs its single-job cell (``-o json``) once per column, each in a process
(and process group) of its own, on a cluster of its own, after the machine
is quiet, with the old tree first on the path and this interpreter (the
same packages), and with this run's seconds, concurrency and drain timeout.
That is how the current tree's cells run too (``make bench``: a fresh
cluster per cell, a quiet machine first). They are measured before this
run starts its own systems, so none of those idles beside them.

The tree comes from this checkout's history (``git archive`` of the
commit's full id) into the run's temporary directory (outside the source
tree, which the linters and type checker walk); a shallow clone lacks it
and says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

#: The commit that added ``make bench`` on top of 4a25ab1 (the tree the
#: README's "before issue 15" figures were measured on): nothing but bench/
#: differs from 4a25ab1.
BEFORE_ISSUE_15 = "891eb5c7b4d373ad8847511eec63ba2374e23c0c"

#: pqueue's columns that tree knows (``pq-proxy`` came later).
OLD_SYSTEMS = ("pq-balancer", "pq-direct")

#: After an interrupt, how long the old bench has to stop its cluster.
STOP_GRACE_S = 15.0

ROOT = Path(__file__).resolve().parent.parent


class BeforeTreeError(Exception):
    """The old tree could not be had or measured: the reason, for the table."""


def _git(repo: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, timeout=120)


def resolve(commit: str, repo: Path = ROOT) -> str:
    """``commit``'s full id in ``repo``'s history, or why it is not there."""
    if not commit or commit.startswith("-"):
        raise BeforeTreeError(f"{commit!r} is not a commit")
    try:
        found = _git(repo, "rev-parse", "--verify", "--quiet", f"{commit}^{{commit}}")
        if found.returncode == 0:
            return found.stdout.decode().strip()
        if _git(repo, "rev-parse", "--git-dir").returncode != 0:
            raise BeforeTreeError(f"{repo} is not a git checkout")
        shallow = _git(repo, "rev-parse", "--is-shallow-repository").stdout.strip() == b"true"
    except FileNotFoundError as exc:
        raise BeforeTreeError("git is not installed") from exc
    except (OSError, subprocess.SubprocessError) as exc:
        raise BeforeTreeError(f"git failed: {exc}") from exc
    why = f"commit {commit} is not in {repo}'s history"
    raise BeforeTreeError(why + ("; a shallow clone: `git fetch --unshallow`" if shallow else ""))


def checkout(commit: str, into: Path, repo: Path = ROOT) -> Path:
    """``commit``'s files under ``into/tree-<its id>`` (extracted once)."""
    full = resolve(commit, repo)
    tree = into / f"tree-{full[:12]}"
    if (tree / "bench" / "run.py").is_file():
        return tree
    partial = into / f".tree-{full[:12]}.partial"
    try:
        archive = _git(repo, "archive", "--format=tar", full)
        if archive.returncode != 0:
            why = archive.stderr.decode(errors="replace").strip()
            raise BeforeTreeError(f"git archive {full[:12]} failed: {why}")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
            if hasattr(tarfile, "data_filter"):  # 3.11.4+: nothing outside, no devices
                tar.extractall(partial, filter="data")
            else:  # pragma: no cover - an older 3.11; our own history's files
                tar.extractall(partial)
        shutil.rmtree(tree, ignore_errors=True)
        partial.rename(tree)
    except (OSError, subprocess.SubprocessError, tarfile.TarError) as exc:
        shutil.rmtree(partial, ignore_errors=True)
        raise BeforeTreeError(f"cannot extract {full[:12]}: {exc}") from exc
    return tree


@dataclass(frozen=True)
class Load:
    """What the old cells run: the same as this run's single-job cells."""

    seconds: float
    concurrency: int
    drain_timeout_s: float

    def timeout_s(self) -> float:
        """The most one old cell may take: start, load, drain, stop."""
        return 120.0 + self.seconds + self.drain_timeout_s


def command(system: str, load: Load, out_dir: Path) -> list[str]:
    """The old tree's own bench: its single-job cell for ``system``, as JSON."""
    return [
        sys.executable,
        "-m",
        "bench.run",
        "--systems",
        system,
        "--scenarios",
        "single",
        "--seconds",
        f"{load.seconds:g}",
        "--concurrency",
        str(load.concurrency),
        "--drain-timeout",
        f"{load.drain_timeout_s:g}",
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


async def measure(
    tree: Path, system: str, load: Load, out_dir: Path, timeout_s: float | None = None
) -> dict[str, Any]:
    """Run the old tree's single-job cell for ``system``; its result document.

    The old bench runs in a process group of its own, its output to files
    (no pipe that nobody reads can hold it up): on a timeout or an interrupt
    the group gets SIGINT (its own cleanup stops its cluster), then, after
    ``STOP_GRACE_S``, SIGKILL, so no old node outlives it."""
    tree, out_dir = _resolved(tree, out_dir)
    limit = load.timeout_s() if timeout_s is None else timeout_s
    env = dict(os.environ, PYTHONPATH=str(tree))
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        try:
            proc = await asyncio.create_subprocess_exec(
                *command(system, load, out_dir),
                cwd=tree,
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
            )
        except OSError as exc:
            raise BeforeTreeError(f"cannot start its bench: {exc}") from exc
        try:
            await asyncio.wait_for(proc.wait(), limit)
        except TimeoutError as exc:
            raise BeforeTreeError(f"its {system} cell took over {limit:g} s") from exc
        finally:
            if proc.returncode is None:
                await _stop_group(proc)
        printed, said = _read(out), _read(err)
    if proc.returncode != 0:
        tail = said.decode(errors="replace").strip().splitlines()[-3:]
        raise BeforeTreeError(f"its bench exited {proc.returncode}: {' / '.join(tail)}")
    try:
        result: dict[str, Any] = json.loads(printed)
    except json.JSONDecodeError as exc:
        raise BeforeTreeError(f"its bench printed no JSON: {exc}") from exc
    return result


def _read(file: IO[bytes]) -> bytes:
    file.seek(0)
    return file.read()


async def _stop_group(proc: asyncio.subprocess.Process) -> None:
    """SIGINT to the old bench's group, a grace, then SIGKILL to what is left
    (a second interrupt during the grace skips to that, never past it)."""
    try:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGINT)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(proc.wait()), STOP_GRACE_S)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # whatever of the group is left
    await proc.wait()


def summary(before: dict[str, Any]) -> dict[str, Any]:
    """What the result keeps of an old run: per column, its single cell's
    throughput, CPU per job and history check."""
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
