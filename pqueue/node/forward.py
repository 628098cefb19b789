"""Forwarding a client's call from a follower to the leader, in one hop:
a unary call (``call``) or a whole bidirectional stream (``relay``)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc
from google.protobuf import message_factory
from google.protobuf.message import Message

from pqueue.errors import PQueueError, UnavailableError
from pqueue.v1 import queue_pb2 as pb
from pqueue.wire.channels import channel_options
from pqueue.wire.keys import DEFAULT_FORWARD_TIMEOUT_S, FORWARDED_KEY, FORWARDER_TOKEN_KEY
from pqueue.wire.observe import hop_metadata
from pqueue.wire.status import from_rpc_error
from pqueue.wire.tls import Tls
from pqueue.wire.tls import channel as channel_to
from pqueue.wire.tokens import TokenSource, current_token


class Forwarder:
    """Cached channels to leaders; calls by method name with the caller's deadline."""

    def __init__(self, tls: Tls | None = None, hop_token: TokenSource | None = None) -> None:
        self.tls = tls
        #: This node's peer token, shown to the leader (``pq-forwarder-token``) so
        #: that it believes the client address the follower passes on.
        self.hop_token = hop_token
        self._channels: dict[str, grpc.aio.Channel] = {}

    def _channel(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            channel = channel_to(
                address,
                self.tls,
                channel_options(),
            )
            self._channels[address] = channel
        return channel

    async def call(
        self,
        address: str,
        service: str,
        method: str,
        request: Message,
        timeout_s: float | None,
        forwarded_by: str,
        credentials: tuple[tuple[str, str], ...] = (),
    ) -> Message:
        """The leader's answer; its error re-raised as a ``PQueueError``."""
        descriptor = pb.DESCRIPTOR.services_by_name[service.rsplit(".", 1)[1]]
        output = message_factory.GetMessageClass(descriptor.methods_by_name[method].output_type)
        stub = self._channel(address).unary_unary(
            f"/{service}/{method}",
            request_serializer=type(request).SerializeToString,
            response_deserializer=output.FromString,
        )
        hop_token = current_token(self.hop_token)
        proof = ((FORWARDER_TOKEN_KEY, hop_token),) if hop_token else ()
        try:
            response: Message = await stub(
                request,
                # Never unbounded: a caller without a deadline still gets one.
                timeout=timeout_s if timeout_s is not None else DEFAULT_FORWARD_TIMEOUT_S,
                # The caller's own token goes along: the leader checks it again.
                metadata=((FORWARDED_KEY, forwarded_by), *hop_metadata(), *proof, *credentials),
            )
        except grpc.aio.AioRpcError as exc:
            raise hop_error(exc, address) from exc
        return response

    async def relay(
        self,
        address: str,
        service: str,
        method: str,
        requests: AsyncIterator[Message],
        forwarded_by: str,
        credentials: tuple[tuple[str, str], ...] = (),
        stop: asyncio.Future[None] | None = None,
    ) -> AsyncIterator[Message]:
        """The leader's responses to a bidirectional stream, relayed both ways
        as they come; its error status re-raised as a ``PQueueError``.

        The caller's requests are written to the leader as they are read, by
        a task of their own, so neither direction waits for the other. When
        the caller stops writing, or ``stop`` is done (this node drains), the
        leader is told no more will come and its remaining answers are still
        relayed. No deadline: a stream lives as long as its caller's.
        Leaving early (the caller went away) cancels the leader's stream.
        """
        descriptor = pb.DESCRIPTOR.services_by_name[service.rsplit(".", 1)[1]]
        output = message_factory.GetMessageClass(descriptor.methods_by_name[method].output_type)
        hop_token = current_token(self.hop_token)
        proof = ((FORWARDER_TOKEN_KEY, hop_token),) if hop_token else ()
        call = self._channel(address).stream_stream(
            f"/{service}/{method}",
            request_serializer=_serialize,
            response_deserializer=output.FromString,
        )(metadata=((FORWARDED_KEY, forwarded_by), *hop_metadata(), *proof, *credentials))
        pump = asyncio.create_task(_pump(requests, call, stop), name="pq-relay-pump")
        try:
            while True:
                response = await call.read()
                if response is grpc.aio.EOF:
                    return
                assert isinstance(response, Message)
                yield response
        except grpc.aio.AioRpcError as exc:
            raise hop_error(exc, address) from exc
        finally:
            pump.cancel()
            await asyncio.wait([pump])
            call.cancel()  # a no-op once the leader ended it

    async def close(self) -> None:
        """Close every channel."""
        for channel in self._channels.values():
            await channel.close()
        self._channels = {}


def _serialize(message: Message) -> bytes:
    return message.SerializeToString()


async def _pump(
    requests: AsyncIterator[Message],
    call: grpc.aio.StreamStreamCall[Message, Message],
    stop: asyncio.Future[None] | None,
) -> None:
    """Write the caller's requests to the leader until the caller or ``stop``
    ends them, then half-close. A write that fails means the leader's stream
    ended: its status reaches the reader. Cancelled, it leaves no read of
    the caller's stream pending (gRPC would end that stream INTERNAL)."""
    iterator = aiter(requests)
    nxt: asyncio.Future[Message] | None = None
    try:
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
            while True:
                nxt = asyncio.ensure_future(anext(iterator))
                if stop is not None:
                    await asyncio.wait((nxt, stop), return_when=asyncio.FIRST_COMPLETED)
                    if not nxt.done():
                        break  # draining: what is not read is not relayed
                try:
                    request = await nxt
                except StopAsyncIteration:
                    break
                await call.write(request)
            await call.done_writing()
    finally:
        if nxt is not None and not nxt.done():
            nxt.cancel()
            await asyncio.wait([nxt])


def hop_error(exc: grpc.aio.AioRpcError, address: str) -> PQueueError:
    """The leader's error as a ``PQueueError``; a bare UNAVAILABLE (the leader
    did not answer: unreachable, or it died mid-call) made ``LEADER_UNREACHABLE``,
    so that the caller still learns why (the call may or may not have run)."""
    error = from_rpc_error(exc)
    if type(error) is UnavailableError and not error.reason:
        return UnavailableError(
            f"the leader at {address} did not answer: {error.message}",
            error.retry_after_s,
            reason="LEADER_UNREACHABLE",
            metadata={"leader_address": address},
        )
    return error
