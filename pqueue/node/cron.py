"""Cron expressions and the ticks they give, for the leader's scheduler
(``pqueue.node.scheduler``) and the servicer's checks. The queue machine
never reads cron: it only applies the ticks the leader proposes.

Expressions are parsed and iterated by croniter (five fields, or six with
seconds first, and the ``@hourly`` family), read in an IANA time zone
(``zoneinfo``). Ticks are instants: when clocks go back, a wall-clock time
that happens twice ticks twice; when they go forward, a skipped time ticks
at the jump. Hashed (``H``) and random (``R``) fields are refused: every
leader must compute the same ticks.

Pure but for the libraries: no clock, no IO (times come in as arguments).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import datetime
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterBadCronError, CroniterError, croniter

from pqueue.errors import InvalidArgumentError
from pqueue.v1 import queue_pb2 as pb

#: A tick comes due at its time; one more than this late is *missed* (no
#: leader could propose it: an outage) and the schedule's MissedTicks policy
#: decides what it gets.
MISSED_GRACE_MS = 5_000
#: MISSED_TICKS_ALL: at most this many missed ticks get a job per recovery
#: (the older ones are skipped).
MAX_MISSED_JOBS = 100
#: How far ``due_ticks`` walks forward from a schedule's mark before it
#: looks back from now instead (a long outage of a fast schedule).
SCAN_TICKS = 1_000
DEFAULT_TIMEZONE = "UTC"
_FIELDS = "five fields (minute hour day-of-month month day-of-week), six with seconds first"


@dataclass(frozen=True)
class Due:
    """A tick to propose: enqueue its job, or only record it (``skip``)."""

    tick_ms: int
    skip: bool = False


class Cron:
    """One checked expression in one zone. Holds a croniter that each call
    repositions (single-threaded use, as on the event loop)."""

    def __init__(self, expr: str, zone: ZoneInfo, it: croniter) -> None:
        self.expr = expr
        self.zone = zone
        self._it = it

    def _at(self, ms: int) -> None:
        self._it.set_current(datetime.fromtimestamp(ms / 1000, self.zone), force=True)

    def _step(self, backward: bool = False) -> int | None:
        try:
            when: datetime = (self._it.get_prev if backward else self._it.get_next)(datetime)
        except (CroniterError, ValueError, OverflowError):
            return None  # no such date (any more): never due
        return round(when.timestamp() * 1000)

    def next_after(self, ms: int) -> int | None:
        """The first tick strictly after ``ms`` (None: none ever)."""
        self._at(ms)
        return self._step()

    def forward(self, after_ms: int, until_ms: int, limit: int) -> tuple[list[int], bool]:
        """Ticks in (after_ms, until_ms], at most ``limit`` from the first;
        whether that is all of them."""
        self._at(after_ms)
        out: list[int] = []
        while len(out) < limit:
            tick = self._step()
            if tick is None or tick > until_ms:
                return out, True
            out.append(tick)
        tick = self._step()
        return out, tick is None or tick > until_ms

    def backward(self, after_ms: int, until_ms: int, late_ms: int, keep: int) -> list[int]:
        """Ticks in (after_ms, until_ms], latest first walked, in time order:
        all of them from ``late_ms`` on, and at most ``keep`` before it."""
        self._at(until_ms - until_ms % 1000 + 1000)  # the next whole second: until_ms included
        out: list[int] = []
        before = 0
        while True:
            tick = self._step(backward=True)
            if tick is None or tick <= after_ms:
                break
            if tick > until_ms:
                continue
            out.append(tick)
            if tick < late_ms:
                before += 1
                if before >= keep:
                    break
        out.reverse()
        return out


def _zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name or DEFAULT_TIMEZONE)
    except (ZoneInfoNotFoundError, ValueError):
        raise InvalidArgumentError(
            "schedule.timezone", f"{name!r} is not an IANA time zone (UTC, Europe/Paris, ...)"
        ) from None


@functools.lru_cache(maxsize=4096)
def compile_cron(expr: str, timezone: str = "") -> Cron:
    """The expression checked and ready to iterate in ``timezone`` ("" is
    UTC); ``InvalidArgumentError`` naming ``schedule.cron`` or
    ``schedule.timezone`` otherwise. Cached (schedules share a few)."""
    zone = _zone(timezone)
    fields = expr.split()
    if not fields:
        raise InvalidArgumentError("schedule.cron", f"must not be empty: {_FIELDS}")
    if fields[0].startswith("@"):
        if len(fields) != 1:
            raise InvalidArgumentError("schedule.cron", f"{fields[0]} stands alone")
    elif len(fields) not in (5, 6):
        raise InvalidArgumentError("schedule.cron", f"{len(fields)} fields: use {_FIELDS}")
    for field in fields:
        for part in field.split(","):
            head = part.split("/")[0].upper()
            if head in ("H", "R") or head.startswith(("H(", "R(")):
                raise InvalidArgumentError(
                    "schedule.cron", f"{part!r}: hashed (H) and random (R) fields are not supported"
                )
    try:
        it = croniter(
            " ".join(fields),
            datetime.fromtimestamp(0, zone),
            second_at_beginning=len(fields) == 6,
        )
    except CroniterBadCronError as exc:
        raise InvalidArgumentError("schedule.cron", str(exc) or "not a cron expression") from None
    return Cron(" ".join(fields), zone, it)


def check_schedule(schedule: pb.Schedule, now_ms: int) -> int:
    """Refuse a schedule whose cron or timezone does not parse, or that
    never comes due after ``now_ms``; its next tick."""
    cron = compile_cron(schedule.cron, schedule.timezone)
    first = cron.next_after(now_ms)
    if first is None:
        raise InvalidArgumentError("schedule.cron", f"{schedule.cron!r} never comes due")
    return first


def mark(schedule: pb.Schedule) -> int:
    """Where a schedule's ticks are counted from, exclusive (as the machine
    counts them: ``pqueue.core.schedules.mark``)."""
    return max(schedule.last_tick_ms, schedule.created_at_ms)


def next_tick_ms(schedule: pb.Schedule) -> int:
    """The next tick owed (0: paused, or never): at or before now if the
    leader has yet to propose it."""
    if schedule.paused:
        return 0
    try:
        cron = compile_cron(schedule.cron, schedule.timezone)
    except InvalidArgumentError:
        return 0
    return cron.next_after(mark(schedule)) or 0


def due_ticks(
    cron: Cron,
    mark_ms: int,
    now_ms: int,
    missed: int,
    grace_ms: int = MISSED_GRACE_MS,
    max_missed: int = MAX_MISSED_JOBS,
) -> list[Due]:
    """The ticks to propose, in order, for a schedule counted from
    ``mark_ms`` at ``now_ms``: ticks up to ``grace_ms`` late each get a job;
    older ones (missed) as ``missed`` says. ONCE: one job, for the latest
    missed (proposing it covers the earlier ones). ALL: one each, at most
    ``max_missed``; a skip for the latest older one covers the rest. SKIP:
    a skip for the latest missed."""
    late_ms = now_ms - grace_ms
    ticks, whole = cron.forward(mark_ms, now_ms, SCAN_TICKS)
    if not whole:  # a long outage of a fast schedule: only the latest matter
        ticks = cron.backward(mark_ms, now_ms, late_ms, max_missed + 1)
    late = [t for t in ticks if t < late_ms]
    out: list[Due] = []
    if late:
        if missed == pb.MISSED_TICKS_ALL:
            if len(late) > max_missed:
                out.append(Due(late[-max_missed - 1], skip=True))
            out += [Due(t) for t in late[-max_missed:]]
        else:
            out.append(Due(late[-1], skip=missed == pb.MISSED_TICKS_SKIP))
    out += [Due(t) for t in ticks[len(late) :]]
    return out
