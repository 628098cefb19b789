"""CLI output: tables for people, JSON for scripts (``-o json``).

Times: a column of epoch milliseconds (``*_at_ms``, ``TIME_COLUMNS``) shows in a
table as ISO-8601 UTC (``2026-11-30T12:00:00.123Z``, blank for 0) under its
name without ``_ms``; JSON keeps the number. Bytes (a job's result) show in
a table as text when they are printable UTF-8, else as their size and first
bytes in hex; JSON has text, or base64 with ``<name>_encoding``.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from google.protobuf.message import Message

from pqueue.v1 import queue_pb2 as pb

Row = Mapping[str, Any]


def payload_fields(payload: bytes) -> dict[str, str]:
    """The payload as UTF-8 text when it decodes, otherwise base64 (and said so)."""
    try:
        return {"payload": payload.decode("utf-8")}
    except UnicodeDecodeError:
        return {"payload": base64.b64encode(payload).decode(), "payload_encoding": "base64"}


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def iso_ms(ms: int) -> str:
    """Epoch milliseconds as ISO-8601 UTC with milliseconds
    (``2026-11-30T12:00:00.123Z``); "" for 0 (unset)."""
    if not ms:
        return ""
    try:
        when = _EPOCH + timedelta(milliseconds=ms)
    except OverflowError:
        return str(ms)
    return when.strftime("%Y-%m-%dT%H:%M:%S") + f".{when.microsecond // 1000:03d}Z"


#: Columns of epoch milliseconds whose names do not end in ``_at_ms``.
TIME_COLUMNS = frozenset({"time_ms", "not_before_ms", "last_tick_ms", "next_tick_ms"})


def is_time_column(name: str) -> bool:
    """A column of epoch milliseconds (``enqueued_at_ms``, ``next_tick_ms``...),
    not a duration (``oldest_ready_age_ms``)."""
    return name.endswith("_at_ms") or name in TIME_COLUMNS


def bytes_preview(data: bytes, width: int = 16) -> str:
    """Bytes for a person: the text if it is printable UTF-8, else the size
    and the first ``width`` bytes in hex."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and text.isprintable():
        return text
    more = "..." if len(data) > width else ""
    return f"<{len(data)} bytes: {data[:width].hex()}{more}>"


def _jsonable(value: Any) -> Any:
    """``value`` with every bytes field as text, or as base64 beside
    ``<name>_encoding: base64`` (as payloads are)."""
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if not isinstance(value, Mapping):
        return value
    out: dict[str, Any] = {}
    for key, item in value.items():
        if isinstance(item, bytes):
            try:
                out[key] = item.decode("utf-8")
            except UnicodeDecodeError:
                out[key] = base64.b64encode(item).decode()
                out[f"{key}_encoding"] = "base64"
        else:
            out[key] = _jsonable(item)
    return out


def state_name(state: int) -> str:
    """``JOB_STATE_READY`` -> ``ready``."""
    return pb.JobState.Name(state).removeprefix("JOB_STATE_").lower()  # type: ignore[arg-type]


def leased_job_row(job: pb.LeasedJob) -> dict[str, Any]:
    return {
        "job_id": job.job_id,
        "lease_id": job.lease_id,
        "priority": job.priority,
        **payload_fields(job.payload),
        "attempt": job.attempt,
        "group": job.group,
        "lease_expires_at_ms": job.lease_expires_at_ms,
        "tenant": job.tenant,
    }


def job_row(job: pb.Job) -> dict[str, Any]:
    return {
        "job_id": job.job_id,
        "queue": job.queue,
        "state": state_name(job.state),
        "priority": job.priority,
        **payload_fields(job.payload),
        "attempts": job.attempts,
        "group": job.group,
        "idempotency_key": job.idempotency_key,
        "enqueued_at_ms": job.enqueued_at_ms,
        "ready_at_ms": job.ready_at_ms,
        "lease_expires_at_ms": job.lease_expires_at_ms,
        "errors": [
            {"attempt": e.attempt, "at_ms": e.at_ms, "reason": e.reason} for e in job.errors
        ],
        "tenant": job.tenant,
        "consumer_id": job.consumer_id,
        "finished_at_ms": job.finished_at_ms,
        "result": job.result,
        "reason": job.reason,
        "expires_at_ms": job.expires_at_ms,
    }


