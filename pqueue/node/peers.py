"""Peer messages: the senders to each peer, and the receiving service.

Consensus tolerates lost, duplicated and reordered messages, so the transport
keeps it simple: each peer gets a bounded queue (the oldest message goes when
it overflows) and a sender task that holds a connection open, writes
whatever has queued up as one batch, and reconnects with backoff when it
breaks. While a TCP connection is up and its socket takes more, what is
queued is written straight from the sender (``flush``: the log calls it
once a Ready's messages are queued; otherwise once the sender yields), not a
loop turn later from the task: a vote or an Accept is on the wire before the
node goes on to apply or to write its own log. The connection is a TCP one
to the peer's peer port (``peer_tcp``, ``--peer-ports``) or, for a peer without one, a client stream
on its gRPC port; a link whose peer's TCP port fails while its gRPC port
answers (mid-upgrade, say) sends on the stream and dials TCP again in the
background. Inbound batches, from either, are decoded and handed to the log.

With auth on, each node has its own peer token naming it (``sub`` =
``node:<id>``): a stream is taken only with one, a message on it that claims
another sender is dropped, and the stream ends once its token expires or is
revoked; a node reads its token again (``TokenFile``) at each connection.

Everything is bounded in bytes, so no entry size can wedge a link: a batch
stops at MAX_BATCH_BYTES (a larger message goes alone), a queue drops its
oldest messages past MAX_QUEUED_BYTES, and a message that could never fit
MAX_PEER_MESSAGE_BYTES is dropped at once (consensus never makes one: its
batches, promises and snapshot chunks are budgeted). Small messages
(heartbeats, votes, requests) travel on their own stream, a second
connection, so they never wait behind megabytes of entries.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Collection, Iterable
from typing import Any

import grpc

from consensus.messages import Message
from pqueue.core import features, limits
from pqueue.errors import UnauthenticatedError
from pqueue.node import peer_tcp
from pqueue.node.auth import PEER, Principal, Verifier, node_subject
from pqueue.node.peer_codec import EntryCache, approx_size, decode, encode_wire
from pqueue.node.peer_tcp import HelloRefused, PeerRefused
from pqueue.v1 import peer_pb2 as ppb
from pqueue.v1 import peer_pb2_grpc as ppbg
from pqueue.wire.channels import channel_options
from pqueue.wire.keys import AUTHORIZATION_KEY, bearer
from pqueue.wire.logs import describe
from pqueue.wire.protowire import varint
from pqueue.wire.tls import Tls, channel
from pqueue.wire.tokens import TokenSource, current_token

logger = logging.getLogger(__name__)

Metadata = tuple[tuple[str, str], ...]

MAX_QUEUED = 10_000
MAX_BATCH = 512
#: A batch stops adding messages past this many bytes (one larger goes alone).
MAX_BATCH_BYTES = 4 << 20
#: A link's queue drops its oldest messages past this many bytes.
MAX_QUEUED_BYTES = 64 << 20
#: Messages up to this size use the small-message lane (their own stream).
SMALL_MESSAGE_BYTES = 64 << 10
#: Room left under the gRPC limit for the batch's own framing.
_FRAMING_BYTES = 1 << 10
#: While a peer's TCP port fails and its gRPC port answers (an older release,
#: a node started without ``--peer-ports``, a firewall), its gRPC stream
#: carries the messages and TCP is dialed again in the background this often.
GRPC_FALLBACK_S = 10.0
#: How long a peer's gRPC port has to answer for the fallback to use it.
PROBE_S = 2.0
_CHANNEL_OPTIONS = channel_options(limits.MAX_PEER_MESSAGE_BYTES, keepalive=True)


class PeerService(ppbg.PeerServicer):
    """Receives peers' streams and hands each message on."""

    def __init__(
        self,
        deliver: Callable[[Message], None],
        verifier: Verifier | None = None,
        announce: Callable[[int, frozenset[str]], None] | None = None,
    ) -> None:
        self.deliver = deliver
        #: Told what each sender supports (its stream's ``pq-features`` header).
        self.announce = announce
        #: With auth on, only a token with the ``peer`` role may send: consensus
        #: trusts its peers, so a stranger's messages could decide the log. The
        #: token names the one node it speaks for (``sub`` = ``node:<id>``).
        self.verifier = verifier
        #: Messages dropped because their ``src`` was not the sender's node.
        self.spoofed = 0
        #: Streams refused or ended for their token (none, bad, expired, revoked).
        self.refused = 0

    async def Send(
        self,
        request_iterator: AsyncIterator[ppb.PeerBatch],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> ppb.PeerAck:
        metadata = context.invocation_metadata()
        try:
            caller = self.admit(lambda: bearer(metadata), context.peer())
        except PeerRefused as exc:
            await context.abort(exc.code, exc.message)
            raise AssertionError("unreachable") from exc  # abort raises
        # One stream per peer: its header speaks for the sender of its first message.
        sender = caller.node_id if caller is not None else None
        announced: frozenset[str] | None = _announcement(metadata)
        async for batch in request_iterator:
            try:  # a stream outlives its first check: expiry and revocation end it
                self.still_valid(caller)
            except PeerRefused as exc:
                await context.abort(exc.code, exc.message)
            announced = self.take(batch.messages, sender, announced)
        return ppb.PeerAck()

    def admit(
        self, token: Callable[[], str], peer: str, claims: int | None = None
    ) -> Principal | None:
        """The sending node's principal (None with auth off), from the token
        its stream or connection shows (``token()``: it, or
        ``UnauthenticatedError``); ``PeerRefused`` (said and counted) if it
        may not speak the peer protocol, or if ``claims`` (the node a TCP
        hello names) is not its token's node."""
        if self.verifier is None:
            return None
        try:
            caller = self.verifier.verify(token())
        except UnauthenticatedError as exc:
            self.refused += 1
            if self.refused & (self.refused - 1) == 0:  # 1, 2, 4, 8...: a node retries each second
                n, why = self.refused, describe(exc)
                logger.warning("refused a peer from %s: %s (%d so far)", peer, why, n)
            raise PeerRefused(grpc.StatusCode.UNAUTHENTICATED, str(exc)) from exc
        if PEER not in caller.roles:
            self.refused += 1
            logger.warning("refused a peer from %s: no peer role", peer)
            raise PeerRefused(
                grpc.StatusCode.PERMISSION_DENIED,
                "only the cluster's nodes (a token with the peer role) speak this protocol",
            )
        if caller.node_id is None:
            self.refused += 1
            logger.warning("refused a peer from %s: its token names no node", peer)
            raise PeerRefused(
                grpc.StatusCode.PERMISSION_DENIED,
                "a peer token must name its node (sub node:<id>; pq token issue --node-id N)",
            )
        if claims is not None and claims != caller.node_id:
            self.refused += 1
            logger.warning(
                "refused a peer from %s: it says it is node %d, its token names node %d",
                peer,
                claims,
                caller.node_id,
            )
            raise PeerRefused(
                grpc.StatusCode.PERMISSION_DENIED,
                f"the hello names node {claims} but the token node {caller.node_id}",
            )
        return caller

    def still_valid(self, caller: Principal | None) -> None:
        """``PeerRefused`` (said and counted) once an admitted sender's token
        has expired or been revoked: checked at each batch."""
        if caller is None or self.verifier is None:
            return
        try:
            self.verifier.still_valid(caller)
        except UnauthenticatedError as exc:
            self.refused += 1
            logger.warning("ended the peer link of %s: %s", caller.subject, describe(exc))
            raise PeerRefused(grpc.StatusCode.UNAUTHENTICATED, str(exc)) from exc

    def take(
        self,
        messages: Iterable[ppb.PeerMessage],
        sender: int | None,
        announced: frozenset[str] | None,
    ) -> frozenset[str] | None:
        """Decode and deliver one batch's messages from ``sender``'s stream or
        connection (None: any sender; the node its token or hello names
        otherwise); ``announced``: its features, if not yet told (what is
        still untold is returned)."""
        for wire in messages:
            try:
                msg = decode(wire)
            except ValueError as exc:
                logger.warning("dropping a malformed peer message: %s", describe(exc))
                continue
            if sender is not None and msg.src != sender:
                # A node speaks only for itself: a message claiming another
                # sender (the leader, say) could win a vote it has no right to.
                self.spoofed += 1
                if self.spoofed & (self.spoofed - 1) == 0:  # 1, 2, 4, 8...: bounded noise
                    logger.warning(
                        "dropped a peer message claiming to be from node %d on the link "
                        "of %s (%d so far)",
                        msg.src,
                        node_subject(sender),
                        self.spoofed,
                    )
                continue
            if announced is not None and self.announce is not None:
                self.announce(msg.src, announced)
                announced = None
            self.deliver(msg)
        return announced


def _announcement(metadata: Any) -> frozenset[str]:
    """The features a peer stream's header announces (none: ``LEGACY``)."""
    for key, value in metadata or ():
        if key == features.FEATURES_KEY and isinstance(value, str):
            return features.parse_announcement(value)
    return features.parse_announcement(None)


#: The tag of PeerBatch.messages (a length-delimited field).
_MESSAGES_TAG = varint(ppb.PeerBatch.DESCRIPTOR.fields_by_name["messages"].number << 3 | 2)


def _raw_send(ch: grpc.aio.Channel) -> Any:
    """``Peer.Send`` that writes PeerBatch bytes we serialized ourselves
    (the same wire format the generated stub would produce)."""
    return ch.stream_unary(
        "/pqueue.v1.Peer/Send",
        request_serializer=bytes,
        response_deserializer=ppb.PeerAck.FromString,
    )


class _Link:
    """The outbound half towards one peer."""

    def __init__(
        self,
        node_id: int,
        peer: int,
        address: str,
        tls: Tls | None,
        metadata: Callable[[], Metadata],
        lane: str = "bulk",
        tcp_port: int | None = None,
        hello: Callable[[], ppb.PeerHello] | None = None,
    ) -> None:
        self.node_id, self.peer, self.address = node_id, peer, address
        self.tls = tls
        self._metadata = metadata
        self.lane = lane
        #: The peer's TCP port (``--peer-ports``); None: its gRPC stream only.
        self.tcp_port = tcp_port
        #: What a TCP connection says first (with ``tcp_port``).
        self._hello = hello
        #: Whether the session now ending carried messages (backoff starts over).
        self._up = False
        #: How the link sends now ("tcp" or "grpc"; "" before its first connection).
        self.transport = ""
        self._refusals = 0
        #: (a serialized PeerMessage in pieces, its size), oldest first.
        self.queue: deque[tuple[list[bytes], int]] = deque()
        self.queued_bytes = 0
        self.dropped = 0
        self.ready = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        #: The TCP connection while its session is up and not draining: what
        #: is queued is written straight to it (``flush``), not by the task.
        self._direct: peer_tcp.Connection | None = None
        self._flush_soon = False

    @property
    def metadata(self) -> Metadata:
        """The stream's metadata, with the token as it is now (read at each connect)."""
        return self._metadata()

    def put(self, msg: list[bytes], size: int) -> None:
        """Queue ``msg`` (``size``: its bytes), dropping the oldest
        messages past MAX_QUEUED / MAX_QUEUED_BYTES."""
        if size > limits.MAX_PEER_MESSAGE_BYTES - _FRAMING_BYTES:
            logger.warning(
                "node %d -> %d: dropping a %d-byte peer message (over the %d-byte limit)",
                self.node_id,
                self.peer,
                size,
                limits.MAX_PEER_MESSAGE_BYTES,
            )
            return
        self.queue.append((msg, size))
        self.queued_bytes += size
        while len(self.queue) > MAX_QUEUED or (
            self.queued_bytes > MAX_QUEUED_BYTES and len(self.queue) > 1
        ):
            _, old = self.queue.popleft()
            self.queued_bytes -= old
            self.dropped += 1
        if self._direct is None:
            self.ready.set()  # the task sends (gRPC, connecting, draining)
        elif not self._flush_soon:
            # Written once the caller yields, with whatever else it queues
            # until then (one write); a caller that must not wait flushes.
            self._flush_soon = True
            asyncio.get_running_loop().call_soon(self._flush_later)

    def _flush_later(self) -> None:
        self._flush_soon = False
        self.flush()

    def flush(self) -> bool:
        """Write what is queued now to the TCP connection, if one is up and
        not draining; whether nothing is left queued (the rest, the task sends).

        Straight from the caller: a message handed to the task went out only
        once the loop came to it, after whatever the caller did next (a
        follower's vote waited for its apply of the entry before)."""
        conn = self._direct
        if conn is None:
            return not self.queue
        reader, writer = conn
        while self.queue:
            if reader.at_eof() or writer.is_closing():
                return self._hand_back()  # the task finds it broken and reconnects
            batch = self.take_batch()
            try:
                writer.writelines((peer_tcp.header(len(batch)), batch))
            except (OSError, RuntimeError) as exc:  # a transport that just broke
                logger.debug("node %d -> %d: write failed: %s", self.node_id, self.peer, exc)
                return self._hand_back()  # (the batch is lost, as on any broken link)
            if writer.transport.get_write_buffer_size() > peer_tcp.DRAIN_ABOVE_BYTES:
                return self._hand_back()  # the task waits for the socket, then takes it back
        return True

    def _hand_back(self) -> bool:
        """Leave sending to the task (woken); whether nothing is left queued."""
        self._direct = None
        self.ready.set()
        return not self.queue

    def take_batch(self) -> bytes:
        """The next serialized PeerBatch: up to MAX_BATCH messages and
        MAX_BATCH_BYTES (at least one), joined with one copy."""
        pieces: list[bytes] = []
        count = size = 0
        while self.queue and count < MAX_BATCH:
            msg, n = self.queue[0]
            if count and size + n > MAX_BATCH_BYTES:
                break
            self.queue.popleft()
            self.queued_bytes -= n
            # PeerBatch.messages (field 1): tag, length, then the message.
            pieces.append(_MESSAGES_TAG + varint(n))
            pieces.extend(msg)
            count += 1
            size += n
        return b"".join(pieces)

    async def send_loop(self) -> None:
        backoff_s = 0.05
        while True:
            try:
                if self.tcp_port is None:
                    await self._grpc_session(fallback=None)  # until it breaks
                else:
                    conn = await self._tcp_or_fallback()
                    if isinstance(conn, str):  # the peer answers on gRPC only, for now
                        conn = await self._grpc_session(fallback=conn)
                    await self._tcp_session(conn)  # until it breaks
            except HelloRefused as exc:
                self._said_refused(exc)
            except Exception as exc:  # any failure: reconnect, never die
                logger.debug(
                    "node %d -> %d: link broke: %s", self.node_id, self.peer, describe(exc)
                )
            if self._up:  # it carried messages: reconnect soon, backing off from the start
                self._up = False
                backoff_s = 0.05
            await asyncio.sleep(backoff_s)
            backoff_s = min(backoff_s * 2, 1.0)

    def _said_refused(self, exc: HelloRefused) -> None:
        self._refusals += 1
        if self._refusals & (self._refusals - 1) == 0:  # 1, 2, 4...: bounded noise
            logger.warning(
                "node %d -> %d: the peer refused this node's hello: %s (%d so far)",
                self.node_id,
                self.peer,
                exc,
                self._refusals,
            )

    def _now_over(self, transport: str, why: str = "") -> None:
        if transport != self.transport:
            self.transport = transport
            logger.info(
                "node %d -> %d (%s): peer messages over %s%s",
                self.node_id,
                self.peer,
                self.lane,
                "TCP" if transport == "tcp" else "the gRPC stream",
                f" ({why})" if why else "",
            )

    async def _dial(self) -> peer_tcp.Connection:
        assert self.tcp_port is not None
        assert self._hello is not None
        return await peer_tcp.dial(host_of(self.address), self.tcp_port, self.tls, self._hello())

    async def _tcp_or_fallback(self) -> peer_tcp.Connection | str:
        """A TCP connection to the peer; or why not (for the log) if its TCP
        port fails twice while its gRPC port answers (an older release, a node
        without ``--peer-ports``, a firewall that lets only gRPC through): the
        link then sends on the gRPC stream. Raises if neither answers (the peer is
        down or starting: TCP again after the backoff)."""
        try:
            return await self._dial()
        except HelloRefused:
            raise
        except Exception as exc:
            if not await self._grpc_answers():
                raise  # not up at all
            try:  # up now: its TCP port too, unless something keeps it from us
                return await self._dial()
            except HelloRefused:
                raise
            except Exception:
                where = f"{host_of(self.address)}:{self.tcp_port}"
                return f"no peer connection to {where}: {describe(exc)}"

    async def _tcp_session(self, conn: peer_tcp.Connection) -> None:
        """Send over a TCP connection until it breaks (raises)."""
        reader, writer = conn
        self._now_over("tcp")
        self._up = True
        try:
            while True:
                if reader.at_eof() or writer.is_closing():
                    raise ConnectionResetError("the peer closed the connection")
                if writer.transport.get_write_buffer_size() > peer_tcp.DRAIN_ABOVE_BYTES:
                    self._direct = None
                    await writer.drain()
                    continue
                # Idle: what comes is written by ``flush``, until it breaks or
                # must wait for the socket (then it hands back: ``ready``).
                self._direct = conn
                if not self.flush() or self._direct is None:
                    continue  # left queued, or the socket must drain first
                self.ready.clear()
                await self.ready.wait()
        finally:
            self._direct = None
            writer.transport.abort()  # nothing waits for a goodbye: the peer reads to the end

    async def _grpc_answers(self) -> bool:
        """Whether the peer's gRPC port takes a connection within ``PROBE_S``
        (a port that refuses it fails at once)."""
        ready = grpc.ChannelConnectivity.READY
        failed = grpc.ChannelConnectivity.TRANSIENT_FAILURE
        async with channel(self.address, self.tls, _CHANNEL_OPTIONS) as ch:
            try:
                async with asyncio.timeout(PROBE_S):
                    state = ch.get_state(try_to_connect=True)
                    while state != ready:
                        if state == failed:
                            return False
                        await ch.wait_for_state_change(state)
                        state = ch.get_state(try_to_connect=True)
            except TimeoutError:
                return False
        return True

    async def _grpc_session(self, fallback: str | None) -> peer_tcp.Connection:
        """Send over a gRPC stream until it breaks (raises). As a ``fallback``
        (why TCP failed), dial TCP again in the background every
        ``GRPC_FALLBACK_S`` while sending, and return its connection, the
        stream closed, once one is made."""
        made: list[peer_tcp.Connection] = []  # dialed while on gRPC, until handed over
        try:
            async with channel(self.address, self.tls, _CHANNEL_OPTIONS) as ch:
                call = _raw_send(ch)(metadata=self.metadata)
                self._now_over("grpc", fallback or "")
                if fallback is None:
                    while True:
                        if not self.queue:
                            self.ready.clear()
                            await self.ready.wait()
                        await call.write(self.take_batch())
                        self._up = True
                await self._fall_back(call, made)
                await _finish(call)
            return made.pop()
        except BaseException:
            for _, writer in made:  # not handed over: nobody else will close it
                writer.transport.abort()
            raise

    async def _fall_back(self, call: Any, made: list[peer_tcp.Connection]) -> None:
        """Send on the gRPC stream ``call`` while dialing TCP every
        ``GRPC_FALLBACK_S`` in the background; returns once a dial made a
        connection (put in ``made``)."""
        redial_at = time.monotonic() + GRPC_FALLBACK_S
        dialing: asyncio.Task[peer_tcp.Connection] | None = None
        try:
            while True:
                if dialing is not None and dialing.done():
                    failed = dialing.exception()
                    if failed is None:
                        made.append(dialing.result())
                        dialing = None
                        return
                    if isinstance(failed, HelloRefused):
                        self._said_refused(failed)
                    dialing = None
                    redial_at = time.monotonic() + GRPC_FALLBACK_S
                if dialing is None and time.monotonic() >= redial_at:
                    dialing = asyncio.create_task(self._dial())
                if self.queue:
                    await call.write(self.take_batch())
                    self._up = True
                    continue
                self.ready.clear()
                if dialing is None:  # nothing to watch but the queue, until the next dial
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(max(0.0, redial_at - time.monotonic())):
                            await self.ready.wait()
                    continue
                waiting = asyncio.create_task(self.ready.wait())
                try:
                    await asyncio.wait([waiting, dialing], return_when=asyncio.FIRST_COMPLETED)
                finally:
                    waiting.cancel()
        finally:  # a dial under way is dropped (it closes its own connection)
            if dialing is not None:
                if dialing.done() and not dialing.cancelled() and not dialing.exception():
                    made.append(dialing.result())  # the caller closes it
                dialing.cancel()


async def _finish(call: Any) -> None:
    """End a gRPC stream cleanly: what was written is delivered, then it closes
    (within ``PROBE_S``; the stream is dropped with its channel otherwise)."""
    with contextlib.suppress(Exception):
        async with asyncio.timeout(PROBE_S):
            await call.done_writing()
            await call


def host_of(address: str) -> str:
    """The host of ``host:port`` (an IPv6 literal without its brackets)."""
    host = address.rsplit(":", 1)[0]
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


class PeerTransport:
    """Sends consensus messages to the other nodes."""

    def __init__(
        self,
        node_id: int,
        addresses: dict[int, str],
        tls: Tls | None = None,
        token: TokenSource | None = None,
        supported: Collection[str] = features.SUPPORTED,
        peer_ports: dict[int, int] | None = None,
    ) -> None:
        self.node_id = node_id
        #: Each node's TCP peer port (``--peer-ports``; this one's too), read
        #: at start; None: every peer over its gRPC stream.
        self.peer_ports = peer_ports
        #: This node's peer token (role ``peer``), when the cluster checks tokens:
        #: a string, or a ``TokenFile`` re-read when it changes (rotation).
        self.token = token
        #: The log features this node supports (each stream announces them).
        self.supported = supported
        #: With mutual TLS, this node's certificate is its identity to the peers.
        self.tls = tls
        self._addresses = addresses
        self._links: dict[int, _Link] = {}
        #: The small-message lane: a second stream (and connection) per peer.
        self._small: dict[int, _Link] = {}
        #: Accept entries serialized once, shared by every link and retry.
        self.entries = EntryCache()

    def metadata(self) -> Metadata:
        """What a stream to a peer carries: this node's token as it is now, and
        the log features this node supports."""
        token = current_token(self.token)
        return (
            *(((AUTHORIZATION_KEY, f"Bearer {token}"),) if token else ()),
            (features.FEATURES_KEY, features.announce(self.supported)),
        )

    def hello(self) -> ppb.PeerHello:
        """What a TCP connection to a peer says first: the stream's headers."""
        return ppb.PeerHello(
            node=self.node_id,
            token=current_token(self.token) or "",
            features=features.announce(self.supported),
        )

    def start(self) -> None:
        """Start two senders per peer (addresses are read now: ports may bind late)."""
        ports = self.peer_ports or {}
        for lanes, lane in ((self._links, "bulk"), (self._small, "small")):
            lanes.update(
                {
                    peer: _Link(
                        self.node_id,
                        peer,
                        address,
                        self.tls,
                        self.metadata,
                        lane,
                        ports.get(peer),
                        self.hello,
                    )
                    for peer, address in self._addresses.items()
                    if peer != self.node_id
                }
            )
            for link in lanes.values():
                link.task = asyncio.create_task(
                    link.send_loop(), name=f"pq-peer-{link.peer}-{lane}"
                )

    async def stop(self) -> None:
        """Stop the senders and close their streams."""
        tasks = [link.task for link in self.links() if link.task is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)

    def links(self) -> list[_Link]:
        """Every link to a peer, both lanes (none before ``start``)."""
        return [*self._links.values(), *self._small.values()]

    def flush(self) -> bool:
        """Write what is queued now on every link whose TCP connection is up
        (``_Link.flush``); whether nothing is left for the links' tasks."""
        done = True
        for link in self.links():
            if link.queue:
                done = link.flush() and done
        return done

    def send(self, msg: Message) -> None:
        """Queue a message for its destination (dropped if unknown); it is
        written when the caller yields, or at its ``flush``."""
        lanes = self._small if approx_size(msg) <= SMALL_MESSAGE_BYTES else self._links
        link = lanes.get(msg.dst)
        if link is not None:
            wire = encode_wire(msg, self.entries)
            link.put(wire, sum(map(len, wire)))
