"""The TCP peer transport: consensus messages on a plain TCP (or TLS) socket.

A node given peer ports (``pq node --peer-ports``) listens on its own and
sends to each peer that has one over a connection of its own instead of a
gRPC stream. Python gRPC's stream write is the cost this avoids: in
``python -m bench.hops`` a round trip over a uvloop socket (an asyncio
``Protocol``, the shape, not this module's streams) takes about a quarter of
the time and two thirds less CPU than over gRPC's peer streams, and a log
entry makes one per follower. End to end the gain is smaller
(``docs/benchmarks.md``, the TCP peer transport).

The wire is as small as it can be. Every frame is a 4-byte big-endian
length and that many bytes. The dialing node sends one ``PeerHello`` (its
id, its peer token, its features: what a gRPC stream's headers carry); the
listening node checks it as it checks a stream's headers and answers one
``PeerWelcome``, empty or saying why not (then it closes). From then on
the dialing node sends ``PeerBatch`` frames, the same bytes a gRPC stream
carries, and the listening node only reads: one-way, like the streams.

Everything is bounded. A connection must end its TLS handshake, then send
its hello (at most ``HELLO_MAX_BYTES``), each within ``HELLO_TIMEOUT_S``; at
most ``MAX_UNWELCOMED`` may be waiting for a welcome at once (more are
closed at once) and ``MAX_WELCOMED`` be welcomed, so strangers can hold
neither much memory nor many sockets; after the welcome a frame may be at
most the peer message limit (a larger one ends the connection). The
dialing side learns of a peer that stopped acknowledging from the kernel
(``TCP_USER_TIMEOUT``), the listening side, which only reads, from TCP
keepalive probes: the same bounds as gRPC's keepalive.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable, Iterable
from typing import Protocol

import grpc

from pqueue.core import features
from pqueue.errors import UnauthenticatedError
from pqueue.node.auth import Principal
from pqueue.v1 import peer_pb2 as ppb
from pqueue.wire.logs import describe
from pqueue.wire.sizes import KEEPALIVE_TIME_MS, MAX_PEER_MESSAGE_BYTES
from pqueue.wire.tls import Tls

logger = logging.getLogger(__name__)

#: A hello carries a token and a feature list: nothing near this.
HELLO_MAX_BYTES = 64 << 10
#: A connection that has not said hello (TLS included) by then is closed.
HELLO_TIMEOUT_S = 10.0
#: Connections that may wait for their hello (or their welcome) at once; one
#: more is closed at once, so strangers cannot pile up sockets and tasks.
MAX_UNWELCOMED = 256
#: Welcomed connections at once (a node has two from each peer): each may
#: buffer a frame of up to the peer message limit.
MAX_WELCOMED = 64
#: A dial (connection, TLS and the hello's answer) that takes longer fails:
#: the link falls back to the peer's gRPC stream and tries TCP again later.
DIAL_TIMEOUT_S = 5.0
#: How long closing a connection may wait for TLS's goodbye before dropping it.
CLOSE_WAIT_S = 1.0
#: The largest frame after the hello: one batch (a message alone may be this big).
MAX_FRAME_BYTES = MAX_PEER_MESSAGE_BYTES
#: Past this many unsent bytes, a sender waits for the socket to drain.
DRAIN_ABOVE_BYTES = 1 << 20
#: Sent data left unacknowledged this long (a peer frozen or cut off) breaks
#: the connection, as gRPC's keepalive does its streams.
USER_TIMEOUT_MS = 20_000
#: TCP keepalive, for the side that only reads: probes after this much
#: silence, every ``KEEPALIVE_INTERVAL_S``, ``KEEPALIVE_PROBES`` unanswered
#: end the connection (gRPC's keepalive: a ping after 10 s, 5 s to answer).
KEEPALIVE_IDLE_S = KEEPALIVE_TIME_MS // 1000
KEEPALIVE_INTERVAL_S = 5
KEEPALIVE_PROBES = 3

_LENGTH = 4

#: A peer connection, its hello welcomed.
Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class FrameError(Exception):
    """A frame the protocol does not allow (too large, or cut short)."""


class PeerRefused(Exception):
    """A peer stream or connection not taken (or ended): its status and why."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


class CutShort(FrameError):
    """The connection ended inside a frame (the peer went away or was stopped)."""


class HelloRefused(Exception):
    """The listening node refused this node's hello (the reason is its own words)."""


