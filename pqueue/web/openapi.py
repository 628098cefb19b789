"""The OpenAPI 3.1 description of the ``/v1/`` API (served at ``/openapi.json``).

Written by hand, one entry per route of ``pqueue.web.app.ROUTES``; a test
checks that the two name the same routes.
"""

from __future__ import annotations

from typing import Any

INT = {"type": "integer"}
STR = {"type": "string"}
BOOL = {"type": "boolean"}


def _obj(props: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "object", "properties": props}
    if required:
        out["required"] = list(required)
    return out


BYTES_NOTE = "UTF-8 text; base64 with the matching `*_encoding: base64`; other JSON as JSON text"

JOB = _obj(
    {
        "job_id": INT,
        "queue": STR,
        "state": {
            "enum": ["ready", "delayed", "leased", "dead", "completed", "cancelled"],
        },
        "priority": INT,
        "payload": STR,
        "payload_encoding": {"const": "base64"},
        "attempts": INT,
        "group": STR,
        "idempotency_key": STR,
        "enqueued_at_ms": INT,
        "ready_at_ms": INT,
        "lease_expires_at_ms": INT,
        "errors": {
            "type": "array",
            "items": _obj({"attempt": INT, "at_ms": INT, "reason": STR}),
        },
        "tenant": STR,
        "consumer_id": STR,
        "finished_at_ms": INT,
        "result": STR,
        "result_encoding": {"const": "base64"},
        "reason": STR,
        "expires_at_ms": INT,
    }
)
LEASED_JOB = _obj(
    {
        "job_id": INT,
        "lease_id": INT,
        "priority": INT,
        "payload": STR,
        "payload_encoding": {"const": "base64"},
        "attempt": INT,
        "group": STR,
        "lease_expires_at_ms": INT,
        "tenant": STR,
    }
)
QUEUE = _obj(
    {
        "queue": STR,
        "config": {"type": "object", "description": "QueueConfig fields by name"},
        "stats": {"type": "object", "description": "QueueStats fields by name"},
    }
)
ERROR = _obj(
    {
        "error": _obj(
            {
                "code": {"type": "string", "description": "the gRPC status name"},
                "message": STR,
                "field": {"type": "string", "description": "INVALID_ARGUMENT: the field"},
            },
            ("code", "message"),
        )
    },
    ("error",),
)

ERRORS = {
    "400": "INVALID_ARGUMENT (`field` names the field)",
    "401": "UNAUTHENTICATED: no or bad bearer token",
    "403": "PERMISSION_DENIED",
    "404": "NOT_FOUND: no such queue, job or route",
    "409": "ALREADY_EXISTS, ABORTED (stale lease) or FAILED_PRECONDITION (wrong state)",
    "429": "RESOURCE_EXHAUSTED; `Retry-After` when the limit passes",
    "503": "UNAVAILABLE (no leader, node down); `Retry-After`",
    "504": "DEADLINE_EXCEEDED",
}

QUEUE_PARAM = {
    "name": "queue",
    "in": "path",
    "required": True,
    "schema": STR,
    "description": "the queue; a tenant's slash URL-encoded (`acme%2Femails`)",
}
JOB_PARAM = {"name": "job_id", "in": "path", "required": True, "schema": INT}


def _query(name: str, schema: dict[str, Any], description: str = "") -> dict[str, Any]:
    out = {"name": name, "in": "query", "required": False, "schema": schema}
    if description:
        out["description"] = description
    return out


