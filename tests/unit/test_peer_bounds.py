"""Byte budgets and range checks of the replication path (pure: core and codec)."""

from __future__ import annotations

import random
from hashlib import sha256

import pytest

from consensus.blob import Blob, BlobSink, MemorySink, read_all
from consensus.messages import (
    MAX_PROTOCOL_INT,
    Accept,
    CatchupReply,
    CatchupRequest,
    InstallSnapshot,
    Message,
    Prepare,
    PreVote,
    Promise,
    Record,
    SnapshotRequest,
)
from consensus.replica import Config, DurableState, Replica, Role
from pqueue.node.peer_codec import approx_size, decode, encode
from pqueue.v1 import peer_pb2 as ppb

NODES = (1, 2, 3)


def replica(node: int, durable: DurableState | None = None, **budgets: int) -> Replica:
    return Replica(Config(node_id=node, nodes=NODES, **budgets), random.Random(node), durable)


def sent(r: Replica) -> list[Message]:
    return r.ready().messages


# ------------------------------------------------------------------ codec


@pytest.mark.parametrize(
    "field",
    [
        {"ballot": ppb.PeerBallot(round=(1 << 63) - 1, node=1)},
        {"ballot": ppb.PeerBallot(round=MAX_PROTOCOL_INT, node=1)},
        {"ballot": ppb.PeerBallot(round=5, node=0)},
        {"ballot": ppb.PeerBallot(round=5, node=1 << 16)},
        {"promised": ppb.PeerBallot(round=1 << 62, node=2)},
        {"from_slot": 1 << 62},
        {"commit_index": 1 << 63},
        {"index": 1 << 62},
        {"offset": 1 << 62},
        {"src": 0},
        {"dst": 0},
        {"src": 1 << 16},
    ],
)
def test_decode_refuses_numbers_out_of_range(field: dict[str, object]) -> None:
    wire = ppb.PeerMessage(kind=ppb.PeerMessage.PREPARE, src=1, dst=2, from_slot=1)
    for name, value in field.items():
        if isinstance(value, ppb.PeerBallot):
            getattr(wire, name).CopyFrom(value)
        else:
            setattr(wire, name, value)
    with pytest.raises(ValueError, match=r"out of range|names no node"):
        decode(wire)


def test_decode_refuses_slots_out_of_range_inside_entries_and_records() -> None:
    accept = ppb.PeerMessage(kind=ppb.PeerMessage.ACCEPT, src=1, dst=2)
    accept.entries.add(slot=1 << 62, value=b"x")
    with pytest.raises(ValueError, match="out of range"):
        decode(accept)
    promise = ppb.PeerMessage(kind=ppb.PeerMessage.PROMISE, src=1, dst=2)
    promise.records.add(slot=3, ballot=ppb.PeerBallot(round=1 << 62, node=1))
    with pytest.raises(ValueError, match="out of range"):
        decode(promise)


def test_new_fields_round_trip() -> None:
    msgs: list[Message] = [
        Promise(2, 1, (3, 1), True, (3, 1), (Record(5, (2, 2), b"v"),), 4, 5, 6),
        InstallSnapshot(1, 2, 9, b"chunk", 9, 1 << 20, 3 << 20, b"d" * 32),
        SnapshotRequest(2, 1, 9, 1 << 20),
    ]
    for msg in msgs:
        assert decode(encode(msg)) == msg
        assert approx_size(msg) >= encode(msg).ByteSize()


# ------------------------------------------------------------------- core


def test_the_core_drops_strangers_and_absurd_numbers() -> None:
    r = replica(2)
    r.step(Prepare(7, 2, (5, 7), 1))  # not a member
    r.step(Prepare(1, 2, ((1 << 63) - 1, 1), 1))  # a round SQLite cannot hold
    r.step(Accept(1, 2, (5, 1), ((1 << 62, b"x"),), 0))
    out = r.ready()
    assert out.empty()
    assert r.promised == (0, 0)
    assert not r.log