class Receiver(Protocol):
    """What the listener hands connections' contents to (``PeerService``)."""

    def admit(
        self, token: Callable[[], str], peer: str, claims: int | None = None
    ) -> Principal | None: ...

    def still_valid(self, caller: Principal | None) -> None: ...

    def take(
        self,
        messages: Iterable[ppb.PeerMessage],
        sender: int | None,
        announced: frozenset[str] | None,
    ) -> frozenset[str] | None: ...


def header(size: int) -> bytes:
    """The length prefix of a ``size``-byte frame."""
    return size.to_bytes(_LENGTH, "big")


async def read_frame(reader: asyncio.StreamReader, limit: int) -> bytes | None:
    """The next frame's bytes; None at a clean end of stream (between frames)."""
    try:
        head = await reader.readexactly(_LENGTH)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise CutShort("the connection ended inside a frame's length") from exc
    size = int.from_bytes(head, "big")
    if size > limit:
        raise FrameError(f"a {size}-byte frame (at most {limit} here)")
    try:
        return await reader.readexactly(size)
    except asyncio.IncompleteReadError as exc:
        raise CutShort("the connection ended inside a frame") from exc


def tune(writer: asyncio.StreamWriter) -> None:
    """No Nagle delay; the kernel ends a connection whose peer stopped
    acknowledging what was sent (``TCP_USER_TIMEOUT``) or answering
    keepalive probes while nothing was."""
    sock = writer.get_extra_info("socket")
    if sock is None:
        return
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, USER_TIMEOUT_MS)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE_S)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL_S)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_PROBES)


class PeerListener:
    """Takes peers' TCP connections and hands their batches to a ``Receiver``."""

    def __init__(self, receiver: Receiver, tls: Tls | None = None) -> None:
        self.receiver = receiver
        self._server: asyncio.Server | None = None
        #: TLS: the server completes each handshake (within ``HELLO_TIMEOUT_S``)
        #: before the connection is handed over, and counted. (Upgrading a
        #: counted connection with ``start_tls`` hangs on uvloop.)
        self._ssl = tls.server_context() if tls is not None else None
        self._connections: set[asyncio.Task[None]] = set()
        #: Set once the node serves: a hello that came before waits for it
        #: (a refused one would send the peer to gRPC for a while).
        self._open = asyncio.Event()
        self._closing = False
        #: Connections that have not been welcomed yet, and those that have.
        self._unwelcomed = 0
        self._welcomed = 0
        #: Connections ended for a protocol error (a bad or oversized frame).
        self.broken = 0
        #: Connections closed at once: ``MAX_UNWELCOMED`` were already waiting.
        self.turned_away = 0
        #: Batches taken from welcomed connections.
        self.batches = 0

    async def bind(self, host: str, port: int) -> int:
        """Listen on ``host:port`` (0: any free port); the bound port.
        Hellos wait for ``start``."""
        self._server = await asyncio.start_server(
            self._handle,
            host or None,
            port,
            ssl=self._ssl,
            ssl_handshake_timeout=HELLO_TIMEOUT_S if self._ssl is not None else None,
        )
        return int(self._server.sockets[0].getsockname()[1])

    def start(self) -> None:
        """Take the connections' hellos (after the node's recovery)."""
        self._open.set()

    async def stop(self) -> None:
        """Stop listening and end every connection (each within ``CLOSE_WAIT_S``)."""
        self._closing = True
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()
        if self._connections:
            await asyncio.wait(list(self._connections))
        if self._server is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(CLOSE_WAIT_S):
                    await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._closing or self._unwelcomed >= MAX_UNWELCOMED:
            if not self._closing:
                self.turned_away += 1
                if self.turned_away & (self.turned_away - 1) == 0:  # 1, 2, 4...: bounded noise
                    logger.warning(
                        "turned away a peer connection from %s: %d already owe a hello "
                        "(%d turned away so far)",
                        _peer_name(writer),
                        MAX_UNWELCOMED,
                        self.turned_away,
                    )
            writer.transport.abort()
            return
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        peer = _peer_name(writer)
        try:
            tune(writer)
            await self._serve(reader, writer, peer)
        except asyncio.CancelledError:
            pass
        except CutShort as exc:  # the peer went away mid-frame: it stopped, or broke
            logger.debug("peer connection from %s ended: %s", peer, describe(exc))
        except FrameError as exc:
            self.broken += 1
            logger.warning("ended the peer connection from %s: %s", peer, describe(exc))
        except (OSError, EOFError, TimeoutError) as exc:  # the connection broke or idled out
            logger.debug("peer connection from %s ended: %s", peer, describe(exc))
        except Exception:  # a bug: this connection ends, the node goes on
            logger.exception("the peer connection from %s failed", peer)
        finally:
            await _close(writer)
            self._connections.discard(task)  # after: stop() waits for the close too

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str
    ) -> None:
        self._unwelcomed += 1
        try:  # the hello first, then (if the node is still starting) the wait for it
            async with asyncio.timeout(HELLO_TIMEOUT_S):
                raw = await read_frame(reader, HELLO_MAX_BYTES)
                if raw is None:
                    return
                await self._open.wait()
        finally:
            self._unwelcomed -= 1
        try:
            hello = ppb.PeerHello.FromString(raw)
        except Exception as exc:  # protobuf's DecodeError, whatever its class
            raise FrameError(f"a malformed hello: {describe(exc)}") from exc
        try:
            if hello.node <= 0:
                raise PeerRefused(
                    grpc.StatusCode.INVALID_ARGUMENT, "a hello must name its node (none here)"
                )
            if self._welcomed >= MAX_WELCOMED:
                raise PeerRefused(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"this node already takes {MAX_WELCOMED} peer connections",
                )
            caller = self.receiver.admit(lambda: _token(hello), peer, hello.node)
        except PeerRefused as exc:
            await _send(writer, ppb.PeerWelcome(refused=exc.message).SerializeToString())
            return
        await _send(writer, ppb.PeerWelcome().SerializeToString())
        self._welcomed += 1
        try:
            await self._take(reader, caller, hello)
        finally:
            self._welcomed -= 1

    async def _take(
        self, reader: asyncio.StreamReader, caller: Principal | None, hello: ppb.PeerHello
    ) -> None:
        # The connection speaks for the node its hello names (its token's node, with auth).
        sender = hello.node
        announced: frozenset[str] | None = features.parse_announcement(hello.features)
        while (raw := await read_frame(reader, MAX_FRAME_BYTES)) is not None:
            try:
                batch = ppb.PeerBatch.FromString(raw)
            except Exception as exc:
                raise FrameError(f"a malformed batch: {describe(exc)}") from exc
            try:  # a connection outlives its first check: expiry and revocation end it
                self.receiver.still_valid(caller)
            except PeerRefused:
                return
            self.batches += 1
            announced = self.receiver.take(batch.messages, sender, announced)