#: Fields of ``job_row`` a table shows only when they are set.
JOB_IF_SET = (
    "lease_expires_at_ms",
    "consumer_id",
    "finished_at_ms",
    "result",
    "reason",
    "expires_at_ms",
)


def job_columns(row: Row) -> list[str]:
    """The columns ``pq job`` shows for this job: every field, except the
    ones of ``JOB_IF_SET`` that it does not have."""
    return [name for name in row if name not in JOB_IF_SET or row[name]]


def stats_row(s: pb.QueueStats) -> dict[str, Any]:
    """Every field of a queue's stats, counts, flags and totals alike."""
    return fields_of(s)


def fields_of(message: Message) -> dict[str, Any]:
    """Every field of a flat message by name, in field order: an optional
    one left unset is None, a repeated one a list (of dicts, for messages)."""
    out: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        if field.is_repeated:
            out[field.name] = [fields_of(v) if isinstance(v, Message) else v for v in value]
        elif field.has_presence and not message.HasField(field.name):
            out[field.name] = None
        else:
            out[field.name] = value
    return out


def field_rows(values: Mapping[str, Any]) -> list[dict[str, Any]]:
    """A mapping as FIELD/VALUE rows (one per key, for one object shown in a table)."""
    rows = []
    for name, value in values.items():
        if value is None:
            value = "-"
        elif isinstance(value, bool):
            value = str(value).lower()
        elif isinstance(value, list) and all(isinstance(v, dict) for v in value):
            value = ",".join("=".join(str(x) for x in v.values()) for v in value) or "-"
        rows.append({"field": name, "value": value})
    return rows


def schedule_row(s: pb.Schedule, iso: bool = False) -> dict[str, Any]:
    """A schedule; its times as epoch ms, or ISO-8601 with ``iso`` (tables)."""
    time: Any = iso_ms if iso else int
    return {
        "queue": s.queue,
        "name": s.name,
        "cron": s.cron,
        "timezone": s.timezone,
        "missed": pb.MissedTicks.Name(s.missed).removeprefix("MISSED_TICKS_").lower(),
        "paused": s.paused,
        "priority": s.job.priority,
        "group": s.job.group,
        **payload_fields(s.job.payload),
        "last_tick": time(s.last_tick_ms),
        "next_tick": time(s.next_tick_ms),
        "created_at": time(s.created_at_ms),
    }


def _cell(value: Any, column: str = "") -> str:
    if isinstance(value, list):
        return "; ".join(
            f"#{v['attempt']} {v['reason']}" if isinstance(v, dict) else str(v) for v in value
        )
    if isinstance(value, bytes):
        text = bytes_preview(value)
    elif is_time_column(column) and isinstance(value, int) and not isinstance(value, bool):
        return iso_ms(value)
    else:
        text = str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _header(column: str) -> str:
    return (column.removesuffix("_ms") if is_time_column(column) else column).upper()


def table(rows: Sequence[Row], columns: Sequence[str] | None = None) -> str:
    """Rows as an aligned text table (header in capitals; times as ISO-8601)."""
    if not rows:
        return "(none)"
    cols = list(columns or rows[0].keys())
    cells = [[_cell(row.get(c, ""), c) for c in cols] for row in rows]
    heads = [_header(c) for c in cols]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(heads)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(heads, widths, strict=True)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join(lines)


def emit(data: Any, output: str, columns: Sequence[str] | None = None) -> str:
    """Render ``data`` (a row or list of rows) as a table or JSON."""
    if output == "json":
        return json.dumps(_jsonable(data), indent=2, sort_keys=False)
    rows = data if isinstance(data, list) else [data]
    return table(rows, columns)
