"""The node's cron arithmetic (``pqueue.node.cron``): parsing, ticks in a
zone, the due ticks of a schedule and the missed-tick policies."""

from __future__ import annotations

import itertools
from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

from pqueue.errors import InvalidArgumentError
from pqueue.node.cron import (
    MAX_MISSED_JOBS,
    MISSED_GRACE_MS,
    SCAN_TICKS,
    Due,
    check_schedule,
    compile_cron,
    due_ticks,
    next_tick_ms,
)
from pqueue.v1 import queue_pb2 as pb

ONCE, ALL, SKIP = pb.MISSED_TICKS_ONCE, pb.MISSED_TICKS_ALL, pb.MISSED_TICKS_SKIP


def ms(*args: int, tz: str = "UTC", fold: int = 0) -> int:
    return int(datetime(*args, tzinfo=ZoneInfo(tz), fold=fold).timestamp() * 1000)  # type: ignore[misc,arg-type]


def iso(tick: int, tz: str = "UTC") -> str:
    return datetime.fromtimestamp(tick / 1000, ZoneInfo(tz)).isoformat()


T = ms(2026, 1, 1)
SECOND = 1000


def ticks(expr: str, start: int, n: int, tz: str = "UTC") -> list[int]:
    cron = compile_cron(expr, tz)
    out, at = [], start
    for _ in range(n):
        nxt = cron.next_after(at)
        assert nxt is not None
        out.append(nxt)
        at = nxt
    return out


def test_five_fields_tick_by_minute_and_after_not_at() -> None:
    assert ticks("*/5 * * * *", T, 3) == [T + 300_000, T + 600_000, T + 900_000]
    assert ticks("*/5 * * * *", T - 1, 1) == [T]  # strictly after the mark, to the ms
    assert ticks("*/5 * * * *", T + 299_999, 1) == [T + 300_000]


def test_six_fields_put_seconds_first() -> None:
    assert ticks("* * * * * *", T, 3) == [T + SECOND, T + 2 * SECOND, T + 3 * SECOND]
    assert ticks("*/15 * * * * *", T + 500, 2) == [T + 15 * SECOND, T + 30 * SECOND]
    assert ticks("30 0 * * * *", T, 2) == [T + 30_000, T + 3_630_000]  # second 30 of minute 0


def test_aliases() -> None:
    assert ticks("@hourly", T, 2) == [T + 3_600_000, T + 7_200_000]
    assert ticks("@daily", T, 1) == [ms(2026, 1, 2)]


def test_fields_read_in_the_schedules_zone() -> None:
    [tick] = ticks("0 9 * * *", T - 1, 1, "Asia/Tokyo")
    assert iso(tick, "Asia/Tokyo") == "2026-01-01T09:00:00+09:00"
    assert tick == ms(2026, 1, 1, 0, 0)  # 09:00 in Tokyo is midnight UTC


def test_spring_forward_a_skipped_time_ticks_at_the_jump() -> None:
    ny = "America/New_York"  # 2026-03-08 02:00 EST -> 03:00 EDT
    got = [iso(t, ny) for t in ticks("30 2 * * *", ms(2026, 3, 7, tz=ny), 3, ny)]
    assert got == [
        "2026-03-07T02:30:00-05:00",
        "2026-03-08T03:00:00-04:00",
        "2026-03-09T02:30:00-04:00",
    ]
    hourly = ticks("0 * * * *", ms(2026, 3, 8, 0, 30, tz=ny), 3, ny)
    assert [t - hourly[0] for t in hourly] == [0, 3_600_000, 7_200_000]  # no gap, no double


def test_fall_back_a_repeated_time_ticks_at_each_instant() -> None:
    ny = "America/New_York"  # 2026-11-01 02:00 EDT -> 01:00 EST
    got = [iso(t, ny) for t in ticks("30 1 * * *", ms(2026, 10, 31, 12, tz=ny), 3, ny)]
    assert got == [
        "2026-11-01T01:30:00-04:00",
        "2026-11-01T01:30:00-05:00",
        "2026-11-02T01:30:00-05:00",
    ]
    hourly = ticks("0 * * * *", ms(2026, 11, 1, 0, 30, tz=ny), 4, ny)
    assert [b - a for a, b in itertools.pairwise(hourly)] == [3_600_000] * 3


def test_backward_agrees_with_forward_across_daylight_saving() -> None:
    for tz, day in (("America/New_York", (2026, 3, 8)), ("Europe/Paris", (2026, 10, 25))):
        cron = compile_cron("*/20 * * * *", tz)
        start, end = ms(*day, tz=tz) - 3_600_000, ms(*day, tz=tz) + 6 * 3_600_000
        forward, whole = cron.forward(start, end, 10_000)
        assert whole
        assert cron.backward(start, end, late_ms=end + 1, keep=10_000) == forward
        assert len(forward) == len(set(forward)) == 21  # seven hours of instants, none twice


