"""Raw peer-protocol messages for tests that play a forged or foreign peer."""

from __future__ import annotations

from collections.abc import Callable

import grpc

from pqueue.v1 import peer_pb2 as ppb
from pqueue.v1 import peer_pb2_grpc as ppbg


async def send_peer(address: str, token: str | None, *messages: ppb.PeerMessage) -> None:
    """Open a peer stream to ``address`` (with ``token``, if any), send
    ``messages`` in one batch, and wait for the node to end the stream."""
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    async with grpc.aio.insecure_channel(address) as ch:
        await send_batch(
            lambda: ppbg.PeerStub(ch).Send(timeout=3, metadata=metadata),
            ppb.PeerBatch(messages=list(messages)) if messages else None,
        )


async def send_batch(
    open_stream: Callable[[], grpc.aio.StreamUnaryCall[ppb.PeerBatch, ppb.PeerAck]],
    batch: ppb.PeerBatch | None,
    attempts: int = 3,
) -> None:
    """Send ``batch`` (None: only the stream's headers) on a stream
    ``open_stream`` opens, and wait for the node to end it; raise its status.

    A node refuses a stream before it reads a message. When that refusal
    ends the call while the client's first write is going out, the client
    sees its own write fail with a bare INTERNAL from gRPC's core (and so
    does the call's status), not the node's refusal: the stream is opened
    again, up to ``attempts`` times (seen in CI about once in a run)."""
    for attempt in range(1, attempts + 1):
        send = open_stream()
        try:
            if batch is not None:
                await send.write(batch)
            await send.done_writing()
            await send
            return
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.INTERNAL or attempt == attempts:
                raise


def absurd_prepare(leader: int, target: int) -> ppb.PeerMessage:
    """A Prepare spoofed as ``leader`` with round 2^63-1, which SQLite cannot
    store (the issue's crash-loop: every node died on it, at every restart)."""
    return ppb.PeerMessage(
        kind=ppb.PeerMessage.PREPARE,
        src=leader,
        dst=target,
        ballot=ppb.PeerBallot(round=(1 << 63) - 1, node=leader),
        from_slot=1,
    )
