"""The dashboard's pages: the frame around each, the queues list, the
cluster, and signing in (the queue and job pages are in ``queue_pages``).

Each page is rendered on the server from SDK calls made with the request's
token (``auth.bearer``); a refusal of the cluster is shown on the page, with
the HTTP status it maps to. A page asked with ``?fragment=1`` answers only
its live part, which the page's script fetches again when the event stream
says something changed.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import parse_qs

from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, RedirectResponse, Response

from pqueue.client import Client
from pqueue.errors import PQueueError
from pqueue.v1 import queue_pb2 as pb
from pqueue.web.auth import COOKIE, bearer, same_origin, token_claims
from pqueue.web.errors import error_status
from pqueue.web.html import age, error_box, esc, frame, queue_url, table

STATIC = Path(__file__).with_name("static")
#: Count columns of a queue's stats, in the order pages show them.
COUNTS = ("ready", "delayed", "leased", "dead", "completed", "cancelled")


class Page(NamedTuple):
    """A rendered page: ``body`` holds ``fragment`` (the live part) inside it."""

    title: str
    body: str
    fragment: str = ""
    live: str = ""
    nav: str = ""
    status: int = 200


PageHandler = Callable[[Request, Client], Awaitable[Page]]

#: Every page's: no framing by another site (which could have the page's
#: buttons clicked, acting with pq web's --token) and nothing loaded or
#: posted elsewhere (the pages use only /static/ and same-origin calls).
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
}


def html_response(html: str, status: int = 200) -> HTMLResponse:
    """A page (or a page's fragment) with ``PAGE_HEADERS``."""
    return HTMLResponse(html, status_code=status, headers=PAGE_HEADERS)


def _who(token: str, source: str) -> str:
    claims = token_claims(token)
    if not claims:
        return f"{source}: a token"
    roles = claims.get("roles", [])
    roles = ", ".join(str(r) for r in roles) if isinstance(roles, list) else str(roles)
    return f"{source}: tenant <b>{esc(claims.get('tenant', '?'))}</b> ({esc(roles)})"


async def auth_line(request: Request) -> str:
    """What the header says about auth: off (loudly), or on and whose token."""
    try:
        own = bearer(request)
    except PQueueError:
        own = ""
    pool = request.app.state.pool
    if own:
        who = _who(own, "signed in") + ' · <a href="/login">sign out</a>'
    elif pool.token:
        who = _who(pool.token, "pq web's own --token") + ' · <a href="/login">sign in</a>'
    else:
        who = 'no token · <a href="/login">sign in</a>'
    on = await request.app.state.probe.auth_on(request)
    if on is False:
        return (
            '<div class="auth off" id="auth">Auth is OFF at the cluster: anyone who reaches '
            "this page can read and change every queue.</div>"
        )
    if on is None:
        return (
            f'<div class="auth unknown" id="auth">Auth: the cluster does not answer · {who}</div>'
        )
    return f'<div class="auth on" id="auth">Auth is on · {who}</div>'


def page(handler: PageHandler) -> Callable[[Request], Awaitable[Response]]:
    """Run ``handler`` with the request's client; frame its page (or answer
    its fragment); a refusal becomes a page that says so."""

    async def run(request: Request) -> Response:
        pool = request.app.state.pool
        try:
            async with pool.use(bearer(request)) as client:
                result = await handler(request, client)
        except PQueueError as e:
            result = Page("Refused", error_box(e), error_box(e), status=error_status(e))
        if request.query_params.get("fragment"):
            return html_response(result.fragment, result.status)
        html = frame(
            result.title,
            result.body,
            auth=await auth_line(request),
            live=result.live,
            nav=result.nav,
        )
        return html_response(html, result.status)

    run.__name__ = handler.__name__
    return run


def count_cells(stats: pb.QueueStats) -> list[str]:
    """A queue's counts as cells the live script updates (``data-stat``)."""
    return [f'<span data-stat="{name}">{getattr(stats, name)}</span>' for name in COUNTS]


def oldest_cell(stats: pb.QueueStats) -> str:
    """The oldest ready job's age, which the live script updates."""
    return f'<span data-stat="oldest_ready_age_ms" data-age>{age(stats.oldest_ready_age_ms)}</span>'


def live_part(url: str, inner: str) -> str:
    """The part of a page its script fetches again (``url``) on events."""
    return f'<div id="live-part" data-fragment="{esc(url)}">{inner}</div>'


# ------------------------------------------------------------------ queues


async def queues_page(request: Request, client: Client) -> Page:
    infos = await client.list_queues()
    rows = []
    for info in infos:
        s = info.stats
        paused = '<span class="badge paused">paused</span>' if s.paused else ""
        rows.append(
            [
                f'<a href="{esc(queue_url(info.queue))}" data-queue-row="{esc(info.queue)}">'
                f"{esc(info.queue)}</a> {paused}",
                *count_cells(s),
                oldest_cell(s),
                f'<span data-stat="enqueued_total">{s.enqueued_total}</span>',
                '<span data-rate="enqueued_total">&ndash;</span>',
                '<span data-rate="completed_total">&ndash;</span>',
            ]
        )
    listing = table(
        ["queue", *COUNTS, "oldest ready", "enqueued", "enqueued/s", "completed/s"],
        rows,
        cls="queues",
    )
    # Each row's counts update from its queue's QUEUE_STATS events (the
    # script finds the row by its link's data-queue-row).
    fragment = listing
    body = (
        "<h1>Queues</h1>"
        '<form class="inline" id="open-queue" data-open-queue>'
        '<label>Open or create a queue <input name="queue" required placeholder="emails"></label>'
        "<button>Open</button></form>"
        + live_part("/?fragment=1", fragment)
        + '<h2>Events</h2><ol id="event-log" class="events"></ol>'
    )
    return Page("Queues", body, fragment, live="/events?all=1", nav="/")


# ------------------------------------------------------------------ cluster


def _backend_rows(status: Any) -> list[list[str]]:
    rows = []
    for b in status.backends:
        rows.append(
            [
                f"n{b.node_id}" if b.node_id else "?",
                esc(b.address),
                "★ leader" if b.leader else "",
                esc(b.health),
                str(b.weight) + (" (ejected)" if b.ejected else ""),
                f"{b.load:.2f}",
                f"{b.cpu_utilization:.2f}",
                str(b.backlog),
                str(b.reads),
                str(b.leader_calls),
                "never" if b.report_age_ms < 0 else age(b.report_age_ms) or "0",
                esc(b.last_error),
            ]
        )
    return rows


async def cluster_page(request: Request, client: Client) -> Page:
    from pqueue.cli.devcluster import cluster_status

    pool = request.app.state.pool
    parts = ["<h1>Cluster</h1>", f"<p>Endpoint <code>{esc(pool.endpoint)}</code></p>"]
    try:
        status = await client.balancer_status()
        leader = status.leader_address or "none known"
        parts.append(
            f"<h2>Balancer</h2><p>Leader: <b id='leader'>{esc(leader)}</b> · "
            f"calls sent again: {status.retries}</p>"
            + table(
                [
                    "node",
                    "address",
                    "role",
                    "health",
                    "weight",
                    "load",
                    "cpu",
                    "backlog",
                    "reads",
                    "leader calls",
                    "last report",
                    "last error",
                ],
                _backend_rows(status),
                cls="backends",
            )
        )
    except PQueueError as e:
        parts.append("<h2>Balancer</h2>" + error_box(e, "balancer status"))
    try:
        token = bearer(request) or pool.token
        rows = await cluster_status(
            pool.endpoint, min(pool.timeout_s, 3.0), token=token or None, tls=pool.tls
        )
        columns = ["node", "address", "role", "ballot", "leader", "commit", "applied", "lag"]
        cells = [[esc(r.get(c, "")) for c in columns] for r in rows]
        parts.append("<h2>Nodes</h2>" + table(columns, cells, cls="nodes"))
    except PQueueError as e:
        parts.append("<h2>Nodes</h2>" + error_box(e, "node status"))
    parts.append('<p><a href="/cluster">Refresh</a></p>')
    body = "".join(parts)
    return Page("Cluster", body, body, nav="/cluster")


# ------------------------------------------------------------------ sign in


async def login_page(request: Request) -> Response:
    signed_in = bool(request.cookies.get(COOKIE))
    body = (
        "<h1>Token</h1>"
        "<p>With auth on, the cluster wants a bearer token (<code>pq token issue</code>). "
        "The dashboard keeps it in a cookie for this site and passes it on with every call; "
        "a tenant's token sees that tenant's queues only.</p>"
        '<form method="post" action="/login" class="stack">'
        '<label>Bearer token <input type="password" name="token" autocomplete="off" '
        'required id="token"></label><button>Sign in</button></form>'
    )
    if signed_in:
        body += '<form method="post" action="/logout"><button>Sign out</button></form>'
    html = frame("Token", body, auth=await auth_line(request), nav="/login")
    return html_response(html)


async def login(request: Request) -> Response:
    if not same_origin(request):
        return html_response("cross-site sign-in refused", 403)
    form = parse_qs((await request.body()).decode("utf-8", "replace"))
    token = (form.get("token") or [""])[0].strip()
    response = RedirectResponse("/", status_code=303)
    response.set_cookie(
        COOKIE,
        token,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
    return response


async def logout(request: Request) -> Response:
    if not same_origin(request):
        return html_response("cross-site sign-out refused", 403)
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(COOKIE, httponly=True, samesite="strict")
    return response


async def static(request: Request) -> Response:
    name = request.path_params["name"]
    if name not in ("dash.css", "dash.js"):
        return Response("not found", status_code=404)
    return FileResponse(STATIC / name, headers={"Cache-Control": "no-cache"})
