"""``pq`` reads a point in time as Unix milliseconds or ISO-8601."""

from __future__ import annotations

import argparse

import pytest

from pqueue.cli.args import parse_time_ms


def test_unix_milliseconds_and_iso_8601_with_an_offset() -> None:
    assert parse_time_ms("1700000000000") == 1_700_000_000_000
    assert parse_time_ms("2026-12-01T09:00:00Z") == 1_796_115_600_000
    assert parse_time_ms("2026-12-01T10:00:00+01:00") == 1_796_115_600_000
    assert parse_time_ms("2026-12-01T09:00:00.250Z") == 1_796_115_600_250


def test_anything_else_is_refused_saying_what_it_takes() -> None:
    for bad in ("tomorrow", "", "12:00 pm"):
        with pytest.raises(argparse.ArgumentTypeError, match="ISO-8601"):
            parse_time_ms(bad)
