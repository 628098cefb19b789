"""Who may do what to which queue: roles, and tenants' queue names.

With auth on, each tenant has a namespace: a caller of tenant ``acme``
naming queue ``emails`` works on ``acme/emails``, which is what the log
stores; it never sees the prefix. It may also name ``acme/emails`` itself.
Another tenant's queue (``other/emails``) is PERMISSION_DENIED, and lists
and stats leave other tenants' queues out. The one exception is enqueueing
into a queue its owner shares (``QueueConfig.shares``): whether it is shared
is state, so the state machine decides, from the caller the leader stamps
on the command (``caller``). ``admin`` is the operator's
role: it may name any tenant's queues, and sees every queue by its full
name. With auth off every caller is ``auth.OPEN`` and names pass unchanged.

Pure: no IO, no gRPC.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypeVar

from pqueue.core import limits
from pqueue.errors import PermissionDeniedError
from pqueue.node.principal import ADMIN, OPEN, Principal
from pqueue.v1 import log_pb2 as logpb
from pqueue.v1 import queue_pb2 as pb
from pqueue.wire.keys import AUTHORIZATION_KEY as AUTHORIZATION_KEY
from pqueue.wire.keys import bearer as bearer
from pqueue.wire.keys import credentials as credentials

Named = TypeVar("Named", pb.QueueStats, pb.QueueInfo)


def require(principal: Principal, *roles: str) -> None:
    """PERMISSION_DENIED unless the caller holds one of ``roles`` (admin holds all)."""
    if not any(principal.has(role) for role in roles):
        raise PermissionDeniedError(
            f"this call needs the role {' or '.join(roles)}; "
            f"the token grants {', '.join(sorted(principal.roles)) or 'none'}"
        )


def scoped(principal: Principal, queue: str, shared: bool = False) -> str:
    """The stored name of the queue a caller names, if it may touch it.

    With ``shared`` (enqueues), another tenant's queue passes here: the
    state machine refuses it unless the queue is shared with the caller.
    """
    limits.check_queue_name(queue)
    if principal is OPEN:
        return queue
    tenant, slash, _ = queue.partition("/")
    if not slash:
        return f"{principal.tenant}/{queue}"
    if tenant == principal.tenant or ADMIN in principal.roles or shared:
        return queue
    raise PermissionDeniedError(f"queue {queue!r} belongs to another tenant")


def caller(principal: Principal) -> logpb.Caller | None:
    """Who enqueues, to stamp on the command (None with auth off)."""
    if principal is OPEN:
        return None
    return logpb.Caller(tenant=principal.tenant, admin=ADMIN in principal.roles)


def shown(principal: Principal, stored: str) -> str | None:
    """The name a caller sees for a stored queue name; None if not its to see."""
    if principal is OPEN or ADMIN in principal.roles:
        return stored
    tenant, slash, name = stored.partition("/")
    return name if slash and tenant == principal.tenant else None


def show(principal: Principal, items: Iterable[Named]) -> list[Named]:
    """The caller's own queues' entries (stats, infos), under the names it knows."""
    out = []
    for item in items:
        name = shown(principal, item.queue)
        if name is not None:
            item.queue = name
            out.append(item)
    return out
