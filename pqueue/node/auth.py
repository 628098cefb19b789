"""Who is calling: bearer tokens (JWT) carrying a tenant and roles.

A token is a JWT signed with HS256 (a shared secret) or RS256 / ES256 (the
node holds only the public key). Its claims:

- ``tenant``: the tenant whose queues the caller works on (a queue name);
- ``roles``: any of ``producer``, ``consumer``, ``admin``;
- ``sub`` (who, for logs; a peer token's is ``node:<id>``, the node it
  speaks for), ``iat``, ``exp`` (required), ``jti`` (its id, to revoke it),
  and ``iss`` / ``aud`` when the verifier is configured to check them.

Time checks allow ``leeway_s`` of clock skew (5 s by default); a verifier
may also refuse tokens that live longer than ``max_lifetime_s``, and tokens
whose ``jti`` its revocation file lists (re-read when it changes).

``Verifier`` checks tokens (a small cache keeps the cost of a signature
check off the hot path); ``issue`` makes them, for ``pq token issue`` and
for tests. Nothing here knows about gRPC: ``pqueue.node.access`` applies it.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from pqueue.errors import InvalidArgumentError, UnauthenticatedError
from pqueue.node.principal import ADMIN as ADMIN
from pqueue.node.principal import BALANCER as BALANCER
from pqueue.node.principal import CONSUMER as CONSUMER
from pqueue.node.principal import NOBODY as NOBODY
from pqueue.node.principal import NODE_SUBJECT_PREFIX as NODE_SUBJECT_PREFIX
from pqueue.node.principal import OPEN as OPEN
from pqueue.node.principal import PEER as PEER
from pqueue.node.principal import PRODUCER as PRODUCER
from pqueue.node.principal import ROLES as ROLES
from pqueue.node.principal import Principal as Principal
from pqueue.node.principal import check_claims as check_claims
from pqueue.node.principal import node_of_subject as node_of_subject
from pqueue.node.principal import node_subject as node_subject
from pqueue.wire.logs import describe, escape
from pqueue.wire.observe import HopCheck
from pqueue.wire.roles import DEFAULT_LEEWAY_S as DEFAULT_LEEWAY_S
from pqueue.wire.tokens import read_key

logger = logging.getLogger(__name__)

#: Verified tokens kept (each until it expires).
_CACHE_SIZE = 4096
#: Longest part of a refusal quoting what the caller sent.
_MAX_QUOTED_CHARS = 200
#: How often a revocation file's change time is looked at, at most.
_REVOCATION_CHECK_S = 1.0


class RevokedTokens:
    """The ``jti`` values listed in a file (one a line, ``#`` comments), re-read
    when the file changes: ``--revoked-tokens-file``. A missing file revokes none."""

    def __init__(self, path: Path, clock_s: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self.clock_s = clock_s
        self._ids: frozenset[str] = frozenset()
        self._stamp: tuple[int, int, int] | None = None
        self._checked_at = float("-inf")
        self._load()

    def _load(self) -> None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._ids, self._stamp = frozenset(), None
            return
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp == self._stamp:
            return
        text = self.path.read_text(encoding="utf-8", errors="replace")
        lines = (line.split("#", 1)[0].strip() for line in text.splitlines())
        self._ids = frozenset(line for line in lines if line)
        self._stamp = stamp
        logger.info("revoked tokens: %d listed in %s", len(self._ids), self.path)

    def ids(self) -> frozenset[str]:
        """The revoked ids now (the file is looked at no more than once a second)."""
        now = self.clock_s()
        if now - self._checked_at >= _REVOCATION_CHECK_S:
            self._checked_at = now
            try:
                self._load()
            except OSError as exc:  # keep the last list rather than revoke nothing
                logger.warning("cannot read the revoked tokens %s: %s", self.path, describe(exc))
        return self._ids

    def __contains__(self, token_id: object) -> bool:
        return isinstance(token_id, str) and bool(token_id) and token_id in self.ids()


@dataclass
class Verifier:
    """Checks bearer tokens against one key."""

    #: The HS256 secret, or a PEM public key (RSA: RS256; EC P-256: ES256).
    key: bytes
    audience: str | None = None
    issuer: str | None = None
    clock_s: Any = time.time
    #: Clock skew tolerated on ``exp``, ``nbf`` and ``iat`` (``--auth-leeway-s``).
    leeway_s: float = DEFAULT_LEEWAY_S
    #: Refuse tokens meant to live longer (``exp - iat``); None: any lifetime.
    max_lifetime_s: float | None = None
    #: Tokens refused whatever else holds (``--revoked-tokens-file``).
    revoked: RevokedTokens | None = None
    _algorithms: list[str] = field(init=False)
    _key: Any = field(init=False)
    _cache: OrderedDict[str, Principal] = field(init=False, default_factory=OrderedDict)

    def __post_init__(self) -> None:
        if self.leeway_s < 0:
            raise ValueError("the leeway must not be negative")
        if self.max_lifetime_s is not None and self.max_lifetime_s <= 0:
            raise ValueError("the maximum token lifetime must be positive")
        self._algorithms, self._key = _verification_key(self.key)
        if self._algorithms == ["HS256"]:
            try:  # PyJWT refuses secrets that look like public keys (SSH, JWK): say so now
                jwt.decode(jwt.encode({"x": 1}, self._key, "HS256"), self._key, ["HS256"])
            except jwt.PyJWTError as exc:
                raise ValueError(f"the key cannot verify HS256 tokens: {describe(exc)}") from exc

    @classmethod
    def from_file(
        cls, path: Path, audience: str | None = None, issuer: str | None = None, **options: Any
    ) -> Verifier:
        """A verifier with the key in ``path``; ``options``: leeway, lifetime, revocations."""
        return cls(read_key(path), audience, issuer, **options)

    @property
    def algorithm(self) -> str:
        return self._algorithms[0]

    def verify(self, token: str) -> Principal:
        """The token's principal; ``UnauthenticatedError`` if it is not valid now."""
        now = self.clock_s()
        cached = self._cache.get(token)
        if cached is not None:
            if cached.expires_at > now - self.leeway_s:
                self._refuse_revoked(cached)
                self._cache.move_to_end(token)
                return cached
            del self._cache[token]
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=self._algorithms,
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway_s,
                options={"require": ["exp", "tenant", "roles"], "verify_aud": bool(self.audience)},
            )
        except jwt.ExpiredSignatureError as exc:
            raise UnauthenticatedError("the token has expired") from exc
        except jwt.PyJWTError as exc:  # invalid tokens, and keys PyJWT will not use
            # PyJWT may quote the (unauthenticated) header: keep it short and one line.
            raise UnauthenticatedError(f"the token is not valid: {_quoted(exc)}") from exc
        tenant, roles = claims.get("tenant"), claims.get("roles")
        if not isinstance(tenant, str) or not isinstance(roles, list):
            raise UnauthenticatedError("the token's tenant must be a string and roles a list")
        try:
            granted = check_claims(tenant, (str(r) for r in roles))
        except InvalidArgumentError as exc:
            raise UnauthenticatedError(
                f"the token's claims are not valid: {describe(exc)}"
            ) from exc
        self._check_lifetime(claims, now)
        jti = claims.get("jti", "")
        principal = Principal(
            tenant,
            granted,
            str(claims.get("sub", "")),
            float(claims["exp"]),
            jti if isinstance(jti, str) else "",
        )
        self._refuse_revoked(principal)
        self._cache[token] = principal
        if len(self._cache) > _CACHE_SIZE:
            self._cache.popitem(last=False)
        return principal

    def _check_lifetime(self, claims: dict[str, Any], now: float) -> None:
        if self.max_lifetime_s is None:
            return
        exp, iat = claims["exp"], claims.get("iat")
        # A token without ``iat`` is judged by what it has left.
        start = iat if isinstance(iat, (int, float)) and not isinstance(iat, bool) else now
        lifetime = float(exp) - float(start)
        if lifetime > self.max_lifetime_s + self.leeway_s:
            raise UnauthenticatedError(
                f"the token lives {lifetime:.0f} s, longer than this cluster accepts "
                f"({self.max_lifetime_s:.0f} s, --auth-max-token-lifetime-s): issue a shorter one"
            )

    def _refuse_revoked(self, principal: Principal) -> None:
        if self.revoked is not None and principal.token_id in self.revoked:
            raise UnauthenticatedError("the token has been revoked")

    def still_valid(self, principal: Principal) -> None:
        """``UnauthenticatedError`` once a principal's token has expired (beyond
        the leeway) or been revoked: for streams, which outlive their first check."""
        if principal.expires_at and principal.expires_at <= self.clock_s() - self.leeway_s:
            raise UnauthenticatedError("the token has expired")
        self._refuse_revoked(principal)


