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

Lines are formatted and written off the event loop (``setup_logging``): the
loop only makes each record and appends it to a buffer (``LogBuffer``); a
thread of its own (``LogWriter``) formats what came, every
``FLUSH_INTERVAL_S``, and writes it in one write. Every line is still
written, in order, with the time it was logged; at exit (and on
``flush_logs``) what is buffered is written. A ``kill -9`` loses at most the
last interval's lines, as it loses what a pipe had not yet taken.
"""

from __future__ import annotations

import atexit
import json
import logging
import re
import sys
import threading
import time
from collections import deque
from typing import Any, Literal, TextIO

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


class _Stamps:
    """``DATE_FORMAT`` of a record's second, made once per second (it is the
    same for every line of that second; ``strftime`` is not free)."""

    __slots__ = ("second", "stamp")

    def __init__(self) -> None:
        self.second = -1
        self.stamp = ""

    def of(self, created: float) -> str:
        second = int(created)
        if second != self.second:  # a race between threads only redoes the work
            self.stamp = time.strftime(DATE_FORMAT, time.localtime(second))
            self.second = second
        return self.stamp


class TextFormatter(logging.Formatter):
    """``date time.ms [LEVEL] route: message``."""

    def __init__(self, process: str) -> None:
        super().__init__(TEXT_FORMAT, DATE_FORMAT)
        self.process = process
        self._stamps = _Stamps()

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt is None or datefmt == DATE_FORMAT:
            return self._stamps.of(record.created)
        return super().formatTime(record, datefmt)

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
        self._stamps = _Stamps()

    def format(self, record: logging.LogRecord) -> str:
        stamp = self._stamps.of(record.created)
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


#: How often the writer thread writes what was logged meanwhile: the longest
#: a line waits before it is written.
FLUSH_INTERVAL_S = 0.05
#: Records a buffer keeps at most (a stderr nobody reads must not grow the
#: memory without bound); past this, lines are dropped, counted and said.
MAX_BUFFERED_RECORDS = 100_000
#: The writer lets other threads (the event loop) run after this many lines.
_YIELD_EVERY = 16
#: Arguments a record may keep until the writer renders it: their value
#: cannot change meanwhile. Any other is rendered when the record is made.
_PLAIN = frozenset((str, int, float, bool, type(None)))


class LogBuffer(logging.Handler):
    """The handler the program's threads log to: it keeps each record as it
    is, for a ``LogWriter`` to format and write, so logging costs the event
    loop the record and an append, never a format or a write."""

    def __init__(self, capacity: int = MAX_BUFFERED_RECORDS) -> None:
        super().__init__()
        self.capacity = capacity
        self.records: deque[logging.LogRecord] = deque()
        #: Records dropped because the buffer was full (the writer says so).
        self.dropped = 0

    def handle(self, record: logging.LogRecord) -> bool:
        # No lock: appending to a deque is atomic, and nothing else is shared.
        if not self.filter(record):
            return False
        self.emit(record)
        return True

    def emit(self, record: logging.LogRecord) -> None:
        if len(self.records) >= self.capacity:
            self.dropped += 1
            return
        args = record.args
        if args and not (isinstance(args, tuple) and all(type(a) in _PLAIN for a in args)):
            try:  # an argument that may change: the line says what it was now
                record.msg, record.args = record.getMessage(), None
            except Exception:
                self.handleError(record)
                return
        self.records.append(record)


class LogWriter:
    """A thread that formats the records a ``LogBuffer`` keeps and writes
    them to ``stream``, one write per ``interval_s``."""

    def __init__(
        self,
        stream: TextIO,
        line_format: logging.Formatter,
        interval_s: float = FLUSH_INTERVAL_S,
        capacity: int = MAX_BUFFERED_RECORDS,
    ) -> None:
        self.stream = stream
        self.line_format = line_format
        self.interval_s = interval_s
        self.buffer = LogBuffer(capacity)
        #: One writer at a time: the thread, or a caller of ``flush``.
        self._writing = threading.Lock()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._write_loop, name="pq-log-writer", daemon=True)

    def start(self) -> None:
        """Start the writer thread."""
        self._thread.start()

    def _write_loop(self) -> None:
        while not self._stopping.wait(self.interval_s):
            self.flush()

    def flush(self, timeout_s: float = -1) -> bool:
        """Write every record logged so far; False if another writer held
        the stream longer than ``timeout_s`` (a stderr nobody reads)."""
        if not self._writing.acquire(timeout=timeout_s):
            return False
        try:
            self._write_out()
        finally:
            self._writing.release()
        return True

    def _write_out(self) -> None:
        records = self.buffer.records
        lines: list[str] = []
        done = 0
        while records:
            record = records.popleft()
            try:
                lines.append(self.line_format.format(record))
            except Exception:
                self.buffer.handleError(record)
            done += 1
            if done % _YIELD_EVERY == 0:
                time.sleep(0)  # the event loop may want the GIL back
        dropped = self.buffer.dropped
        if dropped:
            self.buffer.dropped -= dropped
            note = logging.LogRecord(
                __name__,
                logging.WARNING,
                __file__,
                0,
                "dropped %d log lines: the log stream did not keep up",
                (dropped,),
                None,
            )
            lines.append(self.line_format.format(note))
        if not lines:
            return
        try:
            self.stream.write("\n".join(lines) + "\n")
            self.stream.flush()
        except (OSError, ValueError):  # closed or broken: nowhere left to say so
            pass

    def stop(self, timeout_s: float = 2.0) -> None:
        """Stop the thread and write what is left (waiting at most ``timeout_s``)."""
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        self.flush(timeout_s)


_writer: LogWriter | None = None


def setup_logging(
    level: str,
    process: str = "",
    log_format: LogFormat = "text",
    interval_s: float = FLUSH_INTERVAL_S,
) -> LogWriter:
    """Log to stderr, in ``log_format``, each line naming ``process`` (``n1``,
    ``balancer``), formatted and written by a thread of its own (see the
    module docstring); what is buffered is written at exit.

    Records skip what no line of ours shows (the caller's file and line,
    thread and process names: the logging HOWTO's "Optimization").
    """
    global _writer
    stop_logging()
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    writer = LogWriter(sys.stderr, formatter(log_format, process), interval_s)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(writer.buffer)
    root.setLevel(level.upper())
    writer.start()
    _writer = writer
    return writer


def flush_logs() -> None:
    """Write what is buffered now (before a line printed to stderr directly)."""
    if _writer is not None:
        _writer.flush(2.0)


@atexit.register
def stop_logging() -> None:
    """Write what is buffered and stop the writer (at exit, or before another setup)."""
    global _writer
    writer, _writer = _writer, None
    if writer is not None:
        logging.getLogger().removeHandler(writer.buffer)
        writer.stop()
