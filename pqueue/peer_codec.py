"""Consensus messages to and from the peer protocol's Protobuf (``peer.proto``)."""

from __future__ import annotations

from typing import Any

from consensus.messages import (
    Accept,
    Accepted,
    Ballot,
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
from pqueue.v1 import peer_pb2 as ppb

K = ppb.PeerMessage.Kind
_KINDS: dict[type[Any], int] = {
    Prepare: K.PREPARE,
    Promise: K.PROMISE,
    Accept: K.ACCEPT,
    Accepted: K.ACCEPTED,
    Heartbeat: K.HEARTBEAT,
    HeartbeatReply: K.HEARTBEAT_REPLY,
    CatchupRequest: K.CATCHUP_REQUEST,
    CatchupReply: K.CATCHUP_REPLY,
    InstallSnapshot: K.INSTALL_SNAPSHOT,
    PreVote: K.PRE_VOTE,
    PreVoteReply: K.PRE_VOTE_REPLY,
    TimeoutNow: K.TIMEOUT_NOW,
}
_TYPES = {kind: cls for cls, kind in _KINDS.items()}


def _ballot(b: Ballot) -> ppb.PeerBallot:
    return ppb.PeerBallot(round=b[0], node=b[1])


def _unballot(b: ppb.PeerBallot) -> Ballot:
    return (b.round, b.node)


def encode(msg: Message) -> ppb.PeerMessage:
    """The wire form of a consensus message."""
    out = ppb.PeerMessage(kind=_KINDS[type(msg)], src=msg.src, dst=msg.dst)  # type: ignore[arg-type]
    if isinstance(msg, Prepare | Promise | Accept | Accepted | Heartbeat | HeartbeatReply):
        out.ballot.CopyFrom(_ballot(msg.ballot))
    if isinstance(msg, Promise | Accepted | HeartbeatReply):
        out.ok = msg.ok
        out.promised.CopyFrom(_ballot(msg.promised))
    if isinstance(msg, Prepare | CatchupRequest):
        out.from_slot = msg.from_slot
    if isinstance(
        msg, Promise | Accept | Heartbeat | HeartbeatReply | CatchupReply | InstallSnapshot
    ):
        out.commit_index = msg.commit_index
    if isinstance(msg, Promise):
        out.records.extend(
            ppb.PeerRecord(slot=r.slot, ballot=_ballot(r.ballot), value=r.value, chosen=r.chosen)
            for r in msg.records
        )
    if isinstance(msg, Accept | CatchupReply):
        out.entries.extend(ppb.PeerEntry(slot=s, value=v) for s, v in msg.entries)
    if isinstance(msg, Accepted):
        out.slots.extend(msg.slots)
    if isinstance(msg, InstallSnapshot):
        out.index = msg.index
        out.data = msg.data
    if isinstance(msg, PreVote | PreVoteReply | TimeoutNow):
        out.ballot.CopyFrom(_ballot(msg.ballot))
    if isinstance(msg, PreVote | PreVoteReply):
        out.commit_index = msg.commit_index
    if isinstance(msg, PreVoteReply):
        out.ok = msg.ok
        out.promised.CopyFrom(_ballot(msg.promised))
    if isinstance(msg, Prepare):
        out.transfer = msg.transfer
    if isinstance(msg, Heartbeat | HeartbeatReply):
        out.ctx = msg.ctx
    return out


def decode(m: ppb.PeerMessage) -> Message:
    """A consensus message from its wire form; ValueError if malformed."""
    cls = _TYPES.get(m.kind)
    if cls is None:
        raise ValueError(f"unknown peer message kind {m.kind}")
    ballot, promised = _unballot(m.ballot), _unballot(m.promised)
    entries = tuple((e.slot, e.value) for e in m.entries)
    msg: Message
    if cls is Prepare:
        msg = Prepare(m.src, m.dst, ballot, m.from_slot, m.transfer)
    elif cls is Promise:
        records = tuple(Record(r.slot, _unballot(r.ballot), r.value, r.chosen) for r in m.records)
        msg = Promise(m.src, m.dst, ballot, m.ok, promised, records, m.commit_index)
    elif cls is Accept:
        msg = Accept(m.src, m.dst, ballot, entries, m.commit_index)
    elif cls is Accepted:
        msg = Accepted(m.src, m.dst, ballot, m.ok, promised, tuple(m.slots))
    elif cls is Heartbeat:
        msg = Heartbeat(m.src, m.dst, ballot, m.commit_index, m.ctx)
    elif cls is HeartbeatReply:
        msg = HeartbeatReply(m.src, m.dst, ballot, m.ok, promised, m.commit_index, m.ctx)
    elif cls is CatchupRequest:
        msg = CatchupRequest(m.src, m.dst, m.from_slot)
    elif cls is CatchupReply:
        msg = CatchupReply(m.src, m.dst, entries, m.commit_index)
    elif cls is InstallSnapshot:
        msg = InstallSnapshot(m.src, m.dst, m.index, m.data, m.commit_index)
    elif cls is PreVote:
        msg = PreVote(m.src, m.dst, ballot, m.commit_index)
    elif cls is PreVoteReply:
        msg = PreVoteReply(m.src, m.dst, ballot, m.ok, promised, m.commit_index)
    else:
        msg = TimeoutNow(m.src, m.dst, ballot)
    return msg
