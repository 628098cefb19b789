"""``QueueState.take_ready``'s short path (one lane, no heap entry, one
FIFO) does what its general path does, entry after entry: the same leases
in the same order and the same state, so replicas of either release stay
alike through a rolling upgrade."""

from __future__ import annotations

from typing import Any

import pytest

from pqueue.core.jobs import QueueState
from pqueue.core.machine import QueueMachine
from pqueue.core.snapshot import take_snapshot
from pqueue.v1 import log_pb2 as logpb
from tests.unit.test_derive_reference import drive


class Recording(QueueMachine):
    """Keeps every entry's results and the state after it."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[list[str], bytes]] = []

    def apply_entry(self, entry: logpb.LogEntry, respond: bool = True) -> Any:
        effects = super().apply_entry(entry, respond)
        state = take_snapshot(self).SerializeToString(deterministic=True)
        self.seen.append(([repr(r) for r in effects.results], state))
        return effects


@pytest.mark.parametrize(("priorities", "retries"), [(1, False), (2, False), (1, True), (3, True)])
@pytest.mark.parametrize("seed", range(3))
def test_the_short_path_does_what_the_general_one_does(
    seed: int, priorities: int, retries: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    short = Recording()
    drive(short, seed, 400, priorities, retries)
    monkeypatch.setattr(QueueState, "take_ready", QueueState._take_next)
    general = Recording()
    drive(general, seed, 400, priorities, retries)
    assert len(short.seen) == len(general.seen)
    for index, (a, b) in enumerate(zip(short.seen, general.seen, strict=True)):
        assert a == b, f"entry {index}"