def test_a_promise_over_its_budget_comes_in_parts_and_counts_only_whole() -> None:
    records = {s: Record(s, (1, 3), bytes([s]) * 10) for s in range(1, 6)}
    acceptor = replica(2, DurableState(records=dict(records)), max_promise_bytes=25)
    candidate = replica(1)
    ballot = (7, 1)
    candidate.role, candidate.ballot, candidate.prepare_from = Role.CANDIDATE, ballot, 1
    candidate.promises[1] = Promise(1, 1, ballot, True, ballot, (), 0, 1)

    acceptor.step(Prepare(1, 2, ballot, 1))
    [first] = sent(acceptor)
    assert isinstance(first, Promise)
    assert [r.slot for r in first.records] == [1, 2]
    assert first.more_from == 3
    candidate.step(first)
    assert candidate.role is Role.CANDIDATE  # half a promise is no vote
    [ask] = [m for m in sent(candidate) if isinstance(m, Prepare)]
    assert ask.from_slot == 3
    assert ask.ballot == ballot
    candidate.step(first)  # a duplicate of an old part changes nothing
    assert candidate.role is Role.CANDIDATE

    acceptor.step(ask)  # same ballot: answered though the acceptor follows nobody new
    [second] = sent(acceptor)
    assert isinstance(second, Promise)
    assert second.more_from == 5
    candidate.step(second)
    [ask] = [m for m in sent(candidate) if isinstance(m, Prepare)]
    acceptor.step(ask)
    [last] = sent(acceptor)
    assert isinstance(last, Promise)
    assert last.more_from == 0
    candidate.step(last)
    assert candidate.role.value == "leader"
    # Every reported value is re-proposed: nothing was lost between parts.
    assert candidate.recovered == {s: r.value for s, r in records.items()}


def test_a_record_larger_than_the_budget_goes_alone() -> None:
    big = Record(1, (1, 3), b"x" * 100)
    acceptor = replica(
        2, DurableState(records={1: big, 2: Record(2, (1, 3), b"y")}), max_promise_bytes=10
    )
    acceptor.step(Prepare(1, 2, (7, 1), 1))
    [p] = sent(acceptor)
    assert isinstance(p, Promise)
    assert p.records == (big,)
    assert p.more_from == 2


def test_accepts_and_reoffers_are_bounded_in_bytes() -> None:
    leader = replica(1, max_batch_bytes=10, max_reoffer_bytes=10, max_inflight_bytes=40)
    leader.role, leader.ballot = Role.LEADER, (2, 1)
    assert leader.propose(b"a" * 30) == 1
    assert leader.propose(b"b" * 8) == 2
    assert leader.propose(b"c" * 8) is None  # 46 bytes would be in flight
    accepts = [m for m in sent(leader) if isinstance(m, Accept) and m.dst == 2]
    assert [[s for s, _ in a.entries] for a in accepts] == [[1], [2]]  # the big one alone
    leader._heartbeat()
    reoffers = [m for m in sent(leader) if isinstance(m, Accept) and m.dst == 2]
    assert [[s for s, _ in a.entries] for a in reoffers] == [[1]]  # at most the budget


def _transfer(
    leader: Replica, follower: Replica, drop: set[int] | None = None
) -> list[InstallSnapshot]:
    """Run the pull loop between the two; drop chunks at the offsets in ``drop`` once."""
    chunks: list[InstallSnapshot] = []
    leader.step(CatchupRequest(2, 1, follower.commit_index + 1))
    pending = sent(leader)
    for _ in range(1000):
        if not pending:
            break
        for msg in pending:
            if isinstance(msg, InstallSnapshot):
                chunks.append(msg)
                if drop and msg.offset in drop:
                    drop.discard(msg.offset)
                    continue
                follower.step(msg)
        for msg in sent(follower):
            if msg.dst == 1 and isinstance(msg, SnapshotRequest | CatchupRequest):
                leader.step(msg)
        pending = sent(leader)
    return chunks


