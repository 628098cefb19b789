"""Log lines for people (text) and for log shippers (one JSON object per line).

Text lines read ``2026-11-22 12:45:00.123 [INFO] <route>: <message>``. The
route says who speaks: a request's own route (``n1/pqueue.v1.Queue/Enqueue``,
set by ``pqueue.observe``), else the process's name and the logger's
(``n1/pqueue.replicated``). JSON lines carry the same fields under stable
keys, plus whatever a line adds through ``extra`` (``request_id``, ``code``,
``duration_ms``, ``client_ip``, ...).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, Literal

LogFormat = Literal["text", "json"]
LOG_FORMATS: tuple[LogFormat, ...] = ("text", "json")

TEXT_FORMAT = "%(asctime)s.%(msecs)03d [%(levelname)s] %(route)s: %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"

#: Attributes every ``LogRecord`` has; anything else came in through ``extra``.
_STANDARD = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys() | {"message", "asctime", "route"}
)


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
        record.route = route_of(record, self.process)
        return super().format(record)


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
            "route": route_of(record, self.process),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                line[key] = value if isinstance(value, (str, int, float, bool)) else str(value)
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
