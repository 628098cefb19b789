"""The ``/v1/`` routes: JSON in, JSON out, each a call of the SDK ``Client``.

Queue names with a tenant (``acme/emails``) go in the path URL-encoded
(``/v1/queues/acme%2Femails/jobs``): ``EncodedSlashes`` keeps ``%2F`` inside
its path segment so that routing sees one segment, and the handlers decode it.

Auth: the request's ``Authorization: Bearer`` token (or the dashboard's
sign-in cookie, see ``pqueue.web.auth``) is sent on to the cluster; a request
without one uses the process's own token (``--token``), if any. Each token
gets its own SDK client (a small LRU of them, ``pool.ClientPool``). A write
that a page of another site sent is refused (``auth.check_same_origin``).

The dashboard (``pages``, ``queue_pages``, ``live``) is routed here too.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from pqueue.cli.render import fields_of, job_row, leased_job_row, payload_fields, state_name
from pqueue.client import Client
from pqueue.errors import InvalidArgumentError, PQueueError
from pqueue.v1 import queue_pb2 as pb
from pqueue.web.auth import AuthProbe, bearer, check_same_origin
from pqueue.web.errors import JSONLine, error_body, error_response
from pqueue.web.params import job_id as _job_id
from pqueue.web.params import query_int as _query_int
from pqueue.web.params import queue_name as _queue
from pqueue.web.pool import ClientPool as ClientPool
from pqueue.web.pool import EncodedSlashes

# ------------------------------------------------------------------ requests


async def _body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidArgumentError("body", f"not JSON: {e}") from None
    if not isinstance(body, dict):
        raise InvalidArgumentError("body", "must be a JSON object")
    return body


def _int(body: dict[str, Any], name: str, default: int = 0) -> int:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgumentError(name, f"must be an integer, got {value!r}")
    return value


def _opt_int(body: dict[str, Any], name: str) -> int | None:
    return None if body.get(name) is None else _int(body, name)


def _str(body: dict[str, Any], name: str) -> str:
    value = body.get(name, "")
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InvalidArgumentError(name, f"must be a string, got {value!r}")
    return value


def _bytes(body: dict[str, Any], name: str, required: bool = False) -> bytes:
    """A payload or result: text (sent as UTF-8), base64 with
    ``<name>_encoding: "base64"``, or any other JSON value (sent as compact JSON)."""
    if name not in body:
        if required:
            raise InvalidArgumentError(name, "is required")
        return b""
    value = body[name]
    encoding = _str(body, f"{name}_encoding")
    if encoding not in ("", "utf-8", "base64"):
        raise InvalidArgumentError(f"{name}_encoding", "must be utf-8 or base64")
    if encoding == "base64":
        if not isinstance(value, str):
            raise InvalidArgumentError(name, "base64 must be a string")
        try:
            return base64.b64decode(value, validate=True)
        except binascii.Error as e:
            raise InvalidArgumentError(name, f"not base64: {e}") from None
    if isinstance(value, str):
        return value.encode()
    return json.dumps(value, separators=(",", ":")).encode()


# ------------------------------------------------------------------ answers


def queue_info(info: pb.QueueInfo) -> dict[str, Any]:
    return {"queue": info.queue, "config": fields_of(info.config), "stats": fields_of(info.stats)}


def jsonable(value: Any) -> Any:
    """Bytes as text, or base64 beside ``<name>_encoding`` (as ``pq -o json``)."""
    if isinstance(value, list):
        return [jsonable(v) for v in value]
    if not isinstance(value, dict):
        return value
    out: dict[str, Any] = {}
    for key, item in value.items():
        if isinstance(item, bytes):
            fields = payload_fields(item)
            out[key] = fields["payload"]
            if "payload_encoding" in fields:
                out[f"{key}_encoding"] = "base64"
        else:
            out[key] = jsonable(item)
    return out


def _json(data: Any, status: int = 200) -> JSONResponse:
    return JSONLine(jsonable(data), status_code=status)


Handler = Callable[[Request, Client], Awaitable[Response]]


def _endpoint(handler: Handler) -> Callable[[Request], Awaitable[Response]]:
    """Run ``handler`` with the request's client; SDK errors become HTTP answers."""

    async def run(request: Request) -> Response:
        pool: ClientPool = request.app.state.pool
        try:
            check_same_origin(request)
            async with pool.use(bearer(request)) as client:
                return await handler(request, client)
        except PQueueError as e:
            return error_response(e)

    run.__name__ = handler.__name__
    run.__doc__ = handler.__doc__
    return run