def _quoted(exc: Exception) -> str:
    """An error's text, as a caller's own words may appear in it: escaped, bounded."""
    text = escape(str(exc))
    return text if len(text) <= _MAX_QUOTED_CHARS else text[:_MAX_QUOTED_CHARS] + "..."


def _verification_key(key: bytes) -> tuple[list[str], Any]:
    if b"-----BEGIN" not in key:
        if len(key) < 32:
            raise ValueError("an HS256 secret must be at least 32 bytes")
        return ["HS256"], key
    try:
        public = serialization.load_pem_public_key(key)
    except ValueError as exc:
        raise ValueError(f"not a PEM public key: {describe(exc)}") from exc
    if isinstance(public, rsa.RSAPublicKey):
        return ["RS256"], public
    if isinstance(public, ec.EllipticCurvePublicKey) and isinstance(public.curve, ec.SECP256R1):
        return ["ES256"], public
    raise ValueError("the public key must be RSA (RS256) or EC P-256 (ES256)")


def issue(
    key: bytes,
    tenant: str,
    roles: Iterable[str],
    ttl_s: float,
    subject: str = "",
    audience: str | None = None,
    issuer: str | None = None,
    now_s: float | None = None,
    token_id: str | None = None,
) -> str:
    """A signed token. ``key``: the HS256 secret, or a PEM private key (RSA or EC P-256).

    It carries a ``jti`` (``token_id``, else a random one) so that it can be revoked."""
    granted = check_claims(tenant, roles)
    if ttl_s <= 0:
        raise InvalidArgumentError("ttl", "must be positive")
    now = int(now_s if now_s is not None else time.time())
    claims: dict[str, Any] = {
        "tenant": tenant,
        "roles": sorted(granted),
        "iat": now,
        "exp": now + int(ttl_s),
        "jti": token_id or uuid.uuid4().hex,
    }
    if subject:
        claims["sub"] = subject
    if audience:
        claims["aud"] = audience
    if issuer:
        claims["iss"] = issuer
    if b"-----BEGIN" not in key:
        if len(key) < 32:
            raise ValueError("an HS256 secret must be at least 32 bytes")
        return jwt.encode(claims, key, algorithm="HS256")
    private = serialization.load_pem_private_key(key, password=None)
    if isinstance(private, rsa.RSAPrivateKey):
        return jwt.encode(claims, private, algorithm="RS256")
    if isinstance(private, ec.EllipticCurvePrivateKey) and isinstance(private.curve, ec.SECP256R1):
        return jwt.encode(claims, private, algorithm="ES256")
    raise ValueError("the private key must be RSA (RS256) or EC P-256 (ES256)")


def trusted_hops(verifier: Verifier | None) -> HopCheck | None:
    """A node's ``HopCheck``: with auth off (no verifier) None (forwarded addresses
    are informational, logged as claimed); else a check that the token verifies
    and has the ``balancer`` or ``peer`` role."""
    if verifier is None:
        return None

    def check(token: str) -> bool:
        if not token:
            return False
        scheme, _, rest = token.partition(" ")
        if scheme.lower() == "bearer" and rest.strip():
            token = rest.strip()
        try:
            principal = verifier.verify(token)
        except (UnauthenticatedError, ValueError):  # never let a bad header fail the call
            return False
        return PEER in principal.roles or BALANCER in principal.roles

    return check
