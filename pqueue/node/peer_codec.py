"""Consensus messages to and from the peer protocol's Protobuf (``peer.proto``).

``decode`` range-checks every id and number before consensus sees it: a
peer's ballot round, slot or index at or past 2^62 (SQLite stores < 2^63; a
round near the top could never be outbid) or a node id outside 1..65535 is
a ``ValueError``, which the receiving service logs and drops.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from consensus.messages import (
    MAX_NODE_ID,
    MAX_PROTOCOL_INT,
    ZERO,
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
    SnapshotRequest,
    TimeoutNow,
)
from pqueue.v1 import peer_pb2 as ppb
from pqueue.wire.protowire import length_delimited

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
    SnapshotRequest: K.SNAPSHOT_REQUEST,
}
_TYPES = {kind: cls for cls, kind in _KINDS.items()}


def _ballot(b: Ballot) -> ppb.PeerBallot:
    return ppb.PeerBallot(round=b[0], node=b[1])


def _unballot(b: ppb.PeerBallot) -> Ballot:
    if b.round >= MAX_PROTOCOL_INT or b.node >= MAX_NODE_ID:
        raise ValueError(f"ballot {b.round}.{b.node} out of range")
    if b.node == 0 and b.round != 0:
        raise ValueError(f"ballot {b.round}.0 names no node")
    return (b.round, b.node)


def _number(name: str, value: int) -> int:
    if value >= MAX_PROTOCOL_INT:
        raise ValueError(f"{name} {value} out of range (must be < 2^62)")
    return value


#: Wire overhead allowed per message and per entry/record when estimating size.
_OVERHEAD = 64


def approx_size(msg: Message) -> int:
    """An upper-bound estimate of ``msg``'s encoded size, without encoding it
    (the transport budgets batches and queues in bytes with this)."""
    size = _OVERHEAD
    if isinstance(msg, Promise):
        size += sum(len(r.value) + _OVERHEAD for r in msg.records)
    elif isinstance(msg, Accept | CatchupReply):
        size += sum(len(v) + _OVERHEAD for _, v in msg.entries)
    elif isinstance(msg, Accepted):
        size += 11 * len(msg.slots)
    elif isinstance(msg, InstallSnapshot):
        size += len(msg.data) + len(msg.sha256)
    return size


def encode(msg: Message) -> ppb.PeerMessage:
    """The wire form of a consensus message."""
    out = ppb.PeerMessage(kind=_KINDS[type(msg)], src=msg.src, dst=msg.dst)  # type: ignore[arg-type]
    if isinstance(msg, Prepare | Promise | Accept | Accepted | Heartbeat | HeartbeatReply):
        out.ballot.CopyFrom(_ballot(msg.ballot))
    if isinstance(msg, Promise | Accepted | HeartbeatReply):
        out.ok = msg.ok
        out.promised.CopyFrom(_ballot(msg.promised))
    if isinstance(msg, Prepare | CatchupRequest | Promise):
        out.from_slot = msg.from_slot
    if isinstance(msg, Prepare | CatchupRequest):
        out.parts = msg.parts
    if isinstance(
        msg, Promise | Accept | Heartbeat | HeartbeatReply | CatchupReply | InstallSnapshot
    ):
        out.commit_index = msg.commit_index
    if isinstance(msg, Promise):
        out.records.extend(
            ppb.PeerRecord(slot=r.slot, ballot=_ballot(r.ballot), value=r.value, chosen=r.chosen)
            for r in msg.records
        )
        out.more_from = msg.more_from
    if isinstance(msg, Accept | CatchupReply):
        out.entries.extend(ppb.PeerEntry(slot=s, value=v) for s, v in msg.entries)
    if isinstance(msg, Accepted):
        out.slots.extend(msg.slots)
    if isinstance(msg, InstallSnapshot):
        out.index = msg.index
        out.data = msg.data
        out.offset = msg.offset
        out.total = msg.total
        out.sha256 = msg.sha256
    if isinstance(msg, SnapshotRequest):
        out.index = msg.index
        out.offset = msg.offset
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


_ENTRIES_FIELD = ppb.PeerMessage.DESCRIPTOR.fields_by_name["entries"].number


class EntryCache:
    """Each Accept (or CatchupReply) entry's wire bytes, encoded once per
    (slot, ballot); chosen values sent by catch-up use ballot ZERO.

    A leader has one value per slot in its ballot, so the key names the
    bytes exactly; the same entry sent to every peer, and re-offered on
    heartbeats, is serialized once. Least recently used entries go past
    ``max_bytes``.
    """

    def __init__(self, max_bytes: int = 96 << 20) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        #: Entries encoded (a test counts these to see retries do not re-copy).
        self.encoded = 0
        self._entries: OrderedDict[tuple[int, Ballot], bytes] = OrderedDict()

    def entry(self, slot: int, ballot: Ballot, value: bytes) -> bytes:
        """The ``entries`` field bytes of one entry."""
        key = (slot, ballot)
        wire = self._entries.get(key)
        if wire is not None:
            self._entries.move_to_end(key)
            return wire
        wire = length_delimited(
            _ENTRIES_FIELD, ppb.PeerEntry(slot=slot, value=value).SerializeToString()
        )
        self.encoded += 1
        self._entries[key] = wire
        self.bytes += len(wire)
        while self.bytes > self.max_bytes and len(self._entries) > 1:
            _, old = self._entries.popitem(last=False)
            self.bytes -= len(old)
        return wire


def encode_wire(msg: Message, cache: EntryCache) -> list[bytes]:
    """``msg``'s serialized ``PeerMessage``, as pieces to concatenate: an
    Accept's entries come from ``cache`` (encoded once, never re-copied per
    peer or per retry)."""
    if isinstance(msg, Accept):
        header = encode(Accept(msg.src, msg.dst, msg.ballot, (), msg.commit_index))
        return [
            header.SerializeToString(),
            *(cache.entry(slot, msg.ballot, value) for slot, value in msg.entries),
        ]
    if isinstance(msg, CatchupReply):
        # Catch-up carries chosen values: one per slot, so ZERO (below every
        # real ballot, never an Accept's) keys them apart from accepts.
        header = encode(CatchupReply(msg.src, msg.dst, (), msg.commit_index))
        return [
            header.SerializeToString(),
            *(cache.entry(slot, ZERO, value) for slot, value in msg.entries),
        ]
    return [encode(msg).SerializeToString()]


def decode(m: ppb.PeerMessage) -> Message:
    """A consensus message from its wire form; ValueError if malformed."""
    cls = _TYPES.get(m.kind)
    if cls is None:
        raise ValueError(f"unknown peer message kind {m.kind}")
    if not (0 < m.src < MAX_NODE_ID and 0 < m.dst < MAX_NODE_ID):
        raise ValueError(f"node ids {m.src} -> {m.dst} out of range")
    if max(m.from_slot, m.commit_index, m.index, m.more_from, m.offset, m.total) >= (
        MAX_PROTOCOL_INT
    ):  # rare: name the field
        for name in ("from_slot", "commit_index", "index", "more_from", "offset", "total"):
            _number(name, getattr(m, name))
    ballot, promised = _unballot(m.ballot), _unballot(m.promised)
    entries = tuple((e.slot, e.value) for e in m.entries)
    if entries and max(slot for slot, _ in entries) >= MAX_PROTOCOL_INT:
        _number("slot", max(slot for slot, _ in entries))
    if m.slots and max(m.slots) >= MAX_PROTOCOL_INT:
        _number("slot", max(m.slots))
    msg: Message
    if cls is Prepare:
        msg = Prepare(m.src, m.dst, ballot, m.from_slot, m.transfer, m.parts)
    elif cls is Promise:
        records = tuple(
            Record(_number("slot", r.slot), _unballot(r.ballot), r.value, r.chosen)
            for r in m.records
        )
        msg = Promise(
            m.src,
            m.dst,
            ballot,
            m.ok,
            promised,
            records,
            m.commit_index,
            m.from_slot,
            m.more_from,
        )
    elif cls is Accept:
        msg = Accept(m.src, m.dst, ballot, entries, m.commit_index)
    elif cls is Accepted:
        msg = Accepted(m.src, m.dst, ballot, m.ok, promised, tuple(m.slots))
    elif cls is Heartbeat:
        msg = Heartbeat(m.src, m.dst, ballot, m.commit_index, m.ctx)
    elif cls is HeartbeatReply:
        msg = HeartbeatReply(m.src, m.dst, ballot, m.ok, promised, m.commit_index, m.ctx)
    elif cls is CatchupRequest:
        msg = CatchupRequest(m.src, m.dst, m.from_slot, m.parts)
    elif cls is CatchupReply:
        msg = CatchupReply(m.src, m.dst, entries, m.commit_index)
    elif cls is InstallSnapshot:
        msg = InstallSnapshot(
            m.src, m.dst, m.index, m.data, m.commit_index, m.offset, m.total, m.sha256
        )
    elif cls is PreVote:
        msg = PreVote(m.src, m.dst, ballot, m.commit_index)
    elif cls is PreVoteReply:
        msg = PreVoteReply(m.src, m.dst, ballot, m.ok, promised, m.commit_index)
    elif cls is SnapshotRequest:
        msg = SnapshotRequest(m.src, m.dst, m.index, m.offset)
    else:
        msg = TimeoutNow(m.src, m.dst, ballot)
    return msg
