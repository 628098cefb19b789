"""``pqueue.wire.logs``: an exception as a line shows it (never empty), and
lines are formatted and written by a writer of their own, all of them, in order."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import time

import pytest

from pqueue.errors import NotFoundError, StorageError, UnavailableError
from pqueue.wire.logs import JsonFormatter, LogWriter, TextFormatter, describe


@pytest.mark.parametrize(
    ("exc", "line"),
    [
        # The start-up failure of issue 14: a bare timeout said nothing at all.
        (TimeoutError(), "TimeoutError (no message)"),
        (asyncio.CancelledError(), "CancelledError (no message)"),
        (RuntimeError("   "), "RuntimeError (no message)"),
        (StorageError(""), "StorageError (no message)"),
        # Foreign exceptions name their type: their messages rarely say it.
        (OSError(98, "Address already in use"), "OSError: [Errno 98] Address already in use"),
        (KeyError("job"), "KeyError: 'job'"),
        (TimeoutError("took too long"), "TimeoutError: took too long"),
        # pqueue's vocabulary and its explaining ValueErrors read alone.
        (NotFoundError("queue 'a' not found"), "queue 'a' not found"),
        (UnavailableError("no leader", retry_after_s=1.0), "no leader"),
        (
            ValueError("refusing to serve 0.0.0.0:1 without auth"),
            "refusing to serve 0.0.0.0:1 without auth",
        ),
    ],
)
def test_describe(exc: BaseException, line: str) -> None:
    assert describe(exc) == line


def test_describe_is_never_empty_for_any_builtin_exception() -> None:
    import builtins

    kinds = [
        k for k in vars(builtins).values() if isinstance(k, type) and issubclass(k, BaseException)
    ]
    for kind in kinds:
        try:
            exc = kind()
        except TypeError:  # needs arguments (UnicodeDecodeError, ...)
            continue
        assert describe(exc).startswith(kind.__name__), kind


class _Stream(io.StringIO):
    """A text stream that counts its writes."""

    writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


def _record(message: str, *args: object, created: float | None = None) -> logging.LogRecord:
    record = logging.LogRecord("pqueue.requests", logging.INFO, __file__, 1, message, args, None)
    if created is not None:
        record.created, record.msecs = created, 0.0
    return record


def test_the_writer_writes_every_line_in_order_in_one_write_with_the_time_it_was_logged() -> None:
    stream = _Stream()
    writer = LogWriter(stream, TextFormatter("n1"))  # not started: flushed by hand
    logged_at = time.mktime((2026, 11, 22, 12, 45, 0, 0, 0, -1))
    for k in range(100):
        writer.buffer.handle(_record("Received %s request %d", "Enqueue", k, created=logged_at))
    assert stream.getvalue() == ""  # logging formats and writes nothing
    writer.flush()
    lines = stream.getvalue().splitlines()
    assert lines == [
        f"2026-11-22 12:45:00.000 [INFO] n1/pqueue.requests: Received Enqueue request {k}"
        for k in range(100)
    ]
    assert stream.writes == 1


def test_a_changing_argument_is_rendered_when_logged_not_when_written() -> None:
    stream = _Stream()
    writer = LogWriter(stream, JsonFormatter("n1"))
    seen = ["a"]
    writer.buffer.handle(_record("queues %s", seen))
    seen.append("b")
    writer.flush()
    assert json.loads(stream.getvalue())["message"] == "queues ['a']"


def test_a_full_buffer_drops_lines_and_says_how_many() -> None:
    stream = _Stream()
    writer = LogWriter(stream, TextFormatter("n1"), capacity=3)
    for k in range(5):
        writer.buffer.handle(_record("line %d", k))
    writer.flush()
    lines = stream.getvalue().splitlines()
    assert [line.split(": ", 1)[1] for line in lines] == [
        "line 0",
        "line 1",
        "line 2",
        "dropped 2 log lines: the log stream did not keep up",
    ]


def test_the_thread_writes_within_its_interval_and_stop_writes_the_rest() -> None:
    stream = _Stream()
    writer = LogWriter(stream, TextFormatter("n1"), interval_s=0.01)
    writer.start()
    try:
        writer.buffer.handle(_record("first"))
        deadline = time.monotonic() + 10
        while "first" not in stream.getvalue():
            assert time.monotonic() < deadline, "the writer thread wrote nothing"
            time.sleep(0.01)
        writer.buffer.handle(_record("last"))
    finally:
        writer.stop()
    assert stream.getvalue().splitlines()[-1].endswith("n1/pqueue.requests: last")
