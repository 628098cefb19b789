"""Every consensus message survives the peer wire format unchanged."""

from __future__ import annotations

import pytest

from consensus.messages import (
    Accept,
    Accepted,
    CatchupReply,
    CatchupRequest,
    Heartbeat,
    HeartbeatReply,
    InstallSnapshot,
    Message,
    Prepare,
    PreVote,
    PreVoteReply,
    Promise,
    Record,
    TimeoutNow,
)
from pqueue.node.peer_codec import decode, encode
from pqueue.v1 import peer_pb2 as ppb

MESSAGES: list[Message] = [
    Prepare(1, 2, (3, 1), 7),
    Prepare(1, 2, (3, 1), 7, transfer=True),
    Promise(2, 1, (3, 1), True, (3, 1), (Record(8, (2, 2), b"v", True),), 7),
    Accept(1, 2, (3, 1), ((8, b"a"), (9, b"")), 7),
    Accepted(2, 1, (3, 1), False, (4, 3), (8, 9)),
    Heartbeat(1, 2, (3, 1), 9),
    Heartbeat(1, 2, (3, 1), 9, ctx=42),
    HeartbeatReply(2, 1, (3, 1), True, (3, 1), 9, ctx=42),
    CatchupRequest(2, 1, 5),
    CatchupReply(1, 2, ((5, b"x"),), 9),
    InstallSnapshot(1, 2, 100, b"state", 120),
    PreVote(3, 1, (5, 3), 120),
    PreVoteReply(1, 3, (5, 3), True, (4, 2), 118),
    PreVoteReply(1, 3, (5, 3), False, (6, 2), 121),
    TimeoutNow(1, 2, (4, 1)),
]


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_round_trip(msg: Message) -> None:
    wire = encode(msg).SerializeToString()
    assert decode(ppb.PeerMessage.FromString(wire)) == msg


def test_an_unknown_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown peer message kind"):
        decode(ppb.PeerMessage(kind=19, src=1, dst=2))  # type: ignore[arg-type]
