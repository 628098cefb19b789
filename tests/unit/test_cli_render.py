"""``pq`` output helpers: times as ISO-8601 and bytes for people in tables,
exact values in JSON."""

from __future__ import annotations

import json

from pqueue.cli import render
from pqueue.v1 import queue_pb2 as pb


def test_times_and_bytes_render_for_people_and_stay_exact_in_json() -> None:
    assert render.iso_ms(1_796_040_000_123) == "2026-11-30T12:00:00.123Z"
    assert render.iso_ms(0) == ""
    assert render.bytes_preview(b"ok") == "ok"
    assert render.bytes_preview(b"\xff" * 20) == "<20 bytes: " + "ff" * 16 + "...>"
    assert render.bytes_preview(b"a\nb") == "<3 bytes: 610a62>"
    row = {"job_id": 1, "ready_at_ms": 1_796_040_000_123, "result": b"\xff\x01"}
    assert json.loads(render.emit(row, "json")) == {
        "job_id": 1,
        "ready_at_ms": 1_796_040_000_123,
        "result": "/wE=",
        "result_encoding": "base64",
    }
    assert render.emit(row, "table").splitlines() == [
        "JOB_ID  READY_AT                  RESULT",
        "1       2026-11-30T12:00:00.123Z  <2 bytes: ff01>",
    ]
    assert render.iso_ms(-1) == "1969-12-31T23:59:59.999Z"
    assert render.iso_ms(10**18) == str(10**18)  # beyond year 9999: the number


def test_pq_job_shows_the_new_fields_only_when_set() -> None:

    row = render.job_row(pb.Job(job_id=1, state=pb.JOB_STATE_READY, enqueued_at_ms=5))
    assert not {"finished_at_ms", "result", "reason", "expires_at_ms"} & set(
        render.job_columns(row)
    )
    done = pb.Job(
        job_id=1, state=pb.JOB_STATE_COMPLETED, finished_at_ms=9, result=b"ok", reason="forced"
    )
    row = render.job_row(done)
    assert {"finished_at_ms", "result", "reason"} <= set(render.job_columns(row))
    assert json.loads(render.emit(row, "json"))["result"] == "ok"


def test_every_timestamp_column_shows_as_iso_and_durations_stay_numbers() -> None:
    row = {"next_tick_ms": 1_796_040_000_123, "not_before_ms": 0, "oldest_ready_age_ms": 1500}
    assert render.emit(row, "table").splitlines() == [
        "NEXT_TICK                 NOT_BEFORE  OLDEST_READY_AGE_MS",
        "2026-11-30T12:00:00.123Z              1500",
    ]
    assert json.loads(render.emit(row, "json")) == row  # JSON keeps the numbers
