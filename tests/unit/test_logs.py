"""``pqueue.wire.logs.describe``: an exception as a line shows it, never empty."""

from __future__ import annotations

import asyncio

import pytest

from pqueue.errors import NotFoundError, StorageError, UnavailableError
from pqueue.wire.logs import describe


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
