"""A leader that loses its term and wins the next one before its own
promise counts: what it proposed in the old term, at a slot the new term's
quorum knows nothing of, fails (outcome unknown, retriable) instead of
waiting for a slot nothing will fill.

That proposal was the tick loop's ``Tick(lifecycle=True)`` in a CI failure
(``Cluster.leader()``: "no single leader"): the loop awaited it forever and
the leader never turned the lifecycle on. The peers are played by hand here
(their messages fed to the node's log), so the order is exact."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import pytest

from consensus import ZERO, Record
from consensus.messages import (
    Accept,
    Accepted,
    Ballot,
    Message,
    Prepare,
    PreVote,
    PreVoteReply,
    Promise,
)
from pqueue.errors import UnavailableError
from pqueue.node.queue_node import QueueNode
from pqueue.node.replicated import ClusterConfig, ReplicatedLog
from pqueue.storage.base import StoredSnapshot
from pqueue.storage.sqlite import SqliteStorage
from pqueue.v1 import log_pb2 as logpb

M = TypeVar("M")


async def _sent(sent: list[Message], kind: type[M], match: Callable[[M], bool]) -> M:
    """The first message of ``kind`` matching ``match`` that the node sent."""
    async with asyncio.timeout(5):
        while True:
            for msg in sent:
                if isinstance(msg, kind) and match(msg):
                    return msg
            await asyncio.sleep(0.001)


async def _leads(log: ReplicatedLog, ballot: Ballot | None = None) -> None:
    async with asyncio.timeout(5):
        while True:
            assert log.replica is not None
            if log.is_leader and ballot in (None, log.replica.status().ballot):
                return
            await asyncio.sleep(0.001)


@pytest.mark.parametrize("peer_holds_it", [False, True], ids=["unknown", "known"])
async def test_a_proposal_the_next_term_did_not_take_up_fails(
    tmp_path: Path, peer_holds_it: bool
) -> None:
    """unknown: no peer of the new term's quorum accepted slot 1, so the
    new term starts there (``next_slot`` 1) and the old proposal fails at
    once. known: a peer reports it, so the new term proposes it again and
    the caller gets its result, as before the change."""
    storage = SqliteStorage(tmp_path / "n1")
    # Ticks only when the test says: the election timer never fires by itself.
    cluster = ClusterConfig(node_id=1, addresses={1: "", 2: "-", 3: "-"}, tick_ms=3_600_000)
    log = QueueNode(storage, cluster=cluster).log
    assert isinstance(log, ReplicatedLog)
    sent: list[Message] = []
    log._send = sent.append
    # This node's own promise of round 2 stays in its write until released.
    release = asyncio.Event()
    persist = storage.persist

    async def slow_promise(
        promised: Ballot | None,
        records: Sequence[Record],
        commit_index: int | None,
        snapshot: StoredSnapshot | None,
    ) -> None:
        if promised is not None and promised[0] == 2:
            await release.wait()
        await persist(promised, records, commit_index, snapshot)

    storage.persist = slow_promise  # type: ignore[method-assign]
    await log.start()
    try:
        replica = log.replica
        assert replica is not None
        for _ in range(2 * cluster.election_ticks):  # its election timeout: a pre-vote
            replica.tick()
        log._wake.set()
        pre = await _sent(sent, PreVote, lambda m: m.dst == 2)
        log.on_message(
            PreVoteReply(src=2, dst=1, ballot=pre.ballot, ok=True, promised=ZERO, commit_index=0)
        )
        first = await _sent(sent, Prepare, lambda m: m.dst == 2)
        log.on_message(
            Promise(
                src=2, dst=1, ballot=first.ballot, ok=True, promised=first.ballot,
                from_slot=first.from_slot,
            )
        )  # fmt: skip
        await _leads(log)

        # It leads (round 1) and proposes at slot 1 (the lifecycle tick, say)...
        proposed = asyncio.ensure_future(log.submit(logpb.Command(tick=logpb.Tick())))
        accept = await _sent(sent, Accept, lambda m: m.dst == 2)
        [(slot, value)] = accept.entries
        assert slot == 1
        # ...but node 2 promised node 3's ballot 1.3 meanwhile and refuses it:
        # still followed by a majority, the leader runs phase 1 again.
        log.on_message(Accepted(src=2, dst=1, ballot=first.ballot, ok=False, promised=(1, 3)))
        again = await _sent(sent, Prepare, lambda m: m.ballot[0] == 2)
        # Nodes 2 and 3 promise it before this node's own promise is
        # written: it leads again on what they report alone.
        for peer in (2, 3):
            held = (Record(1, first.ballot, value),) if peer_holds_it and peer == 3 else ()
            log.on_message(
                Promise(
                    src=peer, dst=1, ballot=again.ballot, ok=True, promised=again.ballot,
                    records=held, from_slot=again.from_slot,
                )
            )  # fmt: skip
        status = replica.status()
        assert (status.role.value, status.ballot) == ("leader", again.ballot)
        assert status.next_slot == (2 if peer_holds_it else 1)
        release.set()
        await _leads(log, again.ballot)

        if not peer_holds_it:
            # Nothing fills slot 1 until the next proposal: the caller learns now.
            with pytest.raises(UnavailableError) as err:
                async with asyncio.timeout(2):
                    await proposed
            assert err.value.reason == "COMMIT_UNKNOWN"
            assert "did not take the slot up" in str(err.value)
            return
        # The new term proposes slot 1's value again; once a peer accepts it
        # the caller has its result.
        redo = await _sent(sent, Accept, lambda m: m.ballot == again.ballot and m.dst == 2)
        assert redo.entries == ((1, value),)
        log.on_message(
            Accepted(src=2, dst=1, ballot=again.ballot, ok=True, promised=again.ballot, slots=(1,))
        )
        async with asyncio.timeout(5):
            result = await proposed  # the tick's own result: no error
        assert isinstance(result, logpb.Tick)
        assert replica.status().commit_index >= 1
    finally:
        release.set()
        await log.stop()
