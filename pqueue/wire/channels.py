"""The one place gRPC channel and server options are spelled out.

Every channel (SDK client, forwarding follower, peer link, balancer backend)
and both servers (node, balancer) take their options from here, so a limit is
changed once.
"""

from __future__ import annotations

from pqueue.wire.sizes import (
    KEEPALIVE_TIME_MS,
    KEEPALIVE_TIMEOUT_MS,
    MAX_MESSAGE_BYTES,
    SERVER_KEEPALIVE_OPTIONS,
)

Option = tuple[str, int]

#: A connection that has not finished its handshake in 10 s is closed
#: (half-open connections held fds forever), and an idle one after 30 min.
SERVER_CONNECTION_OPTIONS: tuple[Option, ...] = (
    ("grpc.server_handshake_timeout_ms", 10_000),
    ("grpc.max_connection_idle_ms", 30 * 60 * 1000),
)
#: Calls one client connection may hold at once on a balancer (more wait in
#: the client). A node allows more: a balancer or a forwarding follower
#: multiplexes many clients' calls, long polls included, on one connection.
MAX_CONCURRENT_STREAMS = 1024
MAX_CONCURRENT_STREAMS_NODE = 16_384


def streams_option(limit: int) -> Option:
    """The server option bounding concurrent calls per connection."""
    return ("grpc.max_concurrent_streams", limit)


def channel_options(
    message_bytes: int = MAX_MESSAGE_BYTES,
    *,
    keepalive: bool = False,
    watched: bool = False,
    max_reconnect_backoff_ms: int | None = None,
) -> list[Option]:
    """A channel's options: ``message_bytes`` both ways; with ``keepalive``
    a ping every ``KEEPALIVE_TIME_MS``; a ``watched`` channel (the balancer's
    to a backend) also bounds the ping's answer, pings while idle, and
    reconnects fast (100 ms, growing to ``max_reconnect_backoff_ms``)."""
    options: list[Option] = [
        ("grpc.max_receive_message_length", message_bytes),
        ("grpc.max_send_message_length", message_bytes),
    ]
    if max_reconnect_backoff_ms is not None:
        options += [
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", max_reconnect_backoff_ms),
        ]
    if keepalive or watched:
        options.append(("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS))
    if watched:
        options += [
            ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
            ("grpc.keepalive_permit_without_calls", 1),
        ]
    return options


def server_options(receive_bytes: int, max_streams: int) -> list[Option]:
    """A server's options: requests up to ``receive_bytes`` (each method has
    its own smaller cap, checked by admission before parsing), responses up to
    ``MAX_MESSAGE_BYTES``, keepalive pings welcome, connections bounded."""
    return [
        ("grpc.so_reuseport", 0),
        ("grpc.max_receive_message_length", receive_bytes),
        *SERVER_KEEPALIVE_OPTIONS,
        *SERVER_CONNECTION_OPTIONS,
        streams_option(max_streams),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ]
