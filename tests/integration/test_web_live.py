"""``GET /events`` over real HTTP (uvicorn on 127.0.0.1:0) with a real node
behind it: the Watch stream's events arrive as server-sent events, a
refusal arrives as one, and a browser going away ends the node's watch."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette

from pqueue.client import Client
from pqueue.node.auth import Verifier, issue
from pqueue.node.server import NodeServer
from pqueue.web import pool
from pqueue.web.app import ClientPool, build_app
from tests.inproc import one_node

SECRET = b"v" * 32


@asynccontextmanager
async def served(endpoint: str) -> AsyncIterator[tuple[str, Starlette]]:
    """``pq web``'s app on a real port, stopped on the way out."""
    app = build_app(ClientPool(endpoint, timeout_s=5.0))
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=0,
        log_level="warning",
        lifespan="on",
        timeout_graceful_shutdown=1,
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        await until(lambda: server.started or task.done())
        assert server.started, "uvicorn did not start"
        port = server.servers[0].sockets[0].getsockname()[1]
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        await task


async def until(check: Callable[[], object], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("never happened")
        await asyncio.sleep(0.02)


async def next_event(lines: AsyncIterator[str]) -> dict[str, Any]:
    """The next server-sent event's fields (``data`` parsed as JSON)."""
    event: dict[str, Any] = {}
    async for line in lines:
        if not line:
            if "data" in event:
                return event
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(": ")
        event[name] = json.loads(value) if name == "data" else value
    raise AssertionError(f"the stream ended: {event}")


async def test_an_enqueue_arrives_and_a_disconnect_ends_the_watch(server: NodeServer) -> None:
    watchers = server.node.watchers.subscriptions
    async with served(server.address) as (url, app), Client(server.address) as c:
        async with (
            httpx.AsyncClient(timeout=10) as http,
            http.stream("GET", f"{url}/events", params={"queue": "emails"}) as resp,
        ):
            assert resp.status_code == 200
            assert resp.headers["content-type"].startswith("text/event-stream")
            assert "content-length" not in resp.headers
            await until(lambda: len(watchers) == 1)  # the watch is on: no event can be missed
            assert len(app.state.streams) == 1
            job_id = (await c.enqueue("emails", "hello", priority=4)).job_id
            lines = resp.aiter_lines()
            event = await next_event(lines)
            data = event["data"]
            assert (data["kind"], data["queue"], data["job_id"]) == ("ENQUEUED", "emails", job_id)
            assert (data["state"], data["priority"]) == ("ready", 4)
            assert event["id"] == str(data["log_index"])
            # Then the queue's counts, once a second.
            while (stats := (await next_event(lines))["data"])["kind"] != "QUEUE_STATS":
                pass
            assert (stats["stats"]["ready"], stats["stats"]["enqueued_total"]) == (1, 1)
        # The browser went away (the connection is closed): the watch ends at
        # once, on the node too, though nothing more is sent to notice it by.
        await until(lambda: not app.state.streams and not watchers)


async def test_a_refusal_is_an_event_that_ends_the_stream(tmp_path: Path) -> None:
    acme = issue(SECRET, "acme", ["producer", "consumer"], 600)
    async with (
        one_node(tmp_path, verifier=Verifier(SECRET)) as srv,
        served(srv.address) as (url, app),
        httpx.AsyncClient(timeout=10) as http,
    ):
        for headers, code in (
            ({}, "UNAUTHENTICATED"),
            ({"Authorization": f"Bearer {acme}"}, "PERMISSION_DENIED"),
        ):
            params = {"queue": "bolt/mail"}
            async with http.stream("GET", f"{url}/events", params=params, headers=headers) as r:
                assert r.status_code == 200
                lines = r.aiter_lines()
                event = await next_event(lines)
                assert event["event"] == "refused"
                assert event["data"]["code"] == code
                assert event["data"]["message"]
                rest = [line async for line in lines]
                assert not [x for x in rest if x.startswith("data")]  # it ended
        await until(lambda: not app.state.streams and not srv.node.watchers.subscriptions)


async def test_a_stream_must_name_what_it_follows(server: NodeServer) -> None:
    async with served(server.address) as (url, _), httpx.AsyncClient(timeout=10) as http:
        r = await http.get(f"{url}/events")
        assert (r.status_code, r.json()["error"]["field"]) == (400, "queue")
        r = await http.get(f"{url}/events", params={"queue": ["a", "b"], "job": "3"})
        assert (r.status_code, r.json()["error"]["field"]) == (400, "job")


async def test_a_stream_outlives_its_client_leaving_the_pool(
    server: NodeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pool keeps one client per token, the least recently used closed
    first: one an open stream still uses is closed only when it ends, so
    other tokens' calls do not end someone's live updates."""
    monkeypatch.setattr(pool, "MAX_CLIENTS", 1)
    watchers = server.node.watchers.subscriptions
    async with served(server.address) as (url, app), Client(server.address) as c:
        async with (
            httpx.AsyncClient(timeout=10) as http,
            http.stream(
                "GET",
                f"{url}/events",
                params={"queue": "emails"},
                headers={"Authorization": "Bearer a"},
            ) as resp,
        ):
            await until(lambda: len(watchers) == 1)
            # Another token's call: the stream's client leaves the pool.
            r = await http.get(f"{url}/v1/queues", headers={"Authorization": "Bearer b"})
            assert r.status_code == 200
            job_id = (await c.enqueue("emails", "hello")).job_id
            event = await next_event(resp.aiter_lines())
            assert event.get("event") != "refused", event
            assert (event["data"]["kind"], event["data"]["job_id"]) == ("ENQUEUED", job_id)
        await until(lambda: not app.state.streams and not watchers)
        assert not app.state.pool._retired  # its client was closed once the stream ended
