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
        await send.write(ppb.PeerBatch(messages=list(messages)))
        await send.done_writing()
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