def test_a_snapshot_travels_in_pulled_chunks_and_installs_whole() -> None:
    data = bytes(range(256)) * 40  # 10,240 bytes
    leader = replica(
        1, DurableState(snapshot=(50, data), commit_index=50), snapshot_chunk_bytes=1000
    )
    follower = replica(2)
    follower.known_commit = 50
    chunks = _transfer(leader, follower)
    assert [c.offset for c in chunks] == list(range(0, 10_240, 1000))
    assert all(c.total == len(data) and c.sha256 == sha256(data).digest() for c in chunks)
    assert follower.commit_index == 50
    assert read_all(follower.snapshot_blob) == data
    assert not follower.installing_snapshot


@pytest.mark.parametrize("window", [1, 4])
def test_a_lost_chunk_resumes_from_its_offset_not_from_zero(window: int) -> None:
    data = b"s" * 5000
    leader = replica(
        1,
        DurableState(snapshot=(9, data), commit_index=9),
        snapshot_chunk_bytes=1000,
        snapshot_window=window,
    )
    follower = replica(2, snapshot_window=window)
    follower.known_commit = 9
    chunks = _transfer(leader, follower, drop={3000})
    assert follower.installing_snapshot  # stalled at 3000
    # With a window, the chunk after the lost one came anyway (and waits).
    assert [c.offset for c in chunks] == (
        [0, 1000, 2000, 3000, 4000] if window > 1 else [0, 1000, 2000, 3000]
    )
    follower.leader_id = 1
    for _ in range(follower.config.catchup_retry_ticks):
        follower.tick()  # the catch-up retry asks again...
    [ask] = [m for m in sent(follower) if isinstance(m, SnapshotRequest)]
    assert ask.offset == 3000  # ...where it stopped (4000, already here, is not asked again)
    pending: list[Message] = [ask]
    resent: list[int] = []
    while pending:
        for request in pending:
            leader.step(request)
        for chunk in sent(leader):
            assert isinstance(chunk, InstallSnapshot)
            resent.append(chunk.offset)
            follower.step(chunk)
        pending = [m for m in sent(follower) if isinstance(m, SnapshotRequest)]
    assert resent == ([3000] if window > 1 else [3000, 4000])
    assert follower.commit_index == 9
    assert read_all(follower.snapshot_blob) == data


def test_chunks_arriving_out_of_order_within_the_window_are_kept() -> None:
    data = bytes(range(256)) * 20  # 5,120 bytes: chunks at 0, 1000, ..., 5000
    leader = replica(1, DurableState(snapshot=(9, data), commit_index=9), snapshot_chunk_bytes=1000)
    follower = replica(2)
    follower.known_commit = 9
    leader.step(CatchupRequest(2, 1, 1))
    [first] = sent(leader)
    follower.step(first)
    asks = [m for m in sent(follower) if isinstance(m, SnapshotRequest)]
    assert [a.offset for a in asks] == [1000, 2000, 3000, 4000]  # a window of four
    replies = []
    for ask in asks:
        leader.step(ask)
        replies += sent(leader)
    for chunk in reversed(replies):  # the network reordered them
        follower.step(chunk)
    more = [m for m in sent(follower) if isinstance(m, SnapshotRequest)]
    assert [a.offset for a in more] == [5000]  # only the rest
    leader.step(more[0])
    [last] = sent(leader)
    follower.step(last)
    assert follower.commit_index == 9
    assert read_all(follower.snapshot_blob) == data


def test_a_snapshot_that_fails_its_digest_is_never_installed() -> None:
    follower = replica(2)
    follower.step(InstallSnapshot(1, 2, 9, b"abc", 9, 0, 3, sha256(b"abd").digest()))
    out = follower.ready()
    assert out.snapshot is None
    assert follower.commit_index == 0
    assert not follower.installing_snapshot


