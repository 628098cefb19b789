"""HTML for the dashboard: escaping, the page frame, small building blocks.

Every value that comes from the cluster or the request goes through ``esc``
(text and attributes alike); the only unescaped strings are the literals in
this package. No template engine: the pages are few and small.
"""

from __future__ import annotations

import codecs
import html
from collections.abc import Iterable, Sequence
from typing import Any
from urllib.parse import quote, urlencode

from pqueue.cli.render import bytes_preview, iso_ms
from pqueue.errors import InvalidArgumentError, PQueueError
from pqueue.web.errors import error_code

#: Bytes of a payload or result a page shows (the rest is cut, and said so).
PREVIEW_BYTES = 4096


def esc(value: object) -> str:
    """Text safe inside an element or a quoted attribute."""
    return html.escape(str(value), quote=True)


def qname(queue: str) -> str:
    """A queue name as one URL path segment (``acme/mail`` -> ``acme%2Fmail``)."""
    return quote(queue, safe="")


def queue_url(queue: str, **query: Any) -> str:
    params = {k: v for k, v in query.items() if v not in (None, "")}
    return f"/queues/{qname(queue)}" + (f"?{urlencode(params)}" if params else "")


def job_url(queue: str, job_id: int) -> str:
    return f"/queues/{qname(queue)}/jobs/{job_id}"


def api_url(queue: str, tail: str = "") -> str:
    """The ``/v1/`` path of a queue (and ``tail``), as the page's scripts call it."""
    return f"/v1/queues/{qname(queue)}{tail}"


def age(ms: int) -> str:
    """A duration for a person: ``850 ms``, ``12.5 s``, ``3 m 20 s``, ``2 h 5 m``."""
    if ms <= 0:
        return "&ndash;"
    if ms < 1000:
        return f"{ms} ms"
    s = ms / 1000
    if s < 60:
        return f"{s:.1f} s"
    m, s = divmod(int(s), 60)
    if m < 60:
        return f"{m} m {s} s"
    h, m = divmod(m, 60)
    return f"{h} h {m} m"


def when(ms: int) -> str:
    """Epoch milliseconds as ISO-8601 UTC, or a dash when unset."""
    return iso_ms(ms) or "&ndash;"


def preview(data: bytes) -> str:
    """A payload or result for a ``<pre>``: text when it is printable UTF-8,
    else its size and first bytes in hex; cut at ``PREVIEW_BYTES``."""
    cut = len(data) > PREVIEW_BYTES
    try:
        # Incremental: a character the cut splits is left out, not an error.
        text = codecs.getincrementaldecoder("utf-8")().decode(data[:PREVIEW_BYTES])
    except UnicodeDecodeError:
        text = None
    shown = text if text is not None and (text.isprintable() or "\n" in text) else None
    body = shown if shown is not None else bytes_preview(data, 64)
    if cut and shown is not None:
        body += f"\n… ({len(data)} bytes in all; first {PREVIEW_BYTES} shown)"
    return esc(body)


def table(headers: Sequence[str], rows: Iterable[Sequence[str]], *, cls: str = "") -> str:
    """A table; ``headers`` are escaped, cells are HTML already."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    if not body:
        body = f'<tr><td colspan="{len(headers)}" class="empty">none</td></tr>'
    return f'<table class="{esc(cls)}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def error_box(error: PQueueError, what: str = "") -> str:
    """A refusal, readable: the status name, the cluster's message, and what to do."""
    code = error_code(error)
    message = error.reason if isinstance(error, InvalidArgumentError) else error.message
    hint = ""
    if code == "UNAUTHENTICATED":
        hint = 'The cluster wants a token: <a href="/login">sign in</a>.'
    elif code == "PERMISSION_DENIED":
        hint = (
            "Your token may not do this (a tenant token sees its own queues only): "
            '<a href="/login">sign in with another token</a>.'
        )
    elif code == "UNAVAILABLE":
        hint = "The cluster is not reachable now; try again in a moment."
    prefix = f"{esc(what)}: " if what else ""
    return (
        f'<div class="error" role="alert"><strong>{prefix}refused: {esc(code)}</strong> '
        f"<span>{esc(message)}</span>" + (f"<p>{hint}</p>" if hint else "") + "</div>"
    )


def frame(title: str, body: str, *, auth: str, live: str = "", nav: str = "") -> str:
    """A whole page: the header with the navigation and the auth line, then ``body``.
    ``live``: the event stream URL the page follows (its ``data-live``)."""
    live_attr = f' data-live="{esc(live)}"' if live else ""
    links = [("/", "Queues"), ("/cluster", "Cluster"), ("/login", "Token")]
    menu = "".join(
        f'<a href="{href}"{" class=here" if href == nav else ""}>{label}</a>'
        for href, label in links
    )
    return (
        "<!doctype html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)} · pqueue</title>"
        '<link rel="stylesheet" href="/static/dash.css">'
        '<script src="/static/dash.js" defer></script>'
        "</head><body>"
        f'<header><a class="brand" href="/">pqueue</a><nav>{menu}</nav>{auth}</header>'
        f'<main{live_attr}><div id="flash" role="status"></div>{body}</main>'
        '<footer>pq web · <a href="/openapi.json">HTTP/JSON API</a>'
        ' · <span id="live-state">live: off</span></footer>'
        "</body></html>\n"
    )