#: (method, path) -> (summary, request body schema or None, answer schema, status, query).
OPS: dict[tuple[str, str], tuple[str, Any, Any, str, list[dict[str, Any]]]] = {
    ("GET", "/v1/queues"): (
        "Every queue the caller may see, with config and stats",
        None,
        _obj({"queues": {"type": "array", "items": QUEUE}}),
        "200",
        [],
    ),
    ("GET", "/v1/queues/{queue}"): ("One queue's config and stats", None, QUEUE, "200", []),
    ("POST", "/v1/queues/{queue}/pause"): (
        "Stop leasing from the queue (enqueues go on)",
        None,
        _obj({"changed": BOOL}),
        "200",
        [],
    ),
    ("POST", "/v1/queues/{queue}/resume"): (
        "Lease from a paused queue again",
        None,
        _obj({"changed": BOOL}),
        "200",
        [],
    ),
    ("POST", "/v1/queues/{queue}/jobs"): (
        "Enqueue one job",
        _obj(
            {
                "payload": {"description": BYTES_NOTE},
                "payload_encoding": {"enum": ["utf-8", "base64"]},
                "priority": INT,
                "delay_ms": INT,
                "not_before_ms": INT,
                "idempotency_key": STR,
                "group": STR,
                "expires_at_ms": INT,
            },
            ("payload",),
        ),
        _obj({"job_id": INT, "duplicate": BOOL}),
        "201",
        [],
    ),
    ("GET", "/v1/queues/{queue}/jobs"): (
        "A page of the queue's jobs in one state, in serving order",
        None,
        _obj({"jobs": {"type": "array", "items": JOB}, "next_page_token": STR}),
        "200",
        [
            _query("state", STR, "ready (default), delayed, leased, dead, completed, cancelled"),
            _query("limit", INT, "0: 100; at most 1000"),
            _query("page_token", STR, "next_page_token of the previous page"),
            _query("min_priority", INT),
            _query("max_priority", INT),
            _query("group", STR),
            _query("tenant", STR),
        ],
    ),
    ("GET", "/v1/queues/{queue}/jobs/{job_id}"): (
        "One job: state, attempts, error history, result",
        None,
        JOB,
        "200",
        [],
    ),
    ("POST", "/v1/queues/{queue}/leases"): (
        "Lease up to max_jobs, long-polling up to wait_ms",
        _obj({"max_jobs": INT, "lease_ms": INT, "wait_ms": INT, "consumer_id": STR}),
        _obj({"jobs": {"type": "array", "items": LEASED_JOB}}),
        "200",
        [],
    ),
    ("POST", "/v1/queues/{queue}/jobs/{job_id}/ack"): (
        "Complete a leased job, keeping its result",
        _obj(
            {
                "lease_id": INT,
                "result": {"description": BYTES_NOTE},
                "result_encoding": {"enum": ["utf-8", "base64"]},
            },
            ("lease_id",),
        ),
        _obj({"job_id": INT, "acked": BOOL}),
        "200",
        [],
    ),
    ("POST", "/v1/queues/{queue}/jobs/{job_id}/nack"): (
        "Give a leased job back for a retry (after delay_ms or the queue's backoff)",
        _obj({"lease_id": INT, "reason": STR, "delay_ms": INT}, ("lease_id",)),
        _obj({"state": STR, "ready_at_ms": INT, "attempts": INT}),
        "200",
        [],
    ),
    ("POST", "/v1/queues/{queue}/jobs/{job_id}/extend"): (
        "Move a lease's expiry to now + lease_ms (capped by the queue)",
        _obj({"lease_id": INT, "lease_ms": INT}, ("lease_id",)),
        _obj({"lease_expires_at_ms": INT, "capped": BOOL}),
        "200",
        [],
    ),
    ("POST", "/v1/queues/{queue}/jobs/{job_id}/complete"): (
        "Force-complete a ready, delayed, leased or dead job",
        _obj(
            {
                "note": STR,
                "result": {"description": BYTES_NOTE},
                "result_encoding": {"enum": ["utf-8", "base64"]},
            }
        ),
        JOB,
        "200",
        [],
    ),
    ("POST", "/v1/queues/{queue}/jobs/{job_id}/cancel"): (
        "Cancel a ready, delayed or leased job",
        _obj({"note": STR}),
        JOB,
        "200",
        [],
    ),
    ("POST", "/v1/queues/{queue}/jobs/{job_id}/requeue"): (
        "Make a dead, completed or cancelled job ready again",
        _obj({"delay_ms": INT}),
        JOB,
        "200",
        [],
    ),
    ("POST", "/v1/queues/{queue}/jobs/{job_id}/reprioritize"): (
        "Change a waiting job's priority, ready time, or both",
        _obj({"priority": INT, "ready_at_ms": INT}),
        JOB,
        "200",
        [],
    ),
    ("GET", "/v1/queues/{queue}/dead"): (
        "A page of dead jobs with their error history",
        None,
        _obj({"jobs": {"type": "array", "items": JOB}, "next_after_job_id": INT}),
        "200",
        [_query("limit", INT), _query("after_job_id", INT, "next_after_job_id of the last page")],
    ),
    ("POST", "/v1/queues/{queue}/dead/redrive"): (
        "Make dead jobs ready again (every one when job_ids is empty)",
        _obj({"job_ids": {"type": "array", "items": INT}}),
        _obj({"redriven": INT}),
        "200",
        [],
    ),
    ("POST", "/v1/queues/{queue}/dead/delete"): (
        "Delete dead jobs for good (every one when job_ids is empty)",
        _obj({"job_ids": {"type": "array", "items": INT}}),
        _obj({"deleted": INT}),
        "200",
        [],
    ),
}


def _operation(method: str, path: str) -> dict[str, Any]:
    summary, body, answer, status, query = OPS[(method, path)]
    params: list[dict[str, Any]] = []
    if "{queue}" in path:
        params.append(QUEUE_PARAM)
    if "{job_id}" in path:
        params.append(JOB_PARAM)
    responses: dict[str, Any] = {
        status: {"description": "OK", "content": {"application/json": {"schema": answer}}}
    }
    for code in ERRORS:
        responses[code] = {"$ref": f"#/components/responses/E{code}"}
    op: dict[str, Any] = {"summary": summary, "parameters": params + query}
    if body is not None:
        op["requestBody"] = {
            "required": "required" in body,
            "content": {"application/json": {"schema": body}},
        }
    op["responses"] = responses
    return op


def spec() -> dict[str, Any]:
    """The whole OpenAPI document."""
    paths: dict[str, dict[str, Any]] = {}
    for method, path in OPS:
        paths.setdefault(path, {})[method.lower()] = _operation(method, path)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "pqueue HTTP/JSON API",
            "version": "1",
            "description": (
                "`pq web` in front of a pqueue cluster. Send `Authorization: Bearer TOKEN` "
                "when the cluster has auth on. Errors answer "
                '`{"error": {"code", "message", "field"}}` with the gRPC status name.'
            ),
        },
        "paths": paths,
        "components": {
            "schemas": {"Error": ERROR},
            "responses": {
                f"E{code}": {
                    "description": why,
                    "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/Error"}}
                    },
                }
                for code, why in ERRORS.items()
            },
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{}, {"bearer": []}],
    }