def test_a_node_receiving_a_snapshot_does_not_campaign() -> None:
    follower = replica(2)
    follower.step(InstallSnapshot(1, 2, 9, b"abc", 9, 0, 6, sha256(b"abcdef").digest()))
    assert follower.installing_snapshot
    sent(follower)
    for _ in range(2 * follower.config.election_ticks):
        follower.tick()
    assert follower.role is Role.FOLLOWER
    assert not [m for m in sent(follower) if isinstance(m, Prepare | PreVote)]
    # ...but a transfer that stalls for good (its source died) is given up,
    # so the node can campaign again (a pre-vote first).
    for _ in range(6 * follower.config.election_ticks):
        follower.tick()
    assert not follower.installing_snapshot
    assert [m for m in sent(follower) if isinstance(m, PreVote)]


# -------------------------------------------------------------- transport


def test_batches_are_bounded_in_bytes_and_parse_as_peer_batches() -> None:
    from pqueue.node import peers
    from pqueue.node.peer_codec import EntryCache, encode_wire

    cache = EntryCache()
    link = peers._Link(1, 2, "127.0.0.1:1", None, lambda: ())
    big = b"x" * peers.MAX_BATCH_BYTES  # over the budget with its framing
    msgs: list[Message] = [
        Accept(1, 2, (3, 1), ((1, big),), 0),
        Accept(1, 2, (3, 1), ((2, b"small"), (3, b"s")), 0),
        Prepare(1, 2, (4, 1), 7),
    ]
    for msg in msgs:
        wire = encode_wire(msg, cache)
        link.put(wire, sum(map(len, wire)))
    first = ppb.PeerBatch.FromString(link.take_batch())
    second = ppb.PeerBatch.FromString(link.take_batch())
    # The big accept alone (the next would pass the budget), then the rest.
    assert [decode(m) for m in first.messages] == msgs[:1]
    assert [decode(m) for m in second.messages] == msgs[1:]
    assert not link.queue
    assert link.queued_bytes == 0


