"""Credit accounting of a ``Consume`` stream: the node's count and the consumer's slots."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pqueue.consumer import Credits as Slots
from pqueue.errors import InvalidArgumentError
from pqueue.node.consume import MAX_CREDITS, Credits


def test_the_node_counts_credits_up_to_a_thousand_outstanding() -> None:
    credits = Credits()
    credits.grant(600)
    credits.use(200)
    credits.grant(600)  # 400 left + 600 = 1000: the bound itself is fine
    assert credits.left == MAX_CREDITS == 1000
    with pytest.raises(InvalidArgumentError) as refused:
        credits.grant(1)
    assert refused.value.field == "credits"
    assert credits.left == 1000  # a refused grant adds nothing


def test_the_node_never_pushes_more_than_is_left() -> None:
    credits = Credits()
    credits.grant(3)
    with pytest.raises(ValueError, match="3 credits left"):
        credits.use(4)
    credits.use(3)
    assert credits.left == 0


def test_a_consumer_grants_only_free_slots() -> None:
    slots = Slots(4)
    assert slots.grant() == 4  # all free: all promised
    assert slots.grant() == 0  # nothing free is left to promise
    assert slots.pushed(3) == 0
    assert (slots.held, slots.promised) == (3, 1)
    slots.finished()
    assert slots.grant() == 1  # the finished job's slot, granted again
    assert (slots.held, slots.promised) == (2, 2)


def test_a_lost_stream_forgets_its_promises_but_not_the_jobs_in_hand() -> None:
    slots = Slots(8)
    slots.grant()
    slots.pushed(5)
    slots.lost()
    assert (slots.held, slots.promised) == (5, 0)
    assert slots.grant() == 3  # a new stream gets only what is free
    slots.finished()
    with pytest.raises(ValueError, match="no job is held"):
        Slots(8).finished()  # nothing held: a bug, said loudly


def test_jobs_beyond_the_credits_are_counted_and_held() -> None:
    slots = Slots(2)
    slots.grant()
    assert slots.pushed(3) == 1  # a node's fault: one came beyond the credits
    assert (slots.held, slots.promised) == (3, 0)
    assert slots.grant() == 0


@pytest.mark.parametrize("n", [0, 1001])
def test_slots_are_one_to_a_thousand(n: int) -> None:
    with pytest.raises(ValueError, match="slots must be"):
        Slots(n)


@given(
    slots=st.integers(1, 50),
    steps=st.lists(st.sampled_from(["grant", "push", "finish", "lose"]), max_size=200),
    sizes=st.lists(st.integers(1, 60), min_size=200, max_size=200),
)
def test_node_and_consumer_agree_and_slots_are_never_overrun(
    slots: int, steps: list[str], sizes: list[int]
) -> None:
    """A consumer and the node it streams from, driven through any order of
    grants, pushes (never beyond the node's count), finishes and lost streams:
    the node's count is the consumer's promise, and jobs in hand never exceed
    the slots."""
    consumer = Slots(slots)
    node = Credits()
    for step, size in zip(steps, sizes, strict=False):
        if step == "grant":
            node.grant(consumer.grant())
        elif step == "push":
            n = min(size, node.left)
            node.use(n)
            assert consumer.pushed(n) == 0
        elif step == "finish" and consumer.held:
            consumer.finished()
        elif step == "lose":
            consumer.lost()
            node = Credits()  # a new stream starts from nothing
        assert node.left == consumer.promised
        assert consumer.held + consumer.promised <= slots
