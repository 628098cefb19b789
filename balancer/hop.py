"""What one hop carries on and reads back: metadata, and why a call failed.

Shared by the unary proxy (``balancer.proxy``), the coalescer
(``balancer.coalesce``) and the stream proxy (``balancer.streams``).
"""

from __future__ import annotations

from typing import Any

import grpc

from balancer.backends import BALANCER_ID
from pqueue.errors import UnavailableError
from pqueue.wire.keys import (
    FORWARDED_FOR_KEY,
    FORWARDED_KEY,
    FORWARDER_TOKEN_KEY,
    REQUEST_ID_KEY,
)
from pqueue.wire.status import NOT_LEADER, NOT_TAKEN, error_info, status_proto
from pqueue.wire.tokens import TokenSource, current_token

Metadata = tuple[tuple[str, str | bytes], ...]

#: Metadata that belongs to one hop, not to the call.
_HOP_KEYS = frozenset(
    (
        "user-agent",
        "te",
        "content-type",
        "host",
        FORWARDED_KEY,
        REQUEST_ID_KEY,
        FORWARDED_FOR_KEY,
        FORWARDER_TOKEN_KEY,
    )
)
_DETAILS_KEY = "grpc-status-details-bin"
#: Of gRPC's own keys, those that carry the call's meaning and must pass.
_GRPC_KEYS_KEPT = frozenset((_DETAILS_KEY, "grpc-retry-pushback-ms"))
#: What every call onwards is marked with: the node answers, never forwards.
FORWARDED: Metadata = ((FORWARDED_KEY, BALANCER_ID),)


def passthrough(metadata: Any) -> Metadata:
    """Metadata worth carrying to the next hop (reserved and hop keys left out)."""
    if not metadata:
        return ()
    kept: list[tuple[str, str | bytes]] = []
    for key, value in metadata:
        if key in _HOP_KEYS or key[0] == ":":
            continue
        if key.startswith("grpc-") and key not in _GRPC_KEYS_KEPT:
            continue
        kept.append((key, value))
    return tuple(kept)


def relayed(code: grpc.StatusCode, message: str, trailers: Metadata, address: str) -> Metadata:
    """A node's failure trailers as the balancer passes them on. A bare
    UNAVAILABLE (the node did not answer, or died mid-call: no pqueue server
    said it) gets an ErrorInfo ``NODE_UNREACHABLE`` naming the node, so that
    every UNAVAILABLE a balancer returns says why (it may or may not have run)."""
    if code != grpc.StatusCode.UNAVAILABLE or any(key == _DETAILS_KEY for key, _ in trailers):
        return trailers
    error = UnavailableError(message, reason="NODE_UNREACHABLE", metadata={"node_address": address})
    return (*trailers, (_DETAILS_KEY, status_proto(error).SerializeToString()))


def relayed_failure(exc: grpc.aio.AioRpcError, address: str) -> Metadata:
    """``relayed`` for a failed call to the node at ``address``."""
    return relayed(exc.code(), exc.details() or "", passthrough(exc.trailing_metadata()), address)


def own_metadata(balancer_token: TokenSource | None, rid: str, ip: str) -> Metadata:
    """This hop's own keys: ``pq-forwarded-by``, the request id and caller's IP
    (as the observer took them), and the balancer's token, which proves to the
    node that it is a hop, so the node believes the IP (a client's claim it
    strips)."""
    hop_token = current_token(balancer_token)
    out: list[tuple[str, str | bytes]] = [*FORWARDED]
    if rid:
        out.append((REQUEST_ID_KEY, rid))
    if ip:
        out.append((FORWARDED_FOR_KEY, ip))
    if hop_token:
        out.append((FORWARDER_TOKEN_KEY, hop_token))
    return tuple(out)


def why_failed(exc: grpc.aio.AioRpcError) -> str | None:
    """Why a call failed, if the balancer may act on it: ``not_leader``
    (ran nowhere), ``not_taken`` (ran nowhere), ``unreachable`` (a plain
    UNAVAILABLE, or a CANCELLED the balancer did not ask for: may or may not
    have run)."""
    code = exc.code()
    if code == grpc.StatusCode.FAILED_PRECONDITION and error_info(exc, NOT_LEADER) is not None:
        return "not_leader"
    if code == grpc.StatusCode.UNAVAILABLE:
        return "not_taken" if error_info(exc, NOT_TAKEN) is not None else "unreachable"
    if code == grpc.StatusCode.CANCELLED:
        # The node's end cancelled it: a gRPC server that stops cancels the
        # calls it had not begun, and at the end of its grace those it had.
        # (Had the balancer's caller left, this handler would be cancelled
        # too; had the balancer given the call up, it would not read this.)
        return "unreachable"
    return None


def node_cancelled(exc: grpc.aio.AioRpcError) -> tuple[grpc.StatusCode, str]:
    """The status a client gets for a node's failure: as it was, but for a
    CANCELLED the node's end chose (``why_failed``), which to the client
    would mean it cancelled itself: UNAVAILABLE, outcome unknown."""
    code, details = exc.code(), exc.details() or ""
    if code == grpc.StatusCode.CANCELLED:
        return grpc.StatusCode.UNAVAILABLE, (
            f"the node cancelled the call ({details or 'CANCELLED'}: it may be stopping); "
            "it may or may not have been applied"
        )
    return code, details
