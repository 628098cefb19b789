"""Who is calling: bearer tokens (JWT) carrying a tenant and roles.

A token is a JWT signed with HS256 (a shared secret) or RS256 / ES256 (the
node holds only the public key). Its claims:

- ``tenant``: the tenant whose queues the caller works on (a queue name);
- ``roles``: any of ``producer``, ``consumer``, ``admin``;
- ``sub`` (who, for logs), ``iat``, ``exp`` (required), and ``iss`` /
  ``aud`` when the verifier is configured to check them.

``Verifier`` checks tokens (a small cache keeps the cost of a signature
check off the hot path); ``issue`` makes them, for ``pq token issue`` and
for tests. Nothing here knows about gRPC: ``pqueue.access`` applies it.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from pqueue import limits
from pqueue.errors import InvalidArgumentError, UnauthenticatedError

PRODUCER = "producer"
CONSUMER = "consumer"
ADMIN = "admin"
#: A node of the cluster: may speak the peer (consensus) protocol. No other
#: role implies it, not even admin: a peer's messages decide what is committed.
PEER = "peer"
ROLES = frozenset((PRODUCER, CONSUMER, ADMIN, PEER))

#: Verified tokens kept (each until it expires).
_CACHE_SIZE = 4096
#: Clock skew tolerated on ``exp``, ``iat`` and ``nbf``.
LEEWAY_S = 30


@dataclass(frozen=True)
class Principal:
    """An authenticated caller."""

    tenant: str
    roles: frozenset[str]
    subject: str = ""
    #: When the token stops being valid (Unix seconds; 0: never, for ``OPEN``).
    expires_at: float = 0.0

    def has(self, role: str) -> bool:
        return role in self.roles or (ADMIN in self.roles and role != PEER)


#: The caller when auth is off: every role, no tenant (queue names unscoped).
OPEN = Principal(tenant="", roles=ROLES, subject="anonymous")
#: Nobody: what a call runs as until it is authenticated.
NOBODY = Principal(tenant="", roles=frozenset(), subject="unauthenticated")


def check_claims(tenant: str, roles: Iterable[str]) -> frozenset[str]:
    """Validate a tenant name and roles (for issuing and for verifying)."""
    limits.check_tenant(tenant)
    wanted = frozenset(roles)
    unknown = wanted - ROLES
    if unknown or not wanted:
        raise InvalidArgumentError(
            "roles", f"each of {', '.join(sorted(ROLES))}, at least one; got {sorted(wanted)}"
        )
    return wanted


@dataclass
class Verifier:
    """Checks bearer tokens against one key."""

    #: The HS256 secret, or a PEM public key (RSA: RS256; EC P-256: ES256).
    key: bytes
    audience: str | None = None
    issuer: str | None = None
    clock_s: Any = time.time
    _algorithms: list[str] = field(init=False)
    _key: Any = field(init=False)
    _cache: OrderedDict[str, Principal] = field(init=False, default_factory=OrderedDict)

    def __post_init__(self) -> None:
        self._algorithms, self._key = _verification_key(self.key)
        if self._algorithms == ["HS256"]:
            try:  # PyJWT refuses secrets that look like public keys (SSH, JWK): say so now
                jwt.decode(jwt.encode({"x": 1}, self._key, "HS256"), self._key, ["HS256"])
            except jwt.PyJWTError as exc:
                raise ValueError(f"the key cannot verify HS256 tokens: {exc}") from exc

    @classmethod
    def from_file(
        cls, path: Path, audience: str | None = None, issuer: str | None = None
    ) -> Verifier:
        return cls(read_key(path), audience, issuer)

    @property
    def algorithm(self) -> str:
        return self._algorithms[0]

    def verify(self, token: str) -> Principal:
        """The token's principal; ``UnauthenticatedError`` if it is not valid now."""
        now = self.clock_s()
        cached = self._cache.get(token)
        if cached is not None:
            if cached.expires_at > now - LEEWAY_S:
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
                leeway=LEEWAY_S,
                options={"require": ["exp", "tenant", "roles"], "verify_aud": bool(self.audience)},
            )
        except jwt.ExpiredSignatureError as exc:
            raise UnauthenticatedError("the token has expired") from exc
        except jwt.PyJWTError as exc:  # invalid tokens, and keys PyJWT will not use
            raise UnauthenticatedError(f"the token is not valid: {exc}") from exc
        tenant, roles = claims.get("tenant"), claims.get("roles")
        if not isinstance(tenant, str) or not isinstance(roles, list):
            raise UnauthenticatedError("the token's tenant must be a string and roles a list")
        try:
            granted = check_claims(tenant, (str(r) for r in roles))
        except InvalidArgumentError as exc:
            raise UnauthenticatedError(f"the token's claims are not valid: {exc}") from exc
        principal = Principal(tenant, granted, str(claims.get("sub", "")), float(claims["exp"]))
        self._cache[token] = principal
        if len(self._cache) > _CACHE_SIZE:
            self._cache.popitem(last=False)
        return principal


def read_key(path: Path) -> bytes:
    """A key file's bytes, exactly: the node and ``pq token issue`` read it alike."""
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read the key {path}: {exc}") from exc


def _verification_key(key: bytes) -> tuple[list[str], Any]:
    if b"-----BEGIN" not in key:
        if len(key) < 32:
            raise ValueError("an HS256 secret must be at least 32 bytes")
        return ["HS256"], key
    try:
        public = serialization.load_pem_public_key(key)
    except ValueError as exc:
        raise ValueError(f"not a PEM public key: {exc}") from exc
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
) -> str:
    """A signed token. ``key``: the HS256 secret, or a PEM private key (RSA or EC P-256)."""
    granted = check_claims(tenant, roles)
    if ttl_s <= 0:
        raise InvalidArgumentError("ttl", "must be positive")
    now = int(now_s if now_s is not None else time.time())
    claims: dict[str, Any] = {
        "tenant": tenant,
        "roles": sorted(granted),
        "iat": now,
        "exp": now + int(ttl_s),
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