def test_a_link_queue_drops_its_oldest_past_its_byte_bound() -> None:
    from pqueue.node import peers

    link = peers._Link(1, 2, "127.0.0.1:1", None, lambda: ())
    chunk = 16 << 20
    for k in range(peers.MAX_QUEUED_BYTES // chunk + 3):
        link.put([bytes([k])], chunk)
    assert link.queued_bytes <= peers.MAX_QUEUED_BYTES
    assert link.dropped == 3
    link.put([b"y"], 1 << 30)  # could never be delivered: dropped at once
    assert link.queued_bytes <= peers.MAX_QUEUED_BYTES


def test_an_accept_entry_is_encoded_once_for_every_peer_and_retry() -> None:
    from pqueue.node.peer_codec import EntryCache, encode_wire

    cache = EntryCache()
    value = b"v" * 1000
    for dst in (2, 3):
        for _ in range(5):  # the first offer, then heartbeat re-offers
            wire = encode_wire(Accept(1, dst, (3, 1), ((9, value),), 0), cache)
            assert decode(ppb.PeerMessage.FromString(b"".join(wire))) == Accept(
                1, dst, (3, 1), ((9, value),), 0
            )
    assert cache.encoded == 1
    reply = CatchupReply(1, 2, ((9, value), (10, b"w")), 10)
    for _ in range(3):
        wire = encode_wire(reply, cache)
        assert decode(ppb.PeerMessage.FromString(b"".join(wire))) == reply
    assert cache.encoded == 3  # the chosen values once each, apart from the accept


def test_a_candidate_behind_our_compacted_log_gets_no_vote() -> None:
    acceptor = replica(2, DurableState(snapshot=(40, b"state"), commit_index=40))
    acceptor.step(Prepare(1, 2, (9, 1), 5))  # it holds only up to slot 4
    [refusal] = sent(acceptor)
    assert isinstance(refusal, Promise)
    assert not refusal.ok
    assert acceptor.promised == (0, 0)
    acceptor.step(Prepare(3, 2, (9, 3), 41))  # one that has what we compacted
    [vote] = sent(acceptor)
    assert isinstance(vote, Promise)
    assert vote.ok


def test_an_older_node_gets_answers_whole_never_in_parts() -> None:
    # An older node's Prepare and CatchupRequest lack the ``parts`` field.
    old = ppb.PeerMessage(kind=ppb.PeerMessage.PREPARE, src=1, dst=2, from_slot=1)
    old.ballot.CopyFrom(ppb.PeerBallot(round=7, node=1))
    prepare = decode(old)
    assert isinstance(prepare, Prepare)
    assert not prepare.parts
    records = {s: Record(s, (1, 3), b"r" * 10) for s in range(1, 4)}
    acceptor = replica(2, DurableState(records=records), max_promise_bytes=1)
    acceptor.step(prepare)
    [promise] = sent(acceptor)
    assert isinstance(promise, Promise)
    assert len(promise.records) == 3
    assert promise.more_from == 0

    data = b"d" * 5000
    leader = replica(1, DurableState(snapshot=(9, data), commit_index=9), snapshot_chunk_bytes=10)
    request = decode(
        ppb.PeerMessage(kind=ppb.PeerMessage.CATCHUP_REQUEST, src=2, dst=1, from_slot=1)
    )
    leader.step(request)
    [whole] = sent(leader)
    assert isinstance(whole, InstallSnapshot)
    assert whole.data == data


def test_a_transfer_survives_its_source_compacting_again_and_the_lead_moving() -> None:
    # At a high write rate the source compacts again long before a big
    # snapshot has crossed; and the lead may move meanwhile. Neither may
    # restart the transfer (it would never finish): the follower goes on
    # pulling from its source, which keeps the snapshot being pulled.
    data = b"s" * 5000
    source = replica(1, DurableState(snapshot=(9, data), commit_index=9), snapshot_chunk_bytes=1000)
    follower = replica(2)
    follower.known_commit = 9
    _transfer(source, follower, drop={3000})
    assert follower.installing_snapshot  # stalled at 3000
    source.emitted = source.commit_index = 30
    source.compact(30, b"n" * 7000)  # a newer snapshot replaces the one being pulled
    follower.leader_id = 3  # and another node leads now
    for _ in range(follower.config.catchup_retry_ticks):
        follower.tick()
    [ask] = [m for m in sent(follower) if isinstance(m, SnapshotRequest)]
    assert (ask.dst, ask.index, ask.offset) == (1, 9, 3000)  # its source, where it stopped
    pending: list[Message] = [ask]
    while pending:
        for request in pending:
            source.step(request)
        for chunk in sent(source):
            assert isinstance(chunk, InstallSnapshot)
            assert chunk.index == 9
            follower.step(chunk)
        pending = [m for m in sent(follower) if isinstance(m, SnapshotRequest)]
    assert follower.commit_index == 9
    assert read_all(follower.snapshot_blob) == data


class _Sink(MemorySink):
    """A sink that says what happened to it (and can fail to keep the bytes)."""

    def __init__(self, keeps: bool = True) -> None:
        super().__init__()
        self.keeps = keeps
        self.aborted = False

    def finish(self, digest: bytes) -> Blob | None:
        return super().finish(digest) if self.keeps else None

    def abort(self) -> None:
        self.aborted = True
        super().abort()


def test_a_snapshot_the_sink_cannot_keep_is_not_installed() -> None:
    data = b"k" * 3000
    leader = replica(1, DurableState(snapshot=(9, data), commit_index=9), snapshot_chunk_bytes=1000)
    sinks: list[_Sink] = []

    def failing(index: int, total: int) -> BlobSink:
        sinks.append(_Sink(keeps=False))
        return sinks[-1]

    follower = Replica(Config(node_id=2, nodes=NODES), random.Random(2), None, sinks=failing)
    follower.known_commit = 9
    _transfer(leader, follower)
    assert len(sinks) == 1
    assert follower.commit_index == 0  # e.g. a full disk: nothing installed
    assert follower.ready().snapshot is None
    assert not follower.installing_snapshot  # the catch-up retry starts over


def test_a_newer_snapshot_or_a_stall_discards_the_bytes_received() -> None:
    sinks: list[_Sink] = []

    def recording(index: int, total: int) -> BlobSink:
        sinks.append(_Sink())
        return sinks[-1]

    follower = Replica(Config(node_id=2, nodes=NODES), random.Random(2), None, sinks=recording)
    old, new = b"o" * 3000, b"n" * 3000
    follower.step(InstallSnapshot(1, 2, 9, old[:1000], 9, 0, 3000, sha256(old).digest()))
    follower.step(InstallSnapshot(1, 2, 20, new[:1000], 20, 0, 3000, sha256(new).digest()))
    assert [s.aborted for s in sinks] == [True, False]  # the older transfer's file goes
    follower.leader_id = 1
    for _ in range(4 * (follower.config.catchup_retry_ticks + 1)):
        follower.tick()  # no chunk comes: the transfer is given up
    assert not follower.installing_snapshot
    assert [s.aborted for s in sinks] == [True, True]


def _served_then_compacted(**config: int) -> Replica:
    """A leader that served the snapshot at 9, then compacted to 30."""
    data = b"s" * 3000
    records = {s: Record(s, (1, 1), b"v%d" % s, chosen=True) for s in range(10, 31)}
    leader = replica(
        1,
        DurableState(snapshot=(9, data), commit_index=30, records=records),
        snapshot_chunk_bytes=1000,
        **config,
    )
    leader.ready()  # applies up to 30
    follower = replica(2)
    follower.known_commit = 9
    _transfer(leader, follower)
    assert follower.commit_index >= 9  # it has the snapshot at 9 (and restores it, slowly)
    leader.compact(30, b"n" * 3000)
    return leader


def test_after_a_snapshot_the_follower_goes_on_from_the_log_not_a_newer_snapshot() -> None:
    # A big state restores for longer than the log takes to reach the next
    # snapshot: pulled snapshot after snapshot, the follower would never end.
    leader = _served_then_compacted()
    leader.step(CatchupRequest(2, 1, 10))
    [reply] = sent(leader)
    assert isinstance(reply, CatchupReply)
    assert [s for s, _ in reply.entries] == list(range(10, 31))
    assert reply.entries[0][1] == b"v10"


def test_the_log_held_for_a_catch_up_goes_after_a_while_or_past_its_budget() -> None:
    leader = _served_then_compacted(catchup_hold_ticks=5)
    for _ in range(6):
        leader.tick()
    sent(leader)
    leader.step(CatchupRequest(2, 1, 10))
    [reply] = sent(leader)
    assert isinstance(reply, InstallSnapshot)  # nobody came back for it in time
    assert reply.index == 30
    assert not [s for s in leader.log if s <= 30]

    leader = _served_then_compacted(catchup_hold_bytes=10)  # 21 values of 3-4 bytes
    leader.step(CatchupRequest(2, 1, 10))
    [reply] = sent(leader)
    assert isinstance(reply, InstallSnapshot)
    assert not [s for s in leader.log if s <= 30]


def test_a_leader_that_served_no_snapshot_holds_no_log() -> None:
    records = {s: Record(s, (1, 1), b"v", chosen=True) for s in range(1, 31)}
    leader = replica(1, DurableState(records=records, commit_index=30))
    leader.ready()
    leader.compact(30, b"state")
    assert not leader.log
    leader.step(CatchupRequest(2, 1, 5))
    [reply] = sent(leader)
    assert isinstance(reply, InstallSnapshot)
