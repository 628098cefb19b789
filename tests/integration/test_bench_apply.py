"""``python -m bench.apply`` (the pure core's cost per job) in a small run,
so it cannot rot: both workloads, both steps a replica runs and the
leader's stamp, in fresh processes, and ``--compare`` against a tree (this
one). It checks the shape of the output, never the figures."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from bench import apply
from pqueue.core import snapshot
from pqueue.v1 import log_pb2 as logpb
from pqueue.v1 import queue_pb2 as pb

ROOT = Path(__file__).resolve().parents[2]


def test_a_small_run_reports_every_step_of_every_workload(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert apply.main(["--jobs", "400", "--rounds", "1", "-o", "json"]) == 0
    result = json.loads(capsys.readouterr().out)
    [(tree, workloads)] = result.items()
    assert tree == "this tree"
    assert set(workloads) == {"batch", "single"}
    for [row] in workloads.values():
        assert set(row) == {"stamp", "check", "apply", "derive", "all", "jobs"}
        assert row["apply"] > 0
        assert row["derive"] > 0
        assert row["all"] > 0
    # Jobs went all the way through (enqueued, leased, acked): whole
    # entries' worth, the single workload's last 16 never acked.
    assert workloads["batch"][0]["jobs"] == 400
    assert workloads["single"][0]["jobs"] == 384


def test_compare_alternates_two_trees_and_prints_their_ratio(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert apply.main(["--jobs", "400", "--rounds", "2", "--compare", str(ROOT)]) == 0
    lines = capsys.readouterr().out.splitlines()
    # The table: a tree's name in 30 columns, then the workload's.
    rows = [(line[:30].strip(), line[31:39].strip()) for line in lines]
    assert [row for row in rows if row[1] in ("batch", "single")] == [
        (str(ROOT)[-30:], "batch"),
        (str(ROOT)[-30:], "single"),
        ("this tree", "batch"),
        ("this tree", "single"),
    ]
    assert any(line.startswith("batch: this tree / ") for line in lines)
    assert any(line.startswith("single: this tree / ") for line in lines)


def test_the_workloads_fail_loudly_when_a_command_is_refused() -> None:
    replay = apply.Replay()
    with pytest.raises(Exception, match="queue"):
        replay.apply([logpb.Command(lease=pb.LeaseRequest(queue="missing"))])


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind is not installed")
def test_instructions_counts_a_job_under_callgrind() -> None:
    """``--instructions``'s figure: two callgrind replays' difference, per job."""
    per_job = apply.instructions_per_job(ROOT, "batch", 200)
    # A job's enqueue, lease and ack run thousands of bytecodes; the
    # interpreter's start-up (hundreds of millions) cancels out.
    assert 10_000 < per_job < 10_000_000


def test_snapshot_times_the_freeze_and_the_head(capsys: pytest.CaptureFixture[str]) -> None:
    """``--snapshot``: a fresh process per tree, both figures for each."""
    assert apply.main(["--snapshot", "-o", "json"]) == 0
    [(tree, costs)] = json.loads(capsys.readouterr().out).items()
    assert tree == "this tree"
    assert costs["freeze_ms"] > 0
    assert costs["head_ms"] > 0  # this core serializes the head apart from the freeze


def test_follower_times_a_second_machine_that_answers_nobody() -> None:
    """``--follower``: every entry applied twice, the second machine's steps
    timed; answering nobody, it ends in the state the driver's machine does."""
    row = apply.run_workload("batch", 400, follower=True)
    assert row["jobs"] == 400
    assert row["apply"] > 0
    replay = apply.Replay(follower=True)
    replay.apply([logpb.Command(create_queue=pb.CreateQueueRequest(queue="q"))])
    for _ in apply.batch(replay, "q", 200):
        pass
    assert replay.follower is not None
    assert replay.machine.queues["q"].counters.acked == 200
    follower, leader = (
        snapshot.take_snapshot(m).SerializeToString(deterministic=True)
        for m in (replay.follower, replay.machine)
    )
    assert follower == leader
