"""The dashboard's pages at the ASGI level with a real node behind them:
every page answers, what the cluster holds is escaped, refusals are shown
as such, a tenant's token shows its own queues only, and the sign-in cookie
is taken for reads and for the dashboard's own writes only."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx

from pqueue.cli.web import allowed_hosts
from pqueue.client import Client
from pqueue.node.auth import Verifier, issue
from pqueue.node.server import NodeServer
from pqueue.v1 import queue_pb2 as pb
from pqueue.web.app import ClientPool, build_app
from pqueue.web.auth import COOKIE, DASHBOARD_HEADER
from tests.inproc import one_node

SECRET = b"p" * 32
EVIL = '<script>alert("x")</script>'


def signed(token: str) -> dict[str, str]:
    """The sign-in cookie, as a browser sends it."""
    return {"Cookie": f"{COOKIE}={token}"}


@asynccontextmanager
async def web(endpoint: str, token: str | None = None) -> AsyncIterator[httpx.AsyncClient]:
    pool = ClientPool(endpoint, token=token, timeout_s=5.0)
    transport = httpx.ASGITransport(app=build_app(pool))
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://web") as http:
            yield http
    finally:
        await pool.close()


async def test_every_page_answers_and_escapes_what_the_cluster_holds(
    server: NodeServer, client: Client
) -> None:
    job_id = (await client.enqueue("acme/mail", EVIL, group='"><b>g</b>')).job_id
    async with web(server.address) as http:
        home = await http.get("/")
        assert home.status_code == 200
        assert 'href="/queues/acme%2Fmail"' in home.text
        assert "Auth is OFF" in home.text
        assert 'data-live="/events?all=1"' in home.text

        queue = await http.get("/queues/acme%2Fmail")
        assert queue.status_code == 200
        assert EVIL not in queue.text
        assert "&lt;script&gt;" in queue.text
        assert "<b>g</b>" not in queue.text
        assert f'href="/queues/acme%2Fmail/jobs/{job_id}"' in queue.text
        assert 'data-live="/events?queue=acme%2Fmail"' in queue.text

        job = await http.get(f"/queues/acme%2Fmail/jobs/{job_id}")
        assert job.status_code == 200
        assert EVIL not in job.text
        assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in job.text
        assert '<span class="state ready" id="job-state">READY</span>' in job.text

        # The live part alone, as the page's script fetches it again.
        part = await http.get(f"/queues/acme%2Fmail/jobs/{job_id}", params={"fragment": "1"})
        assert part.text.startswith('<table class="fields">')
        assert "<html" not in part.text

        for path in ("/cluster", "/login", "/static/dash.js", "/static/dash.css"):
            assert (await http.get(path)).status_code == 200, path
        # No page may be framed by another site (whose page could have its
        # buttons clicked, acting with pq web's --token), nor load scripts
        # from elsewhere.
        for path in ("/", "/cluster", "/login", "/queues/acme%2Fmail", "/queues/x/jobs/999"):
            r = await http.get(path)
            assert r.headers["x-frame-options"] == "DENY", path
            csp = r.headers["content-security-policy"]
            assert "frame-ancestors 'none'" in csp, path
            assert "default-src 'self'" in csp, path
        assert (await http.get("/static/app.py")).status_code == 404

        # A queue not made yet: a page that says so and offers the form.
        empty = await http.get("/queues/nothing-yet")
        assert empty.status_code == 200
        assert 'id="no-queue"' in empty.text
        assert 'id="submit"' in empty.text

        # Missing things and bad filters are refusals on the page.
        gone = await http.get("/queues/acme%2Fmail/jobs/999")
        assert gone.status_code == 404
        assert "refused: NOT_FOUND" in gone.text
        bad = await http.get("/queues/acme%2Fmail", params={"state": "lost"})
        assert bad.status_code == 400
        assert "refused: INVALID_ARGUMENT" in bad.text


async def test_the_dead_letters_list_and_delete(server: NodeServer, client: Client) -> None:
    await client.create_queue("once", pb.QueueConfig(max_attempts=1))
    ids = [(await client.enqueue("once", f"j{i}")).job_id for i in range(3)]
    for job in await client.lease("once", max_jobs=3):
        await client.nack("once", job.job_id, job.lease_id, reason="boom <b>")
    async with web(server.address) as http:
        page = await http.get("/queues/once", params={"state": "dead"})
        assert page.status_code == 200
        for job_id in ids:
            assert f'name="job_id" value="{job_id}"' in page.text
        assert "boom &lt;b&gt;" in page.text
        assert "Redrive selected" in page.text
        r = await http.post("/v1/queues/once/dead/delete", json={"job_ids": ids[:1]})
        assert r.json() == {"deleted": 1}
        r = await http.post("/v1/queues/once/dead/redrive", json={"job_ids": ids[1:]})
        assert r.json() == {"redriven": 2}
    assert (await client.get_queue("once")).stats.ready == 2


async def test_auth_on_a_tenant_sees_its_own_queues_and_refusals_say_so(tmp_path: Path) -> None:
    acme = issue(SECRET, "acme", ["producer", "consumer"], 600)
    bolt = issue(SECRET, "bolt", ["producer", "consumer"], 600)
    async with one_node(tmp_path, verifier=Verifier(SECRET)) as srv:
        async with Client(srv.address, token=acme) as a, Client(srv.address, token=bolt) as b:
            await a.enqueue("mail", "for acme")
            await b.enqueue("invoices", "for bolt")
        async with web(srv.address) as http:
            # No token: the page says auth is on and that the cluster wants one.
            r = await http.get("/")
            assert r.status_code == 401
            assert "Auth is on" in r.text
            assert "no token" in r.text
            assert "refused: UNAUTHENTICATED" in r.text
            assert 'href="/login"' in r.text

            # Signed in (the cookie) as acme: acme's queue, not bolt's.
            r = await http.get("/", headers=signed(acme))
            assert r.status_code == 200
            assert "tenant <b>acme</b>" in r.text
            assert 'href="/queues/mail"' in r.text
            assert "invoices" not in r.text
            r = await http.get("/queues/bolt%2Finvoices", headers=signed(acme))
            assert r.status_code == 403
            assert "refused: PERMISSION_DENIED" in r.text
            assert "sees its own queues only" in r.text

            # The cookie is taken for the dashboard's own writes, not for any POST.
            r = await http.post("/v1/queues/mail/jobs", json={"payload": "x"}, headers=signed(acme))
            assert r.status_code == 401
            r = await http.post(
                "/v1/queues/mail/jobs",
                json={"payload": "x"},
                headers={**signed(acme), DASHBOARD_HEADER: "1"},
            )
            assert r.status_code == 201

            # Signing in sets the cookie; another site cannot sign you in.
            r = await http.post("/login", data={"token": bolt})
            assert r.status_code == 303
            assert r.cookies[COOKIE] == bolt
            assert "httponly" in r.headers["set-cookie"].lower()
            r = await http.post("/login", data={"token": bolt}, headers={"Origin": "http://evil"})
            assert r.status_code == 403
        # pq web's own --token: the page says whose it is.
        async with web(srv.address, token=bolt) as http:
            r = await http.get("/")
            assert r.status_code == 200
            assert "pq web's own --token: tenant <b>bolt</b>" in r.text
            assert 'href="/queues/invoices"' in r.text
            assert "/queues/mail" not in r.text


async def test_another_site_cannot_write_with_pq_webs_own_token(tmp_path: Path) -> None:
    """A request without a token of its own acts with ``--token`` (or with
    none, auth off): a form on another site, posted by the browser, must not
    act with it. Browsers say where such a post comes from (``Origin``)."""
    bolt = issue(SECRET, "bolt", ["producer", "consumer", "admin"], 600)
    async with (
        one_node(tmp_path, verifier=Verifier(SECRET)) as srv,
        Client(srv.address, token=bolt) as b,
    ):
        await b.create_queue("once", pb.QueueConfig(max_attempts=1))
        await b.enqueue("once", "j")
        for job in await b.lease("once", max_jobs=1):
            await b.nack("once", job.job_id, job.lease_id, reason="boom")
        async with web(srv.address, token=bolt) as http:
            # A cross-site form (enctype text/plain, no body needed): refused,
            # nothing deleted or paused.
            evil = {"Origin": "http://evil.example", "Content-Type": "text/plain"}
            r = await http.post("/v1/queues/once/dead/delete", headers=evil)
            assert r.status_code == 403
            assert r.json()["error"]["code"] == "PERMISSION_DENIED"
            r = await http.post("/v1/queues/once/pause", headers=evil)
            assert r.status_code == 403
            r = await http.post("/v1/queues/once/pause", headers={"Origin": "null"})
            assert r.status_code == 403
            stats = (await b.stats("once", consistent=True))[0]
            assert (stats.dead, stats.paused) == (1, False)
            # The dashboard's own page (same origin) and curl (no Origin) still act.
            r = await http.post("/v1/queues/once/pause", headers={"Origin": "http://web"})
            assert (r.status_code, r.json()) == (200, {"changed": True})
            r = await http.post("/v1/queues/once/dead/delete", json={})
            assert (r.status_code, r.json()) == (200, {"deleted": 1})


async def test_odd_requests_are_refusals_not_crashes(server: NodeServer) -> None:
    """A job id of other digits than 0-9 ("²" passes str.isdigit, not int)
    is a 400; a token whose claims are not the expected shape still shows
    a page (the header reads them for display only)."""
    async with web(server.address) as http:
        for path in ("/v1/queues/q/jobs/%C2%B2", "/queues/q/jobs/%C2%B2"):
            r = await http.get(path)
            assert r.status_code == 400, path
            assert "must be a positive integer" in r.text
        r = await http.get("/events", params={"queue": "q", "job": "²"})
        assert (r.status_code, r.json()["error"]["field"]) == (400, "job")

        claims = base64.urlsafe_b64encode(json.dumps({"tenant": "a", "roles": 5}).encode())
        odd = f"x.{claims.decode().rstrip('=')}.y"
        r = await http.get("/login", headers={"Authorization": f"Bearer {odd}"})
        assert r.status_code == 200
        assert "Auth is OFF" in r.text


async def test_a_long_text_payload_is_shown_as_text_cut(server: NodeServer, client: Client) -> None:
    """The job page shows the first 4 KiB of a payload: a cut in the middle
    of a character still shows text (and says it was cut), not hex, nor
    the whole payload."""
    one_line = "€" * 2000  # 3 bytes each: 4096 falls inside one
    lines = ("€" * 40 + "\n") * 100
    async with web(server.address) as http:
        for payload in (one_line, lines):
            job_id = (await client.enqueue("long", payload)).job_id
            page = (await http.get(f"/queues/long/jobs/{job_id}")).text
            shown = page.split('id="payload">')[1].split("</pre>")[0]
            size = len(payload.encode())
            assert shown.startswith("€" * 40), shown[:80]
            assert shown.endswith(f"({size} bytes in all; first 4096 shown)")
            assert len(shown.encode()) < 4096 + 100


async def test_a_host_not_allowed_is_refused_so_dns_rebinding_cannot_reach_pq_web(
    server: NodeServer,
) -> None:
    """A page of another site whose DNS name is rebound to 127.0.0.1 is
    same-origin with pq web (the Origin check cannot see it) but sends its own
    name as Host: a loopback pq web answers only this machine's names."""
    hosts = allowed_hosts("127.0.0.1", None)
    assert "evil.example" not in hosts
    assert allowed_hosts("0.0.0.0", None) == ["*"]
    assert allowed_hosts("0.0.0.0", ["dash.example.com"]) == ["dash.example.com"]
    pool = ClientPool(server.address, timeout_s=5.0)
    transport = httpx.ASGITransport(app=build_app(pool, hosts))
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://evil.example") as http:
            r = await http.post("/v1/queues/q/pause", json={})
            assert r.status_code == 400
            assert (await http.get("/")).status_code == 400
        for name in ("127.0.0.1:7780", "localhost:7780", "[::1]:7780"):
            base = f"http://{name}"
            async with httpx.AsyncClient(transport=transport, base_url=base) as http:
                assert (await http.get("/")).status_code == 200, name
    finally:
        await pool.close()