# ------------------------------------------------------------------ routes


async def list_queues(request: Request, client: Client) -> Response:
    return _json({"queues": [queue_info(q) for q in await client.list_queues()]})


async def get_queue(request: Request, client: Client) -> Response:
    return _json(queue_info(await client.get_queue(_queue(request))))


async def pause_queue(request: Request, client: Client) -> Response:
    return _json({"changed": await client.pause_queue(_queue(request))})


async def resume_queue(request: Request, client: Client) -> Response:
    return _json({"changed": await client.resume_queue(_queue(request))})


async def enqueue(request: Request, client: Client) -> Response:
    body = await _body(request)
    resp = await client.enqueue(
        _queue(request),
        _bytes(body, "payload", required=True),
        priority=_int(body, "priority"),
        delay_ms=_int(body, "delay_ms"),
        not_before_ms=_int(body, "not_before_ms"),
        idempotency_key=_str(body, "idempotency_key"),
        group=_str(body, "group"),
        expires_at_ms=_int(body, "expires_at_ms"),
    )
    return _json({"job_id": resp.job_id, "duplicate": resp.duplicate}, 201)


async def list_jobs(request: Request, client: Client) -> Response:
    q = request.query_params
    try:
        state = pb.JobState.Value("JOB_STATE_" + q.get("state", "ready").upper())
    except ValueError:
        raise InvalidArgumentError("state", f"unknown state {q.get('state')!r}") from None
    page = await client.list_jobs(
        _queue(request),
        state,
        min_priority=_query_int(request, "min_priority"),
        max_priority=_query_int(request, "max_priority"),
        group=q.get("group", ""),
        tenant=q.get("tenant", ""),
        page_token=q.get("page_token", ""),
        limit=_query_int(request, "limit") or 0,
    )
    return _json({"jobs": [job_row(j) for j in page.jobs], "next_page_token": page.next_page_token})


async def get_job(request: Request, client: Client) -> Response:
    return _json(job_row(await client.get_job(_queue(request), _job_id(request))))


async def lease(request: Request, client: Client) -> Response:
    body = await _body(request)
    jobs = await client.lease(
        _queue(request),
        max_jobs=_int(body, "max_jobs", 1),
        lease_ms=_int(body, "lease_ms"),
        wait_ms=_int(body, "wait_ms"),
        consumer_id=_str(body, "consumer_id"),
    )
    return _json({"jobs": [leased_job_row(j) for j in jobs]})


async def ack(request: Request, client: Client) -> Response:
    body = await _body(request)
    job_id = _job_id(request)
    await client.ack(_queue(request), job_id, _int(body, "lease_id"), result=_bytes(body, "result"))
    return _json({"job_id": job_id, "acked": True})


async def nack(request: Request, client: Client) -> Response:
    body = await _body(request)
    resp = await client.nack(
        _queue(request),
        _job_id(request),
        _int(body, "lease_id"),
        delay_ms=_opt_int(body, "delay_ms"),
        reason=_str(body, "reason"),
    )
    return _json(
        {
            "state": state_name(resp.state),
            "ready_at_ms": resp.ready_at_ms,
            "attempts": resp.attempts,
        }
    )


async def extend(request: Request, client: Client) -> Response:
    body = await _body(request)
    resp = await client.extend(
        _queue(request), _job_id(request), _int(body, "lease_id"), _int(body, "lease_ms")
    )
    return _json({"lease_expires_at_ms": resp.lease_expires_at_ms, "capped": resp.capped})


async def complete_job(request: Request, client: Client) -> Response:
    body = await _body(request)
    job = await client.complete_job(
        _queue(request), _job_id(request), note=_str(body, "note"), result=_bytes(body, "result")
    )
    return _json(job_row(job))


async def cancel_job(request: Request, client: Client) -> Response:
    body = await _body(request)
    job = await client.cancel_job(_queue(request), _job_id(request), note=_str(body, "note"))
    return _json(job_row(job))


async def requeue_job(request: Request, client: Client) -> Response:
    body = await _body(request)
    job = await client.requeue_job(
        _queue(request), _job_id(request), delay_ms=_int(body, "delay_ms")
    )
    return _json(job_row(job))


