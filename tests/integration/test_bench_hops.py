"""``python -m bench.hops`` (one hop's cost by transport) in a small run, so
it cannot rot: every shape between two real processes, the busy processes
started and stopped. It checks the shape of the output, never the figures."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import hops


def _children(parent: int | None = None) -> set[int]:
    """A process's live children (this one's by default), from /proc."""
    me = str(parent or os.getpid())
    kids = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[1] == me and fields[0] != "Z":
            kids.add(int(pid))
    return kids


def test_every_shape_makes_round_trips_between_two_processes(
    capsys: pytest.CaptureFixture[str],
) -> None:
    before = _children()
    assert hops.main(["--n", "60", "--rounds", "1", "--hogs", "1", "-o", "json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == 60
    assert result["hogs"] == 1
    assert set(result["shapes"]) == set(hops.SHAPES)
    for [row] in result["shapes"].values():
        assert 0 < row["p50_us"] <= row["p90_us"] <= row["p99_us"]
        assert row["asking_cpu_us"] > 0
        assert row["answering_cpu_us"] >= 0
    assert _children() == before  # the busy process and every round's two are gone


def test_the_table_names_each_shape_and_the_ratio(capsys: pytest.CaptureFixture[str]) -> None:
    assert hops.main(["--n", "30", "--rounds", "1", "--shapes", "grpc-peer,tcp"]) == 0
    out = capsys.readouterr().out
    assert "grpc-peer" in out
    assert "tcp" in out
    assert "tcp / grpc-peer, p50:" in out


def test_an_unknown_shape_is_refused() -> None:
    with pytest.raises(SystemExit):
        hops.main(["--shapes", "carrier-pigeon"])


def test_a_killed_bench_leaves_no_process_behind() -> None:
    root = Path(__file__).resolve().parents[2]
    cmd = [sys.executable, "-m", "bench.hops", "--n", "100000", "--hogs", "1"]
    bench = subprocess.Popen(cmd, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while len(kids := _children(bench.pid)) < 3:  # a busy one, and a round's two
            assert time.monotonic() < deadline, kids
            time.sleep(0.05)
        bench.send_signal(signal.SIGKILL)
        bench.wait()
        deadline = time.monotonic() + 10
        while alive := [k for k in kids if os.path.exists(f"/proc/{k}")]:
            zombies = []
            for k in alive:
                try:
                    with open(f"/proc/{k}/stat") as f:
                        zombies.append(f.read().rsplit(")", 1)[1].split()[0] == "Z")
                except OSError:
                    zombies.append(True)
            if all(zombies):
                break
            assert time.monotonic() < deadline, f"still running: {alive}"
            time.sleep(0.05)
    finally:
        if bench.poll() is None:
            bench.kill()
            bench.wait()
