"""Smooth weighted round robin, as nginx does it. Pure: no IO, clock or global random.

Each pick adds every backend's weight to its running value, takes the
backend with the highest value, and subtracts the total weight from it.
Over any window of picks each backend's share stays within about one pick
of its weight's share, and picks of a heavy backend are spread out rather
than bunched (weights 5, 1, 1 give ``a a b a c a a``, not ``a a a a a b c``).

A backend of weight 0 is never picked. Several balancers in front of the
same nodes must not move in lockstep, so each starts at a random point of
the cycle: the ``rng`` it is given decides how many picks to skip first.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from random import Random


class Picker:
    """Picks backends (any hashable name) in proportion to integer weights."""

    def __init__(self, rng: Random) -> None:
        self._rng = rng
        self._weights: dict[str, int] = {}
        self._current: dict[str, int] = {}

    def set_weights(self, weights: Mapping[str, int]) -> None:
        """Replace the weights. Running values of known backends carry over
        (as in nginx), so a small change does not restart the cycle."""
        if any(w < 0 for w in weights.values()):
            raise ValueError(f"weights must be >= 0: {dict(weights)}")
        before = sum(1 for w in self._weights.values() if w > 0)
        self._weights = dict(weights)
        self._current = {name: self._current.get(name, 0) for name in self._weights}
        if before <= 1 < sum(1 for w in self._weights.values() if w > 0):
            # There is a cycle again (at start, the second backend's first
            # report): enter it at a random phase. Skipped picks keep every
            # smoothness property, unlike random running values would.
            self._current = dict.fromkeys(self._weights, 0)
            for _ in range(self._rng.randrange(sum(self._weights.values()))):
                self.pick()

    def pick(self, exclude: Collection[str] = ()) -> str | None:
        """The next backend, skipping ``exclude``; None if none has weight."""
        best: str | None = None
        total = 0
        for name, weight in self._weights.items():
            if weight <= 0 or name in exclude:
                continue
            self._current[name] += weight
            total += weight
            if best is None or self._current[name] > self._current[best]:
                best = name
        if best is not None:
            self._current[best] -= total
        return best
