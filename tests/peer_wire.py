"""Raw peer-protocol messages for tests that play a forged or foreign peer."""

from __future__ import annotations

import grpc

from pqueue.v1 import peer_pb2 as ppb
from pqueue.v1 import peer_pb2_grpc as ppbg


async def send_peer(address: str, token: str | None, *messages: ppb.PeerMessage) -> None:
    """Open a peer stream to ``address`` (with ``token``, if any), send
    ``messages`` in one batch, and wait for the node to end the stream."""
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    async with grpc.aio.insecure_channel(address) as ch:
        send = ppbg.PeerStub(ch).Send(timeout=3, metadata=metadata)
        try:
            if messages:  # none: only the stream's headers (a token) are tested
                await send.write(ppb.PeerBatch(messages=list(messages)))
            await send.done_writing()
        except grpc.aio.AioRpcError:
            # The node may end the stream (refusing it) before the write is
            # out: the write then fails with a bare INTERNAL from gRPC's core,
            # and the node's own status is what the call ended with.
            code = await send.code()
            details = await send.details()
            raise grpc.aio.AioRpcError(
                code, grpc.aio.Metadata(), await send.trailing_metadata(), details
            ) from None
        await send


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
