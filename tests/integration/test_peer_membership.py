"""A peer token only speaks for a member: a node id outside the cluster's
member set (a removed node's token not yet revoked, or one issued for any
other id) is refused by every node, whatever the message.

The replica counts promises and accept votes by sender, so before this a
token for a non-member could add one vote to any majority, or make a
follower take an Accept in a ballot no member proposed."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import grpc
import pytest

from consensus.messages import Accept
from pqueue.node.auth import PEER, Verifier, issue, node_subject
from pqueue.node.peer_codec import encode
from tests.inproc import Cluster, node_tokens, one_node
from tests.peer_wire import send_peer

SECRET = b"m" * 32


async def test_a_token_of_a_non_member_cannot_move_a_node(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path, verifier=Verifier(SECRET), peer_token=node_tokens(SECRET))
    await cluster.start()
    try:
        leader = await cluster.leader()
        target = next(i for i in sorted(cluster.addresses) if i != leader)
        stranger = max(cluster.addresses) + 4
        log = cluster.servers[target].node.log
        replica = log.replica  # type: ignore[attr-defined]
        # A correctly signed token naming node `stranger`, speaking as itself
        # (so the per-stream src check passes): an Accept in its own ballot.
        accept = Accept(
            src=stranger, dst=target, ballot=(10**6, stranger), entries=(), commit_index=0
        )
        await send_peer(cluster.addresses[target], node_tokens(SECRET)(stranger), encode(accept))
        await asyncio.sleep(0.3)
        assert replica.promised[0] < 10**6, "a non-member's Accept moved the promise"
        assert replica.leader_id == leader, "the follower follows a non-member"
        assert log.foreign == 1  # type: ignore[attr-defined]
        # The cluster still takes writes under its own leader.
        assert await cluster.leader() == leader
    finally:
        await cluster.stop()


async def test_a_refused_peer_token_is_counted_and_said(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A node whose token expired or was revoked must show why it cannot rejoin:
    the peer service says so (peer calls themselves log at DEBUG). Admission's
    check before parsing used to refuse such a stream first, in silence."""
    caplog.set_level(logging.WARNING, logger="pqueue.node.peers")
    async with one_node(tmp_path, verifier=Verifier(SECRET)) as srv:
        assert srv.peers is not None
        stale = issue(b"x" * 32, "cluster", [PEER], 600, subject=node_subject(2))
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await send_peer(srv.address, stale)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert srv.peers.refused == 1
        assert any("refused a peer from" in r.getMessage() for r in caplog.records)
