"""SDK errors (gRPC statuses) as HTTP answers.

Body: ``{"error": {"code": "NOT_FOUND", "message": "...", "field": "..."}}``
(``field`` only for INVALID_ARGUMENT). FAILED_PRECONDITION (the job or queue
is not in a state that allows the call) answers 409, as ALREADY_EXISTS and
ABORTED (a stale lease) do. RESOURCE_EXHAUSTED and UNAVAILABLE carry
``Retry-After`` (whole seconds, at least 1) when the server gave a hint;
UNAVAILABLE always does.
"""

from __future__ import annotations

import math
from typing import Any

from starlette.responses import JSONResponse

from pqueue import errors
from pqueue.wire.status import code_of

#: gRPC status name -> HTTP status.
HTTP_STATUS: dict[str, int] = {
    "INVALID_ARGUMENT": 400,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409,
    "FAILED_PRECONDITION": 409,
    "ABORTED": 409,
    "RESOURCE_EXHAUSTED": 429,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
}


class JSONLine(JSONResponse):
    """JSON ending in a newline (every answer), so ``curl`` output reads line by line."""

    def render(self, content: Any) -> bytes:
        return super().render(content) + b"\n"


def error_body(code: str, message: str, field: str = "") -> dict[str, Any]:
    """The JSON body of every refusal."""
    inner: dict[str, Any] = {"code": code, "message": message}
    if field:
        inner["field"] = field
    return {"error": inner}


def error_code(error: errors.PQueueError) -> str:
    """The gRPC status name of an SDK error (or of the request's own check)."""
    if isinstance(error, errors.NotLeaderError):
        # The SDK follows leader hints; one that still surfaces is a passing state.
        return "UNAVAILABLE"
    if isinstance(error, errors.RemoteError):
        return error.code
    return code_of(error).name


def error_status(error: errors.PQueueError) -> int:
    """The HTTP status of a refusal (502 for a status without one)."""
    return HTTP_STATUS.get(error_code(error), 502)


def error_response(error: errors.PQueueError) -> JSONResponse:
    """The HTTP answer for an error the SDK raised (or the request's own check)."""
    code = error_code(error)
    status = error_status(error)
    headers: dict[str, str] = {}
    retry_after = getattr(error, "retry_after_s", 0.0)
    if code == "UNAVAILABLE" or (code == "RESOURCE_EXHAUSTED" and retry_after > 0):
        headers["Retry-After"] = str(max(1, math.ceil(retry_after)))
    if code == "UNAUTHENTICATED":
        headers["WWW-Authenticate"] = "Bearer"
    field = error.field if isinstance(error, errors.InvalidArgumentError) else ""
    message = error.reason if isinstance(error, errors.InvalidArgumentError) else error.message
    return JSONLine(error_body(code, message, field), status_code=status, headers=headers)
