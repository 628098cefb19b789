"""The checker bites: each core broken on purpose is caught within a bounded sweep."""

from __future__ import annotations

from typing import Any

from tests.sim.checker import SafetyViolation
from tests.sim.cluster import Simulation
from tests.sim.planted import (
    CountsPartialPromise,
    ReadsWithoutQuorum,
    SkipsPromiseFsync,
    VotesBeforeFsync,
)
from tests.sim.test_sweep import HARSH, TINY


def first_violation(seeds: range, **options: Any) -> str:
    for seed in seeds:
        try:
            Simulation(seed, faults=HARSH, **options).run()
        except SafetyViolation as exc:
            return str(exc)
    return ""


def test_skipping_the_promise_fsync_is_caught() -> None:
    found = first_violation(range(20), replica_cls=SkipsPromiseFsync)
    assert "below the" in found  # a restarted node forgot what it promised


def test_counting_the_leaders_vote_before_its_fsync_is_caught() -> None:
    found = first_violation(range(60), replica_cls=VotesBeforeFsync)
    assert "applied" in found or "lost" in found  # two values chosen for one slot


def test_replying_before_commit_is_caught() -> None:
    found = first_violation(range(20), ack_on_propose=True)
    # An acknowledged value did not survive (or was not even committed when
    # a read that began after its acknowledgement was answered).
    assert "lost" in found or "acked" in found or "stale read" in found


def test_reading_without_a_quorum_round_is_caught() -> None:
    found = first_violation(range(40), replica_cls=ReadsWithoutQuorum)
    assert "stale read" in found  # a cut-off leader answered from its old state


def test_counting_half_a_multi_part_promise_is_caught() -> None:
    found = first_violation(range(3000, 3100), replica_cls=CountsPartialPromise, budgets=TINY)
    # A chosen value was replaced: seen as a different value applied, an
    # acknowledged one lost, or a read that misses an acknowledged write.
    assert "applied" in found or "lost" in found or "stale read" in found


def test_the_correct_core_passes_the_same_seeds() -> None:
    assert first_violation(range(20)) == ""
