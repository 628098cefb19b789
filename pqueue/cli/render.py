"""CLI output: tables for people, JSON for scripts (``-o json``)."""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
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
        "finished_at_ms": job.finished_at_ms,
        **result_fields(job.result),
        "reason": job.reason,
        "expires_at_ms": job.expires_at_ms,
    }


def result_fields(result: bytes) -> dict[str, str]:
    """A job's result as ``payload_fields`` shows a payload."""
    return {
        ("result_encoding" if key == "payload_encoding" else "result"): value
        for key, value in payload_fields(result).items()
    }


def stats_row(s: pb.QueueStats) -> dict[str, Any]:
    return {
        "queue": s.queue,
        "ready": s.ready,
        "delayed": s.delayed,
        "leased": s.leased,
        "dead": s.dead,
        "oldest_ready_age_ms": s.oldest_ready_age_ms,
        "enqueued_total": s.enqueued_total,
        "acked_total": s.acked_total,
        "nacked_total": s.nacked_total,
        "expired_total": s.expired_total,
        "dead_total": s.dead_total,
        "ttl_expired_total": s.ttl_expired_total,
    }


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


def iso_ms(ms: int) -> str:
    """Epoch milliseconds as ISO-8601 UTC, to the second ("" for 0: never)."""
    if not ms:
        return ""
    when = datetime.fromtimestamp(ms / 1000, UTC)
    return when.isoformat(timespec="seconds").replace("+00:00", "Z")


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


def _cell(value: Any) -> str:
    if isinstance(value, list):
        return "; ".join(
            f"#{v['attempt']} {v['reason']}" if isinstance(v, dict) else str(v) for v in value
        )
    text = str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def table(rows: Sequence[Row], columns: Sequence[str] | None = None) -> str:
    """Rows as an aligned text table (header in capitals)."""
    if not rows:
        return "(none)"
    cols = list(columns or rows[0].keys())
    cells = [[_cell(row.get(c, "")) for c in cols] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(cols, widths, strict=True)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join(lines)


def emit(data: Any, output: str, columns: Sequence[str] | None = None) -> str:
    """Render ``data`` (a row or list of rows) as a table or JSON."""
    if output == "json":
        return json.dumps(data, indent=2, sort_keys=False)
    rows = data if isinstance(data, list) else [data]
    return table(rows, columns)
