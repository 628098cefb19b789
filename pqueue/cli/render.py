"""CLI output: tables for people, JSON for scripts (``-o json``)."""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping, Sequence
from typing import Any

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
        "reason": job.reason,
        "expires_at_ms": job.expires_at_ms,
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
