"""Whose token a request acts with, and what the dashboard says about auth.

A request's token: its ``Authorization: Bearer`` header; else the dashboard's
sign-in cookie (``pq_token``, set by ``POST /login``), taken for reads
(GET) and for writes that carry the dashboard's own header
(``X-PQ-Dashboard``, which a cross-site form cannot send); else none, and
the ``ClientPool`` fills in the process's ``--token``. The cluster checks
every token: the dashboard only passes it on.

Writes (any method but GET and HEAD) from a page of another site are
refused (``same_origin``): without a token of their own they would act with
``--token``, or with no token at all while auth is off, and a form on any
site the browser visits can post to ``pq web``.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from typing import Any
from urllib.parse import urlsplit

from starlette.requests import Request

from pqueue.client import Client
from pqueue.errors import (
    InvalidArgumentError,
    PermissionDeniedError,
    PQueueError,
    UnauthenticatedError,
)

#: The sign-in cookie holding the bearer token.
COOKIE = "pq_token"
#: The header the dashboard's own scripts send with their writes.
DASHBOARD_HEADER = "x-pq-dashboard"
#: How long an auth probe's answer is kept.
PROBE_TTL_S = 15.0


def bearer(request: Request) -> str:
    """The request's own token ("" for none)."""
    header = request.headers.get("authorization", "")
    if header:
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer":
            raise InvalidArgumentError("Authorization", "only Bearer tokens are taken")
        return value.strip()
    if request.method in ("GET", "HEAD") or request.headers.get(DASHBOARD_HEADER):
        return request.cookies.get(COOKIE, "").strip()
    return ""


def same_origin(request: Request) -> bool:
    """False when a browser says the request comes from a page of another
    origin (its ``Origin`` header, "null" included); True without one (curl,
    the SDKs, a browser's own navigation)."""
    origin = request.headers.get("origin")
    if origin is None:
        return True
    if origin == "null":
        return False
    return urlsplit(origin).netloc == request.headers.get("host", "")


def check_same_origin(request: Request) -> None:
    """Refuse a write that another site's page sent (see ``same_origin``)."""
    if request.method not in ("GET", "HEAD") and not same_origin(request):
        raise PermissionDeniedError(
            f"a write from a page of another site ({request.headers.get('origin')}) is refused"
        )


def token_claims(token: str) -> dict[str, Any]:
    """What a JWT says of itself (tenant, roles), read without checking its
    signature: for display only, the cluster is what checks it. {} if not a JWT."""
    parts = token.split(".")
    if len(parts) != 3:
        return {}
    try:
        raw = base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4))
        claims = json.loads(raw)
    except (binascii.Error, ValueError, UnicodeDecodeError):
        return {}
    return claims if isinstance(claims, dict) else {}


async def probe_auth(client: Client) -> bool | None:
    """Whether the cluster wants a token, asked by ``client`` (which sends
    none): True on, False off, None when it did not say (not reachable)."""
    try:
        await client.node_status()
    except (UnauthenticatedError, PermissionDeniedError):
        return True
    except PQueueError:
        return None
    return False


class AuthProbe:
    """Whether the cluster takes calls without a token (auth off), asked with
    a tokenless call and remembered for ``PROBE_TTL_S``."""

    def __init__(self) -> None:
        self._answer: bool | None = None
        self._at = 0.0

    async def auth_on(self, request: Request) -> bool | None:
        """True: auth on; False: off; None: the cluster did not say."""
        now = time.monotonic()
        if self._answer is not None and now - self._at < PROBE_TTL_S:
            return self._answer
        answer = await probe_auth(await request.app.state.pool.anonymous())
        if answer is not None:
            self._answer, self._at = answer, now
        return answer
