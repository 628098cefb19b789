"""Who a caller is once authenticated: roles, the principal, peer subjects.

Pure (no IO, no clock, no JWT library): access rules and the pure cores read
principals; verifying a token into one is ``pqueue.node.auth``'s job.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from pqueue.core import limits
from pqueue.errors import InvalidArgumentError

# Re-exported: the node's code reads the role names here.
from pqueue.wire.roles import ADMIN as ADMIN
from pqueue.wire.roles import BALANCER as BALANCER
from pqueue.wire.roles import CONSUMER as CONSUMER
from pqueue.wire.roles import NODE_SUBJECT_PREFIX as NODE_SUBJECT_PREFIX
from pqueue.wire.roles import PEER as PEER
from pqueue.wire.roles import PRODUCER as PRODUCER
from pqueue.wire.roles import ROLES as ROLES
from pqueue.wire.roles import node_subject as node_subject

#: Roles ``admin`` does not imply: they make the holder part of the cluster.
_HOP_ROLES = frozenset((PEER, BALANCER))


@dataclass(frozen=True)
class Principal:
    """An authenticated caller."""

    tenant: str
    roles: frozenset[str]
    subject: str = ""
    #: When the token stops being valid (Unix seconds; 0: never, for ``OPEN``).
    expires_at: float = 0.0
    #: The token's ``jti`` ("" if it has none): what a revocation names.
    token_id: str = ""

    def has(self, role: str) -> bool:
        return role in self.roles or (ADMIN in self.roles and role not in _HOP_ROLES)

    @property
    def node_id(self) -> int | None:
        """The node a peer token speaks for (``sub`` = ``node:<id>``), else None."""
        return node_of_subject(self.subject) if PEER in self.roles else None


def node_of_subject(subject: str) -> int | None:
    """``node:3`` -> 3; anything else -> None."""
    if not subject.startswith(NODE_SUBJECT_PREFIX):
        return None
    digits = subject[len(NODE_SUBJECT_PREFIX) :]
    if not digits.isdigit() or not digits.isascii() or len(digits) > 9:
        return None
    node = int(digits)
    return node if node > 0 else None


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
