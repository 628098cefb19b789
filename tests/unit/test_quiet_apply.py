"""A replica with no caller waiting applies an entry without building the
lease answers (``QueueMachine.apply_entry(respond=False)``): its state, its
effects and its events are those of one that answers."""

from __future__ import annotations

from typing import Any

import pytest

from pqueue.core import events, limits
from pqueue.core.machine import QueueMachine
from pqueue.core.snapshot import take_snapshot
from pqueue.v1 import log_pb2 as logpb
from pqueue.v1 import queue_pb2 as pb
from tests.unit.test_derive_reference import drive


class Answering(QueueMachine):
    """Keeps each entry it applies, with the state and events after it."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[logpb.LogEntry, bytes, list[events.Row], Any]] = []

    def apply_entry(self, entry: logpb.LogEntry, respond: bool = True) -> Any:
        effects = super().apply_entry(entry, respond)
        state = take_snapshot(self).SerializeToString(deterministic=True)
        derived = events.derive(entry, effects, self)
        kept = logpb.LogEntry.FromString(entry.SerializeToString())
        self.seen.append((kept, state, derived, effects))
        return effects


@pytest.mark.parametrize("seed", range(4))
def test_a_replica_that_answers_nobody_ends_in_the_same_state_with_the_same_events(
    seed: int,
) -> None:
    answering = Answering()
    drive(answering, seed, 400, 3, True)
    quiet = QueueMachine()
    leases = 0
    for entry, state, derived, effects in answering.seen:
        got = quiet.apply_entry(entry, respond=False)
        assert take_snapshot(quiet).SerializeToString(deterministic=True) == state
        assert events.derive(entry, got, quiet) == derived
        assert (got.woken, got.changed, got.touched, got.named) == (
            effects.woken,
            effects.changed,
            effects.touched,
            effects.named,
        )
        for mine, theirs in zip(got.results, effects.results, strict=True):
            if isinstance(theirs, pb.LeaseResponse):
                assert isinstance(mine, pb.LeaseResponse)
                assert not mine.jobs  # no job messages built for nobody
                leases += len(theirs.jobs)
            else:
                assert repr(mine) == repr(theirs)
    assert leases  # the workload leased jobs: the quiet path ran


def _entry(index: int, *commands: logpb.Command) -> logpb.LogEntry:
    return logpb.LogEntry(index=index, time_ms=1_000_000 + index, commands=commands)


@pytest.mark.parametrize("grouped", [False, True])
def test_a_quiet_lease_takes_what_an_answered_one_takes_up_to_the_byte_cap(
    grouped: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lease stops at ``MAX_LEASE_RESPONSE_BYTES`` of payload (made small
    here) whether or not it builds the answer; grouped jobs mark their
    group's job in flight alike."""
    monkeypatch.setattr(limits, "MAX_LEASE_RESPONSE_BYTES", 250)
    payload = b"p" * 100
    specs = [pb.JobSpec(payload=payload, group=f"g{i % 2}" if grouped else "") for i in range(8)]
    entries = [
        _entry(1, logpb.Command(tick=logpb.Tick(lifecycle=True))),
        _entry(2, logpb.Command(create_queue=pb.CreateQueueRequest(queue="q"))),
        _entry(3, logpb.Command(enqueue=pb.EnqueueBatchRequest(queue="q", jobs=specs))),
        _entry(4, logpb.Command(lease=pb.LeaseRequest(queue="q", max_jobs=8))),
        _entry(5, logpb.Command(lease=pb.LeaseRequest(queue="q", max_jobs=8))),
    ]
    answering, quiet = QueueMachine(), QueueMachine()
    taken = []
    for entry in entries:
        answered = answering.apply_entry(entry)
        got = quiet.apply_entry(entry, respond=False)
        assert take_snapshot(quiet).SerializeToString(deterministic=True) == take_snapshot(
            answering
        ).SerializeToString(deterministic=True)
        assert got.named == answered.named
        [result] = answered.results
        if isinstance(result, pb.LeaseResponse):
            taken.append(len(result.jobs))
    # The cap (or a group's one in flight) stopped each lease short of 8.
    assert taken == ([2, 0] if grouped else [3, 3])