@pytest.mark.parametrize(
    ("expr", "tz", "field"),
    [
        ("", "", "schedule.cron"),
        ("* * * *", "", "schedule.cron"),
        ("* * * * * * *", "", "schedule.cron"),  # croniter's year field: not ours
        ("61 * * * *", "", "schedule.cron"),
        ("every minute", "", "schedule.cron"),
        ("H * * * *", "", "schedule.cron"),
        ("R * * * *", "", "schedule.cron"),
        ("0 R(1-5) * * *", "", "schedule.cron"),
        ("@hourly *", "", "schedule.cron"),
        ("@sometimes", "", "schedule.cron"),
        ("* * * * *", "Mars/Olympus", "schedule.timezone"),
        ("* * * * *", "../etc/passwd", "schedule.timezone"),
    ],
)
def test_refusals_name_the_field(expr: str, tz: str, field: str) -> None:
    with pytest.raises(InvalidArgumentError) as err:
        compile_cron(expr, tz)
    assert err.value.field == field


def test_names_with_h_and_r_in_them_are_fine() -> None:
    compile_cron("0 9 * MAR THU,FRI", "")
    compile_cron("0 9 * * thu", "UTC")


def test_a_schedule_that_never_comes_due_is_refused() -> None:
    with pytest.raises(InvalidArgumentError) as err:
        check_schedule(pb.Schedule(cron="0 0 31 2 *"), T)
    assert err.value.field == "schedule.cron"
    assert check_schedule(pb.Schedule(cron="0 0 * * *"), T) == ms(2026, 1, 2)


def test_next_tick_counts_from_the_mark() -> None:
    s = pb.Schedule(cron="*/5 * * * * *", created_at_ms=T, last_tick_ms=T + 20_000)
    assert next_tick_ms(s) == T + 25_000
    s.paused = True
    assert next_tick_ms(s) == 0


# --------------------------------------------------------------- due ticks


def due(expr: str, mark: int, now: int, missed: int = ONCE, **kw: int) -> list[tuple[int, bool]]:
    return [(d.tick_ms - T, d.skip) for d in due_ticks(compile_cron(expr), mark, now, missed, **kw)]


def test_nothing_due_before_the_first_tick() -> None:
    assert due("* * * * * *", T, T + 999) == []
    assert due("* * * * * *", T, T + 1000) == [(1000, False)]


def test_on_time_ticks_each_get_a_job_whatever_the_policy() -> None:
    for policy in (ONCE, ALL, SKIP):
        got = due("* * * * * *", T, T + MISSED_GRACE_MS, policy)
        assert got == [(s * 1000, False) for s in range(1, 6)]  # 5 s late is not missed


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        (ONCE, [(14_000, False)]),
        (SKIP, [(14_000, True)]),
        (ALL, [(s * 1000, False) for s in range(1, 15)]),
    ],
)
def test_missed_ticks_follow_the_policy(policy: int, expected: list[tuple[int, bool]]) -> None:
    # Marked at T, now T+20 s: ticks 1..14 s are more than 5 s late, 15..20 on time.
    got = due("* * * * * *", T, T + 20_000, policy)
    assert got == expected + [(s * 1000, False) for s in range(15, 21)]


def test_all_caps_the_jobs_of_a_recovery_and_skips_the_older_ones() -> None:
    now = T + 300_000  # 300 ticks; 1..294 s more than 5 s late: missed
    got = due("* * * * * *", T, now, ALL)
    late = 300 - MISSED_GRACE_MS // 1000 - 1
    assert got[0] == ((late - MAX_MISSED_JOBS) * 1000, True)
    assert got[1 : MAX_MISSED_JOBS + 1] == [
        (s * 1000, False) for s in range(late - MAX_MISSED_JOBS + 1, late + 1)
    ]
    assert got[MAX_MISSED_JOBS + 1 :] == [(s * 1000, False) for s in range(late + 1, 301)]
    assert due("* * * * * *", T, now, ALL, max_missed=3)[:4] == [
        ((late - 3) * 1000, True),
        ((late - 2) * 1000, False),
        ((late - 1) * 1000, False),
        (late * 1000, False),
    ]


def test_a_long_outage_looks_back_from_now() -> None:
    """More ticks owed than SCAN_TICKS: only the latest are walked."""
    now = T + (SCAN_TICKS + 5000) * 1000
    once = due("* * * * * *", T, now, ONCE)
    assert once[0] == ((SCAN_TICKS + 5000 - 6) * 1000, False)
    assert len(once) == 1 + 6
    skip = due("* * * * * *", T, now, SKIP)
    assert skip[0] == (once[0][0], True)
    everything = due("* * * * * *", T, now, ALL)
    assert len(everything) == 1 + MAX_MISSED_JOBS + 6
    assert everything[0][1]
    assert not any(s for _, s in everything[1:])
    ticks_ = [t for t, _ in everything]
    assert ticks_ == sorted(ticks_)
    assert ticks_[-1] == (SCAN_TICKS + 5000) * 1000


def test_due_ticks_are_in_order_and_after_the_mark() -> None:
    for mark in (T, T + 400, T + 1000, T + 1001):
        got = due_ticks(compile_cron("*/2 * * * * *"), mark, T + 30_000, ALL)
        assert [d.tick_ms for d in got] == sorted({d.tick_ms for d in got})
        assert all(d.tick_ms > mark for d in got)
        assert got[-1] == Due(T + 30_000)


def test_utc_is_the_default_zone() -> None:
    assert compile_cron("0 0 * * *", "").zone == ZoneInfo("UTC")
