"""Log lines for people (text) and for log shippers (one JSON object per line).

Text lines read ``2026-11-22 12:45:00.123 [INFO] <route>: <message>``. The
route says who speaks: a request's own route (``n1/pqueue.v1.Queue/Enqueue``,
set by ``pqueue.wire.observe``), else the process's name and the logger's
(``n1/pqueue.node.replicated``). JSON lines carry the same fields under stable
keys, plus whatever a line adds through ``extra`` (``request_id``, ``code``,
``duration_ms``, ``client_ip``, ...).

Lines cannot be forged: much of what is logged comes from callers (a
token's header quoted in an error, queue names, reasons, claimed
addresses), so both formatters escape control characters (newlines, ANSI
escapes, Unicode line separators) in the rendered message and in every
text field, as ``\n``, ``\x1b``, ``\u2028``. That is the one place: code that
logs needs no care of its own. A traceback's lines are indented, so none
of them can pass for a line of its own.

An exception shown in a line goes through ``describe``: never an empty
message (a ``TimeoutError`` or a cancellation has none), always its type
when the message alone would not say what went wrong.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Any, Literal

from pqueue.errors import PQueueError

LogFormat = Literal["text", "json"]
LOG_FORMATS: tuple[LogFormat, ...] = ("text", "json")

TEXT_FORMAT = "%(asctime)s.%(msecs)03d [%(levelname)s] %(route)s: %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"

#: Attributes every ``LogRecord`` has; anything else came in through ``extra``.
_STANDARD = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys() | {"message", "asctime", "route"}
)


#: What a line must not carry raw: C0 controls and DEL, C1 controls, and the
#: Unicode line and paragraph separators some viewers break lines at.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escaped(match: re.Match[str]) -> str:
    char = match.group()
    named = _NAMED.get(char)
    if named is not None:
        return named
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape(text: str) -> str:
    """``text`` with control characters escaped: one log line stays one line."""
    return _UNSAFE.sub(_escaped, text) if _UNSAFE.search(text) else text


#: Exceptions whose message is written to be read alone: pqueue's error
#: vocabulary, and the ``ValueError`` its programs raise for a bad option or file.
_READS_ALONE = (PQueueError, ValueError)


def describe(exc: BaseException) -> str:
    """``exc`` as a log or ``error:`` line shows it: never empty.

    ``TimeoutError (no message)`` when its message is empty (so a line never
    ends in ``cannot run: ``); its message alone for an error of pqueue's
    vocabulary or a ``ValueError`` (``queue 'a' not found``); else its type
    and message (``OSError: [Errno 98] Address already in use``).
    """
    message = str(exc).strip()
    name = type(exc).__name__
    if not message:
        return f"{name} (no message)"
    if isinstance(exc, _READS_ALONE):
        return message
    return f"{name}: {message}"


def _indented(text: str) -> str:
    """A traceback: every line escaped and indented under the line it belongs to."""
    return "\n".join("    " + escape(line) for line in text.splitlines())


def route_of(record: logging.LogRecord, process: str) -> str:
    """The record's own route, else ``process/logger``."""
    route = getattr(record, "route", None)
    if isinstance(route, str) and route:
        return route
    return f"{process}/{record.name}" if process else record.name


class TextFormatter(logging.Formatter):
    """``date time.ms [LEVEL] route: message``."""

    def __init__(self, process: str) -> None:
        super().__init__(TEXT_FORMAT, DATE_FORMAT)
        self.process = process

    def format(self, record: logging.LogRecord) -> str:
        record.route = escape(route_of(record, self.process))
        record.message = escape(record.getMessage())
        record.asctime = self.formatTime(record, self.datefmt)
        line = self.formatMessage(record)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line = f"{line}\n{_indented(record.exc_text)}"
        if record.stack_info:
            line = f"{line}\n{_indented(self.formatStack(record.stack_info))}"
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, node, route, logger, message, extras."""

    def __init__(self, process: str) -> None:
        super().__init__()
        self.process = process

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime(DATE_FORMAT, time.localtime(record.created))
        line: dict[str, Any] = {
            "time": f"{stamp}.{int(record.msecs):03d}",
            "ts": round(record.created, 3),
            "level": record.levelname,
            "node": self.process,
            "route": escape(route_of(record, self.process)),
            "logger": record.name,
            "message": escape(record.getMessage()),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                if isinstance(value, str) or not isinstance(value, (int, float, bool)):
                    value = escape(str(value))
                line[key] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def formatter(log_format: LogFormat, process: str) -> logging.Formatter:
    """The formatter for ``--log-format``."""
    if log_format == "json":
        return JsonFormatter(process)
    if log_format == "text":
        return TextFormatter(process)
    raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, got {log_format!r}")


def setup_logging(level: str, process: str = "", log_format: LogFormat = "text") -> None:
    """Log to stderr, in ``log_format``, each line naming ``process`` (``n1``, ``balancer``)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(log_format, process))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
