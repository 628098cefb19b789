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
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable, Collection
from typing import Any

import grpc

from consensus.messages import Message
from pqueue import features, limits
from pqueue.access import AUTHORIZATION_KEY, bearer
from pqueue.auth import PEER, Principal, TokenSource, Verifier, current_token, node_subject
from pqueue.errors import UnauthenticatedError
from pqueue.peer_codec import decode, encode
from pqueue.tls import Tls, channel
from pqueue.v1 import peer_pb2 as ppb
from pqueue.v1 import peer_pb2_grpc as ppbg

logger = logging.getLogger(__name__)

Metadata = tuple[tuple[str, str], ...]

MAX_QUEUED = 10_000
MAX_BATCH = 512
_CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", limits.MAX_PEER_MESSAGE_BYTES),
    ("grpc.max_send_message_length", limits.MAX_PEER_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 10_000),
]


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
                    logger.warning("ended the peer stream of %s: %s", caller.subject, exc)
                    await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(exc))
            for wire in batch.messages:
                try:
                    msg = decode(wire)
                except ValueError as exc:
                    logger.warning("dropping a malformed peer message: %s", exc)
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
                logger.warning("refused a peer stream from %s: %s (%d so far)", peer, exc, n)
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
        self.queue: deque[ppb.PeerMessage] = deque(maxlen=MAX_QUEUED)
        self.ready = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    @property
    def metadata(self) -> Metadata:
        """The stream's metadata, with the token as it is now (read at each connect)."""
        return self._metadata()

    def put(self, msg: ppb.PeerMessage) -> None:
        self.queue.append(msg)
        self.ready.set()

    async def send_loop(self) -> None:
        backoff_s = 0.05
        while True:
            try:
                async with channel(self.address, self.tls, _CHANNEL_OPTIONS) as ch:
                    call = ppbg.PeerStub(ch).Send(metadata=self.metadata)
                    while True:
                        if not self.queue:
                            self.ready.clear()
                            await self.ready.wait()
                        batch = [
                            self.queue.popleft() for _ in range(min(MAX_BATCH, len(self.queue)))
                        ]
                        await call.write(ppb.PeerBatch(messages=batch))
                        backoff_s = 0.05
            except Exception as exc:  # any failure: reconnect, never die
                logger.debug("node %d -> %d: stream broke: %r", self.node_id, self.peer, exc)
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

    def metadata(self) -> Metadata:
        """What a stream to a peer carries: this node's token as it is now, and
        the log features this node supports."""
        token = current_token(self.token)
        return (
            *(((AUTHORIZATION_KEY, f"Bearer {token}"),) if token else ()),
            (features.FEATURES_KEY, features.announce(self.supported)),
        )

    def start(self) -> None:
        """Start one sender per peer (addresses are read now: ports may bind late)."""
        self._links = {
            peer: _Link(self.node_id, peer, address, self.tls, self.metadata)
            for peer, address in self._addresses.items()
            if peer != self.node_id
        }
        for link in self._links.values():
            link.task = asyncio.create_task(link.send_loop(), name=f"pq-peer-{link.peer}")

    async def stop(self) -> None:
        """Stop the senders and close their streams."""
        tasks = [link.task for link in self._links.values() if link.task is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)

    def send(self, msg: Message) -> None:
        """Queue a message for its destination (dropped if unknown)."""
        link = self._links.get(msg.dst)
        if link is not None:
            link.put(encode(msg))