async def reprioritize_job(request: Request, client: Client) -> Response:
    body = await _body(request)
    job = await client.reprioritize_job(
        _queue(request),
        _job_id(request),
        priority=_opt_int(body, "priority"),
        ready_at_ms=_opt_int(body, "ready_at_ms"),
    )
    return _json(job_row(job))


async def list_dead(request: Request, client: Client) -> Response:
    page = await client.list_dead(
        _queue(request),
        limit=_query_int(request, "limit") or 0,
        after_job_id=_query_int(request, "after_job_id") or 0,
    )
    return _json(
        {"jobs": [job_row(j) for j in page.jobs], "next_after_job_id": page.next_after_job_id}
    )


def _job_ids(body: dict[str, Any]) -> list[int]:
    ids = body.get("job_ids") or []
    if not isinstance(ids, list) or not all(
        isinstance(i, int) and not isinstance(i, bool) for i in ids
    ):
        raise InvalidArgumentError("job_ids", "must be a list of job ids")
    return ids


async def redrive(request: Request, client: Client) -> Response:
    ids = _job_ids(await _body(request))
    return _json({"redriven": await client.redrive(_queue(request), ids)})


async def delete_dead(request: Request, client: Client) -> Response:
    ids = _job_ids(await _body(request))
    return _json({"deleted": await client.delete_dead(_queue(request), ids)})


Q = "/v1/queues/{queue}"
J = Q + "/jobs/{job_id}"

#: (method, path, handler): every route of the API, in routing order.
ROUTES: list[tuple[str, str, Handler]] = [
    ("GET", "/v1/queues", list_queues),
    ("GET", Q, get_queue),
    ("POST", Q + "/pause", pause_queue),
    ("POST", Q + "/resume", resume_queue),
    ("POST", Q + "/jobs", enqueue),
    ("GET", Q + "/jobs", list_jobs),
    ("GET", J, get_job),
    ("POST", Q + "/leases", lease),
    ("POST", J + "/ack", ack),
    ("POST", J + "/nack", nack),
    ("POST", J + "/extend", extend),
    ("POST", J + "/complete", complete_job),
    ("POST", J + "/cancel", cancel_job),
    ("POST", J + "/requeue", requeue_job),
    ("POST", J + "/reprioritize", reprioritize_job),
    ("GET", Q + "/dead", list_dead),
    ("POST", Q + "/dead/redrive", redrive),
    ("POST", Q + "/dead/delete", delete_dead),
]


async def openapi(request: Request) -> Response:
    from pqueue.web.openapi import spec

    return JSONLine(spec())


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = {404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED"}.get(exc.status_code, "HTTP_ERROR")
    return JSONLine(
        error_body(code, str(exc.detail)), status_code=exc.status_code, headers=exc.headers
    )


def dashboard_routes() -> list[Route]:
    """The dashboard's pages, its event stream and its two static files."""
    from pqueue.web import live, pages, queue_pages

    page = pages.page
    return [
        Route("/", page(pages.queues_page), methods=["GET"]),
        Route("/cluster", page(pages.cluster_page), methods=["GET"]),
        Route("/queues/{queue}", page(queue_pages.queue_page), methods=["GET"]),
        Route("/queues/{queue}/jobs/{job_id}", page(queue_pages.job_page), methods=["GET"]),
        Route("/events", live.events, methods=["GET"]),
        Route("/login", pages.login_page, methods=["GET"]),
        Route("/login", pages.login, methods=["POST"]),
        Route("/logout", pages.logout, methods=["POST"]),
        Route("/static/{name}", pages.static, methods=["GET"]),
    ]


def build_app(pool: ClientPool, allowed_hosts: Sequence[str] = ("*",)) -> Starlette:
    """The API and the dashboard; the pool's clients are closed when the app
    shuts down. A request whose ``Host`` is not one of ``allowed_hosts``
    (``"*"``: any; ``"*.example.com"``: its subdomains) is refused with 400:
    a page of another site that a rebound DNS name points here would
    otherwise be same-origin with pq web, and act with its ``--token``."""

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await pool.close()

    routes = [Route(path, _endpoint(h), methods=[m]) for m, path, h in ROUTES]
    routes.append(Route("/openapi.json", openapi, methods=["GET"]))
    routes += dashboard_routes()
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={HTTPException: _http_error},
    )
    app.state.pool = pool
    app.state.probe = AuthProbe()
    #: The open event streams (each holds one watch of the cluster).
    app.state.streams = set()
    app.add_middleware(EncodedSlashes)
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts))
    return app
