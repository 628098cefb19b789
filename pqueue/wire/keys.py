"""Metadata keys every program speaks, and reading the bearer token.

The SDK sets ``authorization``; a hop (the balancer, a forwarding follower)
marks its calls with ``pq-forwarded-by``, proves itself with
``pq-forwarder-token`` and passes the request id and the first caller's
address on. A balancer names the leader to its clients with ``pq-leader``,
and the leader's cluster with ``pq-cluster``; a look-aside call carries
``pq-direct`` and that ``pq-cluster``, which a node of another cluster refuses.
"""

from __future__ import annotations

from collections.abc import Iterable

from pqueue.errors import UnauthenticatedError

#: The caller's ``Bearer <JWT>``.
AUTHORIZATION_KEY = "authorization"
#: Metadata carrying the request id, end to end.
REQUEST_ID_KEY = "x-request-id"
#: Metadata naming the first caller's IP, set by a hop (balancer, forwarding follower).
FORWARDED_FOR_KEY = "x-forwarded-for"
#: Metadata a hop (the balancer, a forwarding follower) marks its calls with;
#: a forwarded call is never forwarded twice.
FORWARDED_KEY = "pq-forwarded-by"
#: Metadata a hop proves itself with: its own token (role ``balancer`` or ``peer``).
FORWARDER_TOKEN_KEY = "pq-forwarder-token"
#: Metadata a balancer adds to what it forwards to the leader (the trailers of
#: a unary call, the initial metadata of a ``Consume`` stream): the leader's
#: own address, as its peers know it, so a client may call it directly
#: (look-aside; ``pqueue.client.Client(look_aside=...)``).
LEADER_KEY = "pq-leader"
#: Metadata of a call or stream a client sent straight to the node it takes
#: for the leader (look-aside): a follower answers NOT_LEADER (nothing ran,
#: the leader named) instead of forwarding it, so the client moves on.
DIRECT_KEY = "pq-direct"
#: The metadata that marks a look-aside call.
DIRECT = ((DIRECT_KEY, "1"),)
#: Beside ``pq-leader``: the cluster id of the leader a balancer names. A
#: look-aside call carries it back, and a node whose own cluster id differs
#: refuses the call unrun (NOT_TAKEN, cause ``WRONG_CLUSTER``): an address
#: that means another cluster's node from where the client runs (NAT, split
#: DNS, a reused port) never takes its writes.
CLUSTER_KEY = "pq-cluster"
#: The NOT_TAKEN cause of a call refused for naming another cluster.
WRONG_CLUSTER = "WRONG_CLUSTER"
#: Initial metadata a leader sends a ``SubmitStream`` as soon as it takes it
#: (a balancer passes it on once the leader sent it). The SDK writes nothing
#: before: a node that refuses the stream (a follower, a draining node) ends
#: it at once, and a client write racing that end turns its status, which
#: says nothing ran, into INTERNAL in grpc.aio (grpc/grpc#36066).
STREAM_OPEN_KEY = "pq-stream-open"
#: The metadata that says so.
STREAM_OPEN = ((STREAM_OPEN_KEY, "1"),)


def value_of(metadata: Iterable[tuple[str, str | bytes]] | None, key: str) -> str:
    """The text value of ``key`` in call metadata, or ""."""
    for k, value in metadata or ():
        if k == key and isinstance(value, str):
            return value
    return ""


def marked(metadata: Iterable[tuple[str, str | bytes]] | None, key: str) -> bool:
    """Whether a call's metadata carries ``key`` (``FORWARDED_KEY``: a hop
    sent it; ``DIRECT_KEY``: a look-aside client did)."""
    return any(k == key for k, _ in metadata or ())


#: A forwarded call's deadline when its caller set none (a long poll waits 60 s).
DEFAULT_FORWARD_TIMEOUT_S = 75.0


def bearer(metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
    """The bearer token in call metadata; ``UnauthenticatedError`` without one."""
    for key, value in metadata or ():
        if key == AUTHORIZATION_KEY and isinstance(value, str):
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            raise UnauthenticatedError("authorization metadata must be 'Bearer <token>'")
    raise UnauthenticatedError(
        "this cluster requires a bearer token (metadata 'authorization: Bearer <JWT>')"
    )


def credentials(metadata: Iterable[tuple[str, str | bytes]]) -> tuple[tuple[str, str], ...]:
    """The caller's credentials, to pass on a hop (the next server checks them again)."""
    return tuple((k, v) for k, v in metadata if k == AUTHORIZATION_KEY and isinstance(v, str))


def authorization(token: str) -> tuple[tuple[str, str], ...]:
    """The metadata carrying ``token`` (none for an empty token)."""
    return ((AUTHORIZATION_KEY, f"Bearer {token}"),) if token else ()
