"""Smooth weighted round robin: picks follow the weights over any window."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from balancer.picker import Picker


def picks(picker: Picker, n: int) -> list[str | None]:
    return [picker.pick() for _ in range(n)]


def test_the_nginx_sequence_spreads_a_heavy_backend_out() -> None:
    p = Picker(random.Random(0))
    p.set_weights({"a": 5})  # one backend: no cycle to enter at random yet
    p.set_weights({"a": 5, "b": 1, "c": 1})  # a cycle, entered at a random phase
    seq = picks(p, 14)
    start = next(i for i in range(7) if seq[i : i + 7] == ["a", "a", "b", "a", "c", "a", "a"])
    assert seq[start : start + 7] == ["a", "a", "b", "a", "c", "a", "a"]  # nginx's own example


@settings(max_examples=200, deadline=None)
@given(
    weights=st.lists(st.integers(min_value=0, max_value=50), min_size=1, max_size=6),
    seed=st.integers(min_value=0, max_value=2**32),
    start=st.integers(min_value=0, max_value=300),
    length=st.integers(min_value=1, max_value=300),
)
def test_every_window_of_picks_follows_the_weights(
    weights: list[int], seed: int, start: int, length: int
) -> None:
    p = Picker(random.Random(seed))
    named = {f"b{i}": w for i, w in enumerate(weights)}
    p.set_weights(named)
    total = sum(weights)
    seq = picks(p, start + length)
    if total == 0:
        assert set(seq) == {None}
        return
    window = Counter(seq[start:])
    for name, w in named.items():
        expected = length * w / total
        # Smooth WRR keeps each backend within a couple of picks of its share
        # over any window, wherever the window starts.
        assert abs(window[name] - expected) <= 2, (named, start, length, window)
        if w == 0:
            assert window[name] == 0


def test_balancers_start_at_different_points_of_the_cycle() -> None:
    weights = {"a": 3, "b": 2, "c": 1}
    starts = set()
    for seed in range(20):
        p = Picker(random.Random(seed))
        p.set_weights(weights)
        starts.add(tuple(picks(p, 6)))
    assert len(starts) > 1  # not in lockstep
    for seq in starts:  # and each still a fair cycle
        assert Counter(seq) == Counter({"a": 3, "b": 2, "c": 1})


def test_exclude_skips_a_backend_and_none_when_nothing_is_left() -> None:
    p = Picker(random.Random(1))
    p.set_weights({"a": 1, "b": 1})
    assert {p.pick(exclude=("a",)) for _ in range(10)} == {"b"}
    assert p.pick(exclude=("a", "b")) is None


def test_new_weights_carry_running_values_over() -> None:
    p = Picker(random.Random(2))
    p.set_weights({"a": 1, "b": 1})
    picks(p, 3)
    p.set_weights({"a": 1, "b": 1, "c": 2})  # a node joins
    assert Counter(picks(p, 400)) == Counter({"a": 100, "b": 100, "c": 200})
    p.set_weights({"a": 0, "b": 1, "c": 2})  # a is ejected
    assert "a" not in picks(p, 30)


def test_negative_weights_are_refused() -> None:
    with pytest.raises(ValueError, match=">= 0"):
        Picker(random.Random(0)).set_weights({"a": -1})
