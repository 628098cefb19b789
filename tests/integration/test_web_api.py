"""The HTTP/JSON API (``pqueue.web``) at the ASGI level, with a real node behind
it: every route, the error mapping, queue names with a tenant slash, auth."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from pqueue.cli.devcluster import free_ports
from pqueue.client import Client
from pqueue.node.auth import Verifier, issue
from pqueue.node.server import NodeServer
from pqueue.v1 import queue_pb2 as pb
from pqueue.web.app import ROUTES, ClientPool, build_app
from pqueue.web.openapi import spec
from tests.inproc import one_node

SECRET = b"w" * 32


@asynccontextmanager
async def api(endpoint: str, token: str | None = None) -> AsyncIterator[httpx.AsyncClient]:
    pool = ClientPool(endpoint, token=token, timeout_s=5.0)
    app = build_app(pool)
    transport = httpx.ASGITransport(app=app)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://web") as http:
            yield http
    finally:
        await pool.close()


def error_of(resp: httpx.Response) -> dict[str, Any]:
    body: dict[str, Any] = resp.json()
    assert set(body) == {"error"}, body
    inner: dict[str, Any] = body["error"]
    return inner


async def test_enqueue_lease_ack_and_read_back(server: NodeServer) -> None:
    async with api(server.address) as http:
        r = await http.post("/v1/queues/emails/jobs", json={"payload": "hi", "priority": -5})
        assert r.status_code == 201
        first = r.json()
        assert first["duplicate"] is False
        job_id = first["job_id"]
        # Binary payloads go as base64; other JSON values as JSON text.
        raw = bytes(range(250, 256))
        r = await http.post(
            "/v1/queues/emails/jobs",
            json={"payload": base64.b64encode(raw).decode(), "payload_encoding": "base64"},
        )
        binary_id = r.json()["job_id"]
        r = await http.post("/v1/queues/emails/jobs", json={"payload": {"to": "a@b"}})
        json_id = r.json()["job_id"]
        again = await http.post(
            "/v1/queues/emails/jobs", json={"payload": "x", "idempotency_key": "k1"}
        )
        dup = await http.post(
            "/v1/queues/emails/jobs", json={"payload": "x", "idempotency_key": "k1"}
        )
        assert dup.json() == {"job_id": again.json()["job_id"], "duplicate": True}

        job = (await http.get(f"/v1/queues/emails/jobs/{job_id}")).json()
        assert (job["state"], job["priority"], job["payload"]) == ("ready", -5, "hi")
        b = (await http.get(f"/v1/queues/emails/jobs/{binary_id}")).json()
        assert b["payload_encoding"] == "base64"
        assert base64.b64decode(b["payload"]) == raw
        j = (await http.get(f"/v1/queues/emails/jobs/{json_id}")).json()
        assert j["payload"] == '{"to":"a@b"}'

        page = (await http.get("/v1/queues/emails/jobs", params={"limit": 2})).json()
        assert page["jobs"][0]["job_id"] == job_id  # lowest priority value first
        assert len(page["jobs"]) == 2
        assert page["next_page_token"]
        rest = await http.get(
            "/v1/queues/emails/jobs",
            params={"state": "ready", "page_token": page["next_page_token"]},
        )
        assert len(rest.json()["jobs"]) == 2

        r = await http.post("/v1/queues/emails/leases", json={"max_jobs": 1, "lease_ms": 30000})
        assert r.status_code == 200
        (leased,) = r.json()["jobs"]
        assert (leased["job_id"], leased["payload"], leased["attempt"]) == (job_id, "hi", 1)
        r = await http.post(
            f"/v1/queues/emails/jobs/{job_id}/extend",
            json={"lease_id": leased["lease_id"], "lease_ms": 60000},
        )
        assert r.status_code == 200
        assert r.json()["lease_expires_at_ms"] > leased["lease_expires_at_ms"] - 1
        r = await http.post(
            f"/v1/queues/emails/jobs/{job_id}/ack",
            json={"lease_id": leased["lease_id"], "result": "sent"},
        )
        assert r.json() == {"job_id": job_id, "acked": True}
        done = (await http.get(f"/v1/queues/emails/jobs/{job_id}")).json()
        assert (done["state"], done["result"]) == ("completed", "sent")

        queue = (await http.get("/v1/queues/emails")).json()
        assert queue["queue"] == "emails"
        assert queue["stats"]["ready"] == 3
        assert queue["stats"]["completed"] == 1
        assert "max_attempts" in queue["config"]
        names = [q["queue"] for q in (await http.get("/v1/queues")).json()["queues"]]
        assert names == ["emails"]


async def test_nack_dead_redrive_and_the_operator_actions(server: NodeServer) -> None:
    async with Client(server.address) as c:
        await c.create_queue("work", pb.QueueConfig(max_attempts=1))
    async with api(server.address) as http:
        ids = [
            (await http.post("/v1/queues/work/jobs", json={"payload": f"j{i}"})).json()["job_id"]
            for i in range(4)
        ]
        (leased,) = (await http.post("/v1/queues/work/leases", json={})).json()["jobs"]
        r = await http.post(
            f"/v1/queues/work/jobs/{leased['job_id']}/nack",
            json={"lease_id": leased["lease_id"], "reason": "boom"},
        )
        assert r.status_code == 200
        assert r.json()["state"] == "dead"
        dead = (await http.get("/v1/queues/work/dead")).json()
        assert [j["job_id"] for j in dead["jobs"]] == [leased["job_id"]]
        assert dead["jobs"][0]["errors"][0]["reason"] == "boom"
        r = await http.post("/v1/queues/work/dead/redrive", json={})
        assert r.json() == {"redriven": 1}

        r = await http.post(f"/v1/queues/work/jobs/{ids[1]}/complete", json={"note": "by hand"})
        assert r.json()["state"] == "completed"
        r = await http.post(f"/v1/queues/work/jobs/{ids[2]}/cancel", json={})
        assert r.json()["state"] == "cancelled"
        r = await http.post(f"/v1/queues/work/jobs/{ids[2]}/requeue", json={})
        assert r.json()["state"] == "ready"
        r = await http.post(f"/v1/queues/work/jobs/{ids[3]}/reprioritize", json={"priority": 9})
        assert r.json()["priority"] == 9

        assert (await http.post("/v1/queues/work/pause")).json() == {"changed": True}
        assert (await http.get("/v1/queues/work")).json()["stats"]["paused"] is True
        assert (await http.post("/v1/queues/work/resume")).json() == {"changed": True}


async def test_refusals_answer_http_codes_and_json_errors(server: NodeServer) -> None:
    async with api(server.address) as http:
        r = await http.get("/v1/queues/nope/jobs/1")
        assert r.status_code == 404
        assert error_of(r)["code"] == "NOT_FOUND"

        r = await http.post("/v1/queues/q/jobs", json={"payload": "x", "priority": "high"})
        assert r.status_code == 400
        assert error_of(r) == {
            "code": "INVALID_ARGUMENT",
            "message": "must be an integer, got 'high'",
            "field": "priority",
        }
        r = await http.post("/v1/queues/q/jobs", json={"priority": 1})
        assert (r.status_code, error_of(r)["field"]) == (400, "payload")
        r = await http.post("/v1/queues/q/jobs", content=b"{not json")
        assert (r.status_code, error_of(r)["field"]) == (400, "body")
        r = await http.post(
            "/v1/queues/q/jobs", json={"payload": "%%", "payload_encoding": "base64"}
        )
        assert (r.status_code, error_of(r)["field"]) == (400, "payload")

        job_id = (await http.post("/v1/queues/q/jobs", json={"payload": "x"})).json()["job_id"]
        # The server's own INVALID_ARGUMENT names its field too.
        r = await http.post(f"/v1/queues/q/jobs/{job_id}/reprioritize", json={})
        assert (r.status_code, error_of(r)["code"], error_of(r)["field"]) == (
            400,
            "INVALID_ARGUMENT",
            "priority",
        )
        (leased,) = (await http.post("/v1/queues/q/leases", json={})).json()["jobs"]
        r = await http.post(
            f"/v1/queues/q/jobs/{job_id}/ack", json={"lease_id": leased["lease_id"] + 1}
        )
        assert (r.status_code, error_of(r)["code"]) == (409, "ABORTED")
        await http.post(f"/v1/queues/q/jobs/{job_id}/ack", json={"lease_id": leased["lease_id"]})
        r = await http.post(f"/v1/queues/q/jobs/{job_id}/cancel", json={})
        assert (r.status_code, error_of(r)["code"]) == (409, "FAILED_PRECONDITION")
        assert "completed" in error_of(r)["message"].lower()

        r = await http.get("/v1/queues/q/jobs", params={"state": "sleepy"})
        assert (r.status_code, error_of(r)["field"]) == (400, "state")
        r = await http.get("/v1/queues/q/jobs/abc")
        assert (r.status_code, error_of(r)["field"]) == (400, "job_id")
        r = await http.get("/v2/anything")
        assert (r.status_code, error_of(r)["code"]) == (404, "NOT_FOUND")
        r = await http.delete("/v1/queues/q/jobs")
        assert (r.status_code, error_of(r)["code"]) == (405, "METHOD_NOT_ALLOWED")


async def test_an_unreachable_cluster_is_503_with_retry_after() -> None:
    (port,) = free_ports(1)
    async with api(f"127.0.0.1:{port}") as http:
        r = await http.get("/v1/queues")
        assert r.status_code == 503
        assert error_of(r)["code"] == "UNAVAILABLE"
        assert int(r.headers["retry-after"]) >= 1


async def test_a_tenant_queue_name_goes_url_encoded(server: NodeServer) -> None:
    async with api(server.address) as http:
        r = await http.post("/v1/queues/acme%2Femails/jobs", json={"payload": "x"})
        assert r.status_code == 201, r.text
        job_id = r.json()["job_id"]
        job = (await http.get(f"/v1/queues/acme%2Femails/jobs/{job_id}")).json()
        assert job["queue"] == "acme/emails"
        assert (await http.get("/v1/queues/acme%2Femails")).json()["queue"] == "acme/emails"
        # Unencoded, the slash is a path separator: no such route.
        assert (await http.get(f"/v1/queues/acme/emails/jobs/{job_id}")).status_code == 404


def _token(tenant: str, *roles: str) -> str:
    return issue(SECRET, tenant, roles, 600)


async def test_the_bearer_token_is_passed_on_and_the_process_token_fills_in(
    tmp_path: Path,
) -> None:
    acme = _token("acme", "producer", "consumer")
    bolt = _token("bolt", "producer", "consumer")
    async with one_node(tmp_path, verifier=Verifier(SECRET)) as srv:
        async with api(srv.address) as http:
            r = await http.get("/v1/queues")
            assert (r.status_code, error_of(r)["code"]) == (401, "UNAUTHENTICATED")
            assert r.headers["www-authenticate"] == "Bearer"

            def as_(token: str) -> dict[str, str]:
                return {"Authorization": f"Bearer {token}"}

            r = await http.post("/v1/queues/mail/jobs", json={"payload": "x"}, headers=as_(acme))
            assert r.status_code == 201, r.text
            job_id = r.json()["job_id"]
            r = await http.get(f"/v1/queues/mail/jobs/{job_id}", headers=as_(acme))
            assert r.json()["tenant"] == "acme"
            # bolt's "mail" is its own queue: acme's job is not there.
            r = await http.get(f"/v1/queues/mail/jobs/{job_id}", headers=as_(bolt))
            assert r.status_code == 404
            r = await http.get(f"/v1/queues/acme%2Fmail/jobs/{job_id}", headers=as_(bolt))
            assert (r.status_code, error_of(r)["code"]) == (403, "PERMISSION_DENIED")
            r = await http.get("/v1/queues", headers={"Authorization": "Basic eDp5"})
            assert (r.status_code, error_of(r)["field"]) == (400, "Authorization")
        # With a process token, a request without one acts as that token.
        async with api(srv.address, token=acme) as http:
            r = await http.get(f"/v1/queues/mail/jobs/{job_id}")
            assert r.status_code == 200
            assert [q["queue"] for q in (await http.get("/v1/queues")).json()["queues"]] == ["mail"]
            r = await http.get(f"/v1/queues/mail/jobs/{job_id}", headers=as_(bolt))
            assert r.status_code == 404  # the request's own token wins


def _app_routes() -> set[tuple[str, str]]:
    return {(m, p) for m, p, _ in ROUTES} | {("GET", "/openapi.json")}


def test_openapi_names_every_route_and_no_other() -> None:
    doc = spec()
    assert doc["openapi"].startswith("3.1")
    described = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    assert described | {("GET", "/openapi.json")} == _app_routes()
    for path, ops in doc["paths"].items():
        for op in ops.values():
            names = {p["name"] for p in op["parameters"] if p["in"] == "path"}
            assert names == {s.strip("{}") for s in path.split("/") if s.startswith("{")}


async def test_openapi_is_served(server: NodeServer) -> None:
    async with api(server.address) as http:
        r = await http.get("/openapi.json")
        assert r.status_code == 200
        assert r.json() == spec()


@pytest.mark.parametrize(
    ("make", "status", "retry_after"),
    [
        (lambda e: e.ResourceExhaustedError("quota", retry_after_s=2.5), 429, "3"),
        (lambda e: e.ResourceExhaustedError("too big"), 429, None),
        (lambda e: e.DeadlineExceededError("slow"), 504, None),
        (lambda e: e.AlreadyExistsError("there"), 409, None),
        (lambda e: e.NotLeaderError("moved"), 503, "1"),
        (lambda e: e.RemoteError("lost", "DATA_LOSS"), 502, None),
    ],
)
def test_statuses_the_node_rarely_gives_map_too(
    make: Callable[[Any], Any], status: int, retry_after: str | None
) -> None:
    from pqueue import errors
    from pqueue.web.errors import error_response

    resp = error_response(make(errors))
    assert resp.status_code == status
    assert resp.headers.get("retry-after") == retry_after