async def _close(writer: asyncio.StreamWriter) -> None:
    """Close a connection, waiting at most ``CLOSE_WAIT_S`` for TLS's goodbye
    (the connection's last step: a cancel meanwhile only drops it sooner)."""
    writer.close()
    try:
        async with asyncio.timeout(CLOSE_WAIT_S):
            await writer.wait_closed()
    except (Exception, asyncio.CancelledError):  # not closed in time, or failed: drop it
        writer.transport.abort()


def _token(hello: ppb.PeerHello) -> str:
    if not hello.token:
        raise UnauthenticatedError("this cluster requires a peer token (none in the hello)")
    return hello.token


async def _send(writer: asyncio.StreamWriter, payload: bytes) -> None:
    writer.writelines((header(len(payload)), payload))
    await writer.drain()


def _peer_name(writer: asyncio.StreamWriter) -> str:
    name = writer.get_extra_info("peername")
    if isinstance(name, tuple) and len(name) >= 2:
        return f"{name[0]}:{name[1]}"
    return str(name)


async def dial(
    host: str,
    port: int,
    tls: Tls | None,
    hello: ppb.PeerHello,
    timeout_s: float | None = None,
) -> Connection:
    """A connection to a peer's listener, its hello accepted, within
    ``timeout_s`` (``DIAL_TIMEOUT_S`` by default).

    ``HelloRefused`` when the peer refused the hello; otherwise ``OSError``
    (nobody listens there, or the connection or TLS failed), ``TimeoutError``,
    ``EOFError``, ``FrameError`` or protobuf's ``DecodeError`` (an answer that
    is not a welcome) when no connection came of it."""
    ssl = tls.client_context() if tls is not None else None
    async with asyncio.timeout(DIAL_TIMEOUT_S if timeout_s is None else timeout_s):
        reader, writer = await asyncio.open_connection(
            host, port, ssl=ssl, server_hostname=host if ssl is not None else None
        )
        try:
            tune(writer)
            await _send(writer, hello.SerializeToString())
            raw = await read_frame(reader, HELLO_MAX_BYTES)
            if raw is None:
                raise EOFError("the peer closed the connection before answering the hello")
            welcome = ppb.PeerWelcome.FromString(raw)
            if welcome.refused:
                raise HelloRefused(welcome.refused)
        except BaseException:
            writer.transport.abort()
            raise
    return reader, writer
