"""A request's queue name, job id and integer query values, read one way by
the ``/v1/`` routes and the dashboard's pages alike; a bad one is an
``InvalidArgumentError`` naming it."""

from __future__ import annotations

from starlette.requests import Request

from pqueue.errors import InvalidArgumentError


def queue_name(request: Request) -> str:
    """The ``{queue}`` path segment, ``%2F`` (kept by ``EncodedSlashes``) as ``/``."""
    return str(request.path_params["queue"]).replace("%2F", "/")


def job_id(request: Request) -> int:
    """The ``{job_id}`` path segment: ASCII digits ("²" is a digit int() refuses)."""
    text = str(request.path_params["job_id"])
    if not (text.isascii() and text.isdigit()):
        raise InvalidArgumentError("job_id", f"must be a positive integer, got {text!r}")
    return int(text)


def query_int(request: Request, name: str) -> int | None:
    """An integer query parameter; None when absent or blank."""
    text = request.query_params.get(name, "").strip()
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        raise InvalidArgumentError(name, f"must be an integer, got {text!r}") from None
