"""``GET /events``: the cluster's ``Watch`` stream as server-sent events.

``/events?queue=Q`` (repeatable) follows queues, ``?all=1`` every queue the
caller sees, ``?queue=Q&job=N`` one job; QUEUE_STATS come once a second.
Each event is one ``data:`` line of JSON (``kind``, ``queue``, ``job_id``,
``state``, ... and ``stats`` for QUEUE_STATS) with the entry's log index as
its ``id``. A refusal of the cluster (no token, another tenant's queue) or a
stream the cluster ended comes as an ``event: refused`` with the error's
code and message, and the stream ends; the page shows it.

One watch per open stream, ended when the browser goes away: the response
listens for the disconnect itself (a stream that sends nothing for a while
would otherwise notice only at its next write), and a comment line every
``HEARTBEAT_S`` keeps idle proxies from closing it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any, cast

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from pqueue.cli.render import fields_of, state_name
from pqueue.errors import InvalidArgumentError, PQueueError
from pqueue.v1 import queue_pb2 as pb
from pqueue.web.auth import bearer
from pqueue.web.errors import error_code, error_response, error_status
from pqueue.web.pool import ClientPool

log = logging.getLogger(__name__)

#: Seconds between comment lines on an idle stream.
HEARTBEAT_S = 15.0
#: QUEUE_STATS interval asked of the cluster (its minimum).
STATS_INTERVAL_MS = 1000
#: How long the browser waits before it reconnects a broken stream.
RETRY_MS = 3000


def event_json(event: pb.WatchEvent) -> dict[str, Any]:
    """A ``WatchEvent`` as the JSON of one server-sent event."""
    out: dict[str, Any] = {
        "kind": pb.WatchEvent.Kind.Name(event.kind),
        "log_index": event.log_index,
        "time_ms": event.time_ms,
        "queue": event.queue,
    }
    if event.kind == pb.WatchEvent.QUEUE_STATS:
        out["stats"] = fields_of(event.stats)
        return out
    if event.job_id:
        out.update(
            job_id=event.job_id,
            state=state_name(event.state),
            attempt=event.attempt,
            priority=event.priority,
        )
    if event.result_bytes:
        out["result_bytes"] = event.result_bytes
    if event.reason:
        out["reason"] = event.reason
    return out


def sse(data: dict[str, Any], *, event: str = "", id_: int = 0) -> bytes:
    """One server-sent event (JSON on one ``data:`` line)."""
    head = f"event: {event}\n" if event else ""
    head += f"id: {id_}\n" if id_ else ""
    return f"{head}data: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


async def watch_events(
    pool: ClientPool, token: str, queues: list[str], all_queues: bool, job_id: int
) -> AsyncIterator[bytes]:
    """The watch's events as server-sent events; a refusal as the last one.
    The token's client is held (``ClientPool.use``) and the watch closed
    when this ends or is closed."""
    try:
        async with pool.use(token) as client:
            # Closed here, not left to the garbage collector, when this is
            # closed while it waits at its yield (a browser gone mid-send).
            watch = cast(
                AsyncGenerator[pb.WatchEvent, None],
                client.watch(
                    queues,
                    all_queues=all_queues,
                    job_id=job_id,
                    stats_interval_ms=STATS_INTERVAL_MS,
                ),
            )
            async with contextlib.aclosing(watch):
                async for event in watch:
                    yield sse(event_json(event), id_=event.log_index)
    except PQueueError as e:
        yield sse(
            {"code": error_code(e), "status": error_status(e), "message": e.message},
            event="refused",
        )


class EventStream(Response):
    """A response that sends ``source`` until it ends or the client goes
    away, whichever is first, then closes ``source`` (its watch)."""

    def __init__(self, source: AsyncIterator[bytes], streams: set[EventStream]) -> None:
        super().__init__(
            status_code=200,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )
        # Streamed: no length (Response put a zero one for its empty body).
        self.raw_headers = [(k, v) for k, v in self.raw_headers if k != b"content-length"]
        self.source = source
        self.streams = streams

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        lock = asyncio.Lock()

        async def write(chunk: bytes, more: bool = True) -> None:
            async with lock:
                await send({"type": "http.response.body", "body": chunk, "more_body": more})

        async def pump() -> None:
            await write(f"retry: {RETRY_MS}\n: connected\n\n".encode())
            async for chunk in self.source:
                await write(chunk)

        async def heartbeat_loop() -> None:
            while True:
                await asyncio.sleep(HEARTBEAT_S)
                await write(b": ping\n\n")

        async def until_disconnect() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        self.streams.add(self)
        tasks = [
            asyncio.create_task(pump(), name="sse-pump"),
            asyncio.create_task(until_disconnect(), name="sse-disconnect"),
            asyncio.create_task(heartbeat_loop(), name="sse-heartbeat"),
        ]
        ended = False
        try:
            done, _ = await asyncio.wait(tasks[:2], return_when=asyncio.FIRST_COMPLETED)
            ended = tasks[0] in done and tasks[0].exception() is None
        finally:
            for task in tasks:
                task.cancel()
            # Cancelled ones answer CancelledError here; this task's own
            # cancellation still propagates out of gather.
            for result in await asyncio.gather(*tasks, return_exceptions=True):
                if isinstance(result, Exception) and not isinstance(result, OSError):
                    log.warning("event stream failed", exc_info=result)
            aclose = getattr(self.source, "aclose", None)
            if aclose is not None:
                await aclose()
            self.streams.discard(self)
        if ended:
            with contextlib.suppress(OSError):
                await write(b"", more=False)


async def events(request: Request) -> Response:
    """``GET /events``: follow queues, every queue, or one job, live."""
    q = request.query_params
    queues = [name for name in q.getlist("queue") if name]
    all_queues = q.get("all", "") in ("1", "true")
    job = q.get("job", "")
    try:
        if not queues and not all_queues:
            raise InvalidArgumentError("queue", "name a queue (repeatable), or all=1")
        if job and (not (job.isascii() and job.isdigit()) or len(queues) != 1):
            raise InvalidArgumentError("job", "a job id, with exactly one queue")
        token = bearer(request)
    except PQueueError as e:
        return error_response(e)
    source = watch_events(request.app.state.pool, token, queues, all_queues, int(job or 0))
    return EventStream(source, request.app.state.streams)
