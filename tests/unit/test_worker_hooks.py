"""``pqueue.hooks``: a failing handler's traceback, rate-limited, and the hooks' calls."""

from __future__ import annotations

import logging

import pytest

from pqueue.hooks import FailureLog, JobFailed, call_hook
from pqueue.v1 import queue_pb2 as pb


class Clock:
    def __init__(self) -> None:
        self.now_s = 100.0

    def __call__(self) -> float:
        return self.now_s


def fail(message: str) -> ValueError:
    try:
        raise ValueError(message)
    except ValueError as exc:
        return exc


def errors(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_one_traceback_per_interval_and_the_rest_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    log = FailureLog("emails", 60.0, clock)
    caplog.set_level(logging.DEBUG, logger="pqueue.worker")
    assert log.failed(pb.LeasedJob(job_id=1, attempt=1), fail("boom 1"))
    for i in range(2, 5):
        clock.now_s += 1
        assert not log.failed(pb.LeasedJob(job_id=i, attempt=1), fail(f"boom {i}"))
    [first] = errors(caplog)
    assert first.levelno == logging.ERROR
    assert first.getMessage() == "handler failed on job 1 of emails (attempt 1): ValueError: boom 1"
    assert first.exc_info is not None
    assert "raise ValueError(message)" in caplog.text
    # The ones left out are each one DEBUG line, without a traceback.
    debug = [r for r in caplog.records if r.levelno == logging.DEBUG]
    assert [r.exc_info for r in debug] == [None] * 3
    assert log.suppressed == 3
    caplog.clear()
    clock.now_s += 60
    assert log.failed(pb.LeasedJob(job_id=9, attempt=2), fail("boom 9"))
    [second] = errors(caplog)
    assert second.getMessage() == (
        "handler failed on job 9 of emails (attempt 2): ValueError: boom 9"
        " (3 more failures since the last traceback, not shown)"
    )
    assert log.suppressed == 0


def test_an_interval_of_zero_logs_every_traceback(caplog: pytest.LogCaptureFixture) -> None:
    log = FailureLog("q", 0.0, Clock())
    for i in range(3):
        assert log.failed(pb.LeasedJob(job_id=i), fail("x"))
    assert len(errors(caplog)) == 3


async def test_hooks_sync_or_async_and_one_that_raises_is_logged_not_raised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    seen: list[object] = []

    def sync_hook(job: pb.LeasedJob, value: object) -> None:
        seen.append((job.job_id, value))

    async def async_hook(job: pb.LeasedJob, value: object) -> None:
        seen.append(("async", job.job_id, value))

    def broken(job: pb.LeasedJob, value: object) -> None:
        raise RuntimeError("hook bug")

    await call_hook("on_success", sync_hook, pb.LeasedJob(job_id=1), "r")
    await call_hook("on_success", async_hook, pb.LeasedJob(job_id=2), None)
    await call_hook("on_error", None, pb.LeasedJob(job_id=3), fail("x"))
    await call_hook("on_error", broken, pb.LeasedJob(job_id=4), fail("x"))
    assert seen == [(1, "r"), ("async", 2, None)]
    [record] = errors(caplog)
    assert record.getMessage() == "the worker's on_error hook raised"
    assert "RuntimeError: hook bug" in caplog.text


def test_a_chosen_failure_is_one_warning_line_without_a_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    log = FailureLog("q", 60.0, Clock())
    assert log.failed(pb.LeasedJob(job_id=7, attempt=2), JobFailed("exit status 3"))
    [record] = errors(caplog)
    assert record.levelno == logging.WARNING
    assert record.getMessage() == "handler failed on job 7 of q (attempt 2): exit status 3"
    assert record.exc_info is None
