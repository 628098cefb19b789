"""Holding an idle leader's entry for the other side (``pqueue.node.mixing``)."""

from __future__ import annotations

import pytest

from pqueue.errors import UnavailableError
from pqueue.node.commitlog import Proposals
from pqueue.node.mixing import BOTH, CONSUME, OTHER, PRODUCE, Mixer, side_of
from pqueue.v1 import log_pb2 as logpb
from pqueue.v1 import queue_pb2 as pb


def test_each_command_kind_has_its_side() -> None:
    assert side_of("enqueue") == PRODUCE
    assert {side_of(k) for k in ("lease", "ack", "nack", "extend")} == {CONSUME}
    assert side_of("create_queue") == side_of("tick") == side_of(None) == OTHER


def test_one_side_queued_behind_the_other_is_held_for_it() -> None:
    mixer = Mixer(0.002)
    mixer.proposed(PRODUCE, 0.0)  # the producers' entry
    # The consumers' acks, which queued while it was open: held up to 2 ms
    # for the producers' next enqueues.
    assert mixer.hold(CONSUME, 1.0, queued=True) == pytest.approx(1.002)
    assert mixer.hold(CONSUME, 1.001, queued=False) == pytest.approx(1.002)  # the same hold
    held = mixer.proposed(BOTH, 1.0015)  # they came
    assert held is not None
    assert held[0] == pytest.approx(0.0015)
    assert held[1] == "joined"
    # Once a hold was joined, a side alone finds the log idle and still waits...
    assert mixer.hold(PRODUCE, 2.0, queued=False) == pytest.approx(2.002)
    assert mixer.hold(PRODUCE, 2.002, queued=False) is None  # ...until the hold is over
    held = mixer.proposed(PRODUCE, 2.002)
    assert held is not None
    assert held[0] == pytest.approx(0.002)
    assert held[1] == "timed_out"
    # ...and after one that timed out, only what queued behind an open entry waits.
    mixer.proposed(CONSUME, 3.0)
    assert mixer.hold(PRODUCE, 4.0, queued=False) is None
    assert mixer.hold(PRODUCE, 4.0, queued=True) is not None


def test_a_lone_command_at_low_load_is_not_held() -> None:
    """A worker's ack after the entry that held the enqueue and its lease
    (a long poll riding behind it) found the log idle: nothing says a
    producer is coming, so it goes at once."""
    mixer = Mixer(0.002)
    mixer.proposed(BOTH, 0.0)
    assert mixer.hold(CONSUME, 1.0, queued=False) is None
    assert mixer.proposed(CONSUME, 1.0) is None  # no hold to report


def test_a_side_working_alone_is_never_held() -> None:
    mixer = Mixer(0.002)
    assert mixer.hold(PRODUCE, 0.0, queued=True) is None  # nothing proposed yet
    mixer.proposed(PRODUCE, 0.0)
    assert mixer.hold(PRODUCE, 1.0, queued=True) is None  # producers with nobody consuming
    mixer.proposed(CONSUME, 1.0)  # a drain: consumers alone from now on
    assert mixer.hold(CONSUME, 2.0, queued=True) is None
    assert mixer.proposed(CONSUME, 2.0) is None


@pytest.mark.parametrize("waiting", [BOTH, OTHER, PRODUCE | OTHER, CONSUME | OTHER, 0])
def test_both_sides_or_anything_else_goes_at_once(waiting: int) -> None:
    mixer = Mixer(0.002)
    mixer.proposed(BOTH, 0.0)
    assert mixer.hold(waiting, 1.0, queued=True) is None
    # A hold in progress ends as soon as they wait too.
    mixer.proposed(PRODUCE, 2.0)
    assert mixer.hold(CONSUME, 3.0, queued=True) is not None
    assert mixer.hold(waiting, 3.0005, queued=True) is None
    outcome = "joined" if waiting & BOTH == BOTH else "cut"
    held = mixer.proposed(waiting, 3.0005)
    assert held is not None
    assert held[1] == outcome


def test_no_hold_when_off_and_none_after_leading_ends() -> None:
    off = Mixer(0.0)
    off.proposed(PRODUCE, 0.0)
    assert off.hold(CONSUME, 1.0, queued=True) is None
    mixer = Mixer(0.002)
    mixer.proposed(PRODUCE, 0.0)
    assert mixer.hold(CONSUME, 1.0, queued=True) is not None
    mixer.reset()  # the node stopped leading mid-hold
    assert mixer.hold(CONSUME, 5.0, queued=True) is None  # a new leader's first entry goes
    with pytest.raises(ValueError, match="negative"):
        Mixer(-1.0)


async def test_proposals_know_the_sides_of_what_waits() -> None:
    proposals = Proposals()
    enqueue = logpb.Command(enqueue=pb.EnqueueBatchRequest(queue="q"))
    ack = logpb.Command(ack=pb.AckRequest(queue="q"))
    tick = logpb.Command(tick=logpb.Tick())
    assert proposals.sides() == 0
    first = proposals.add(enqueue)
    proposals.add(ack)
    assert proposals.sides() == BOTH
    batch = proposals.peek_batch(1)
    assert proposals.sides_of_first(len(batch)) == PRODUCE
    proposals.remove(batch)
    first.cancel()  # it went into an entry (this test resolves nothing)
    assert proposals.sides() == CONSUME
    proposals.add(tick)
    assert proposals.sides() == CONSUME | OTHER
    waiting = [fut for _, fut in proposals.items]
    proposals.fail(UnavailableError("the log stopped"))
    assert proposals.sides() == 0
    assert len(proposals) == 0
    assert all(isinstance(fut.exception(), UnavailableError) for fut in waiting)
