"""``pq enqueue QUEUE --file F|-``: jobs from JSON lines, sent in batches.

Each line is one job: a JSON value sent as is as the payload (``{"to":
"a@b"}``), or a job object: ``{"payload": ..., "priority": 3, "group":
"g", ...}`` (an object whose keys are all of ``SPEC_KEYS`` and include
``payload``; a string payload is sent as its text, anything else as its
JSON). The command's job flags (``--priority``, ``--group``...) are each
line's defaults; not ``--idempotency-key`` (one key for every line would
make each job after the first a duplicate): a line sets its own. Blank lines are skipped.

Every line is read and checked before anything is sent: a bad line fails the
command (exit 2) naming its line number, and nothing is enqueued. Then the
jobs go in ``EnqueueBatch`` calls of ``--batch-size`` jobs (each batch is
atomic); a batch that fails stops there, and the error says how many jobs
went in before it (and, for a job the server refused, its line). A batch
whose answer was lost (a timeout, a dropped connection) may be in or not:
the error says so. Progress goes to stderr: one line
rewritten in place on a terminal, a line per batch otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from typing import IO, Any

from pqueue.cli.args import INT32, MS, Outcome, int_in, parse_time_ms
from pqueue.cli.failure import UsageError
from pqueue.client import Client, job_spec
from pqueue.errors import (
    DeadlineExceededError,
    InvalidArgumentError,
    NotTakenError,
    PQueueError,
    RemoteError,
    UnavailableError,
)
from pqueue.v1 import queue_pb2 as pb

#: Keys of a job object, and how each reads.
SPEC_KEYS = (
    "payload",
    "priority",
    "delay_ms",
    "not_before",
    "not_before_ms",
    "idempotency_key",
    "group",
    "expires_at",
    "expires_at_ms",
)

#: A batch carries at most this many payload bytes (well under a call's 32 MiB).
BATCH_BYTES = 8 << 20


def _is_spec(value: Any) -> bool:
    return isinstance(value, dict) and "payload" in value and set(value) <= set(SPEC_KEYS)


def _int(value: Any, key: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{key}: expected an integer, got {json.dumps(value)}")
    try:
        return int_in(low, high)(str(value))
    except argparse.ArgumentTypeError as exc:
        raise ValueError(f"{key}: {exc}") from None


def _text(value: Any, key: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{key}: expected a string, got {json.dumps(value)}")
    return value


def _time(value: Any, key: str) -> int:
    """An ISO-8601 string or Unix ms."""
    if isinstance(value, str):
        try:
            return parse_time_ms(value)
        except argparse.ArgumentTypeError as exc:
            raise ValueError(f"{key}: {exc}") from None
    return _int(value, key, *MS)


def line_spec(line: str, defaults: dict[str, Any]) -> pb.JobSpec:
    """One line as a job (``ValueError`` saying what is wrong with it)."""
    try:
        value = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc.msg} (column {exc.colno})") from None
    options = dict(defaults)
    if not _is_spec(value):
        return job_spec(line.strip().encode(), **options)
    payload = value["payload"]
    data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
    for key, item in value.items():
        if key == "priority":
            options["priority"] = _int(item, key, *INT32)
        elif key == "delay_ms":
            options["delay_ms"] = _int(item, key, *MS)
        elif key in ("not_before", "not_before_ms"):
            options["not_before_ms"] = _time(item, key)
        elif key in ("expires_at", "expires_at_ms"):
            options["expires_at_ms"] = _time(item, key)
        elif key in ("idempotency_key", "group"):
            options[key] = _text(item, key)
    return job_spec(data, **options)


#: Jobs with the line number each came from.
Numbered = list[tuple[int, pb.JobSpec]]


def read_specs(stream: IO[str], name: str, defaults: dict[str, Any]) -> Numbered:
    """Every job of ``stream`` with its line number; ``UsageError`` at the first bad line."""
    specs = []
    for number, line in enumerate(stream, start=1):
        if not line.strip():
            continue
        try:
            specs.append((number, line_spec(line, defaults)))
        except (ValueError, InvalidArgumentError) as exc:
            raise UsageError(f"{name} line {number}", str(exc)) from None
    return specs


def load_specs(path: str, defaults: dict[str, Any]) -> Numbered:
    """The jobs of file ``path`` ('-': stdin), checked, before anything is sent."""
    if path == "-":
        return read_specs(sys.stdin, "stdin", defaults)
    try:
        with open(path, encoding="utf-8") as stream:
            return read_specs(stream, path, defaults)
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError("--file", f"{path}: {exc}") from None


def batches(specs: Numbered, size: int) -> Iterable[Numbered]:
    """Runs of at most ``size`` jobs and ``BATCH_BYTES`` of payloads (at least one job)."""
    batch: Numbered = []
    held = 0
    for item in specs:
        weight = len(item[1].payload)
        if batch and (len(batch) >= size or held + weight > BATCH_BYTES):
            yield batch
            batch, held = [], 0
        batch.append(item)
        held += weight
    if batch:
        yield batch


class Progress:
    """``enqueued N/TOTAL`` on stderr: rewritten in place on a terminal, one
    line per batch otherwise."""

    def __init__(self, total: int, stream: IO[str] | None = None) -> None:
        self.total = total
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()

    def show(self, done: int) -> None:
        if self.tty:
            width = 30
            filled = width * done // max(self.total, 1)
            bar = "#" * filled + "." * (width - filled)
            print(f"\r[{bar}] enqueued {done}/{self.total}", end="", file=self.stream, flush=True)
        else:
            print(f"enqueued {done}/{self.total}", file=self.stream, flush=True)

    def close(self) -> None:
        if self.tty:
            print(file=self.stream, flush=True)


async def enqueue_file(c: Client, a: argparse.Namespace) -> Outcome:
    """``pq enqueue QUEUE --file F|-``: the jobs ``load_specs`` read (``a.specs``)."""
    specs: Numbered = a.specs
    name = "stdin" if a.file == "-" else a.file
    progress = Progress(len(specs))
    ids: list[int] = []
    duplicates = 0
    try:
        for batch in batches(specs, a.batch_size):
            try:
                results = await c.enqueue_batch(a.queue, [spec for _, spec in batch])
            except PQueueError as exc:
                raise _at_line(exc, batch, len(ids), name) from None
            ids.extend(r.job_id for r in results)
            duplicates += sum(r.duplicate for r in results)
            progress.show(len(ids))
    finally:
        progress.close()
    row: dict[str, Any] = {"queue": a.queue, "enqueued": len(ids), "duplicates": duplicates}
    if a.output == "json":
        row["job_ids"] = ids
    elif ids:
        row["job_ids"] = f"{ids[0]}..{ids[-1]}" if len(ids) > 1 else str(ids[0])
    return row, None


def _at_line(exc: PQueueError, batch: Numbered, done: int, name: str) -> PQueueError:
    """``exc`` saying how many jobs went in before its batch, and the
    server's ``jobs[i].field`` as the line it came from."""
    first = batch[0][0]
    if isinstance(exc, DeadlineExceededError | RemoteError) or (
        isinstance(exc, UnavailableError) and not isinstance(exc, NotTakenError)
    ):  # the batch may have been applied before the answer was lost
        gone = f"the {done} jobs before line {first}; lines {first}-{batch[-1][0]}: unknown"
    else:
        gone = f"the {done} jobs before line {first}; none from it on"
    if not isinstance(exc, InvalidArgumentError):
        exc.add_note(f"enqueued: {gone}")
        return exc
    field, reason = exc.field, exc.reason
    if field.startswith("jobs[") and "]" in field:
        index, _, rest = field[len("jobs[") :].partition("]")
        if index.isdigit() and int(index) < len(batch):
            field = f"{name} line {batch[int(index)][0]}{': ' + rest.lstrip('.') if rest else ''}"
    return InvalidArgumentError(field, f"{reason} (enqueued: {gone})")
