"""How fast the host ran while ``make bench`` did: a yardstick and steal time.

On a shared machine every column of a run can move together (other guests
on the same cores and caches): a slower host shows as more CPU a job for
every system at once. The report states it instead of leaving it to be
inferred:

- ``yardstick_ms``: the same fixed pure-Python loop (no IO, no allocation
  beyond small ints) timed by the wall clock, the best of three, once
  before anything of the run starts and once after everything stopped. A
  host running slow makes both larger; a change between them says the host
  changed during the run.
- ``steal_pct``: the share of CPU time the hypervisor gave to others over
  the run (``/proc/stat``'s steal column; absent where there is none).

Pure apart from reading ``/proc/stat``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

#: Loop turns of one yardstick pass (about 0.1-0.3 s of CPU on this machine).
LOOPS = 2_000_000
PASSES = 3
PROC_STAT = Path("/proc/stat")


def yardstick_ms(loops: int = LOOPS, passes: int = PASSES) -> float:
    """Wall ms of the fastest of ``passes`` runs of a fixed Python loop."""
    best = float("inf")
    for _ in range(passes):
        started = time.perf_counter()
        total = 0
        for i in range(loops):
            total += i & 7
        best = min(best, time.perf_counter() - started)
    return round(best * 1000, 1)


def cpu_ticks(stat: Path = PROC_STAT) -> list[int] | None:
    """The host's aggregate CPU tick counters (user, nice, system, idle,
    iowait, irq, softirq, steal, ...), or None where /proc/stat is absent."""
    try:
        first = stat.read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return None
    if not first or first[0] != "cpu":
        return None
    return [int(x) for x in first[1:]]


def steal_pct(before: list[int] | None, after: list[int] | None) -> float | None:
    """Steal as a percentage of all CPU ticks between two readings (None if unknown)."""
    if before is None or after is None or len(before) < 8 or len(after) < 8:
        return None
    # Guest time (columns 9 and 10) is already counted in user and nice.
    spent = [b - a for a, b in zip(before[:8], after[:8], strict=True)]
    total = sum(spent)
    return round(100 * spent[7] / total, 1) if total > 0 else None


class HostWatch:
    """The yardstick and the tick counters at a run's start; ``finish`` at its end."""

    def __init__(self) -> None:
        self.start_ms = yardstick_ms()
        self._ticks = cpu_ticks()

    def finish(self) -> dict[str, Any]:
        """The run's host figures, for its JSON and its header."""
        return {
            "yardstick_ms": {"start": self.start_ms, "end": yardstick_ms()},
            "steal_pct": steal_pct(self._ticks, cpu_ticks()),
        }


def describe(host: dict[str, Any] | None) -> str:
    """One line for the report's header ("" for a run recorded without it)."""
    if not host:
        return ""
    stick = host["yardstick_ms"]
    line = (
        f"host yardstick (a fixed Python loop, less is faster): "
        f"{stick['start']:g} ms at the start, {stick['end']:g} ms at the end"
    )
    if host.get("steal_pct") is not None:
        line += f"; steal {host['steal_pct']:g} % of CPU time over the run"
    return line
