"""The gRPC peer transport: one long-lived stream per peer, messages batched.

Consensus tolerates lost, duplicated and reordered messages, so the transport
keeps it simple: each peer gets a bounded queue (the oldest message goes when
it overflows) and a sender task that holds a client stream open, writes
whatever has queued up as one batch, and reconnects with backoff when the
stream breaks. Inbound streams are decoded and handed to the log.

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
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable, Collection
from typing import Any

import grpc

from consensus.messages import Message
from pqueue.core import features, limits
from pqueue.errors import UnauthenticatedError
from pqueue.node.auth import PEER, Principal, Verifier, node_subject
from pqueue.node.peer_codec import EntryCache, approx_size, decode, encode_wire
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
        caller = await self._authenticate(context)
        sender = caller.node_id if caller is not None else None
        # One stream per peer: its header speaks for the sender of its first message.
        announced: frozenset[str] | None = _announcement(context.invocation_metadata())
        async for batch in request_iterator:
            if caller is not None and self.verifier is not None:
                try:  # a stream outlives its first check: expiry and revocation end it
                    self.verifier.still_valid(caller)
                except UnauthenticatedError as exc:
                    self.refused += 1
                    logger.warning("ended the peer stream of %s: %s", caller.subject, describe(exc))
                    await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(exc))
            for wire in batch.messages:
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
                            "dropped a peer message claiming to be from node %d on the stream "
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
        return ppb.PeerAck()

    async def _authenticate(self, context: grpc.aio.ServicerContext[Any, Any]) -> Principal | None:
        """The sending node's principal (None with auth off); aborts the call if none."""
        if self.verifier is None:
            return None
        try:
            caller = self.verifier.verify(bearer(context.invocation_metadata()))
        except UnauthenticatedError as exc:
            self.refused += 1
            if self.refused & (self.refused - 1) == 0:  # 1, 2, 4, 8...: a node retries each second
                peer, n = context.peer(), self.refused
                logger.warning(
                    "refused a peer stream from %s: %s (%d so far)", peer, describe(exc), n
                )
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(exc))
            raise AssertionError("unreachable") from exc  # abort raises
        if PEER not in caller.roles:
            self.refused += 1
            logger.warning("refused a peer stream from %s: no peer role", context.peer())
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                "only the cluster's nodes (a token with the peer role) speak this protocol",
            )
        if caller.node_id is None:
            self.refused += 1
            logger.warning("refused a peer stream from %s: its token names no node", context.peer())
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                "a peer token must name its node (sub node:<id>; pq token issue --node-id N)",
            )
        return caller


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
    ) -> None:
        self.node_id, self.peer, self.address = node_id, peer, address
        self.tls = tls
        self._metadata = metadata
        #: (a serialized PeerMessage in pieces, its size), oldest first.
        self.queue: deque[tuple[list[bytes], int]] = deque()
        self.queued_bytes = 0
        self.dropped = 0
        self.ready = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

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
        self.ready.set()

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
                async with channel(self.address, self.tls, _CHANNEL_OPTIONS) as ch:
                    call = _raw_send(ch)(metadata=self.metadata)
                    while True:
                        if not self.queue:
                            self.ready.clear()
                            await self.ready.wait()
                        await call.write(self.take_batch())
                        backoff_s = 0.05
            except Exception as exc:  # any failure: reconnect, never die
                logger.debug(
                    "node %d -> %d: stream broke: %s", self.node_id, self.peer, describe(exc)
                )
            await asyncio.sleep(backoff_s)
            backoff_s = min(backoff_s * 2, 1.0)


class PeerTransport:
    """Sends consensus messages to the other nodes."""

    def __init__(
        self,
        node_id: int,
        addresses: dict[int, str],
        tls: Tls | None = None,
        token: TokenSource | None = None,
        supported: Collection[str] = features.SUPPORTED,
    ) -> None:
        self.node_id = node_id
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

    def start(self) -> None:
        """Start two senders per peer (addresses are read now: ports may bind late)."""
        for lanes, lane in ((self._links, "bulk"), (self._small, "small")):
            lanes.update(
                {
                    peer: _Link(self.node_id, peer, address, self.tls, self.metadata)
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
        links = [*self._links.values(), *self._small.values()]
        tasks = [link.task for link in links if link.task is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)

    def send(self, msg: Message) -> None:
        """Queue a message for its destination (dropped if unknown)."""
        lanes = self._small if approx_size(msg) <= SMALL_MESSAGE_BYTES else self._links
        link = lanes.get(msg.dst)
        if link is not None:
            wire = encode_wire(msg, self.entries)
            link.put(wire, sum(map(len, wire)))
