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
            if log.is_leader and ballot in (None, log._soft.ballot):
                return
            await asyncio.sleep(0.001)


async def test_a_proposal_the_next_term_did_not_take_up_fails(tmp_path: Path) -> None:
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
        log.on_message(PreVoteReply(2, 1, pre.ballot, True, ZERO, 0))
        first = await _sent(sent, Prepare, lambda m: m.dst == 2)
        log.on_message(Promise(2, 1, first.ballot, True, first.ballot, (), 0, first.from_slot))
        await _leads(log)

        # It leads (round 1) and proposes at slot 1 (the lifecycle tick, say)...
        proposed = asyncio.ensure_future(log.submit(logpb.Command(tick=logpb.Tick())))
        await _sent(sent, Accept, lambda m: m.dst == 2)
        # ...but node 2 promised node 3's ballot 1.3 meanwhile and refuses it:
        # still followed by a majority, the leader runs phase 1 again.
        log.on_message(Accepted(2, 1, first.ballot, False, (1, 3)))
        again = await _sent(sent, Prepare, lambda m: m.ballot[0] == 2)
        # Nodes 2 and 3 promise it (neither accepted slot 1) before this
        # node's own promise is written: it leads again without its record.
        for peer in (2, 3):
            log.on_message(
                Promise(peer, 1, again.ballot, True, again.ballot, (), 0, again.from_slot)
            )
        status = replica.status()
        assert (status.role.value, status.ballot, status.next_slot) == ("leader", again.ballot, 1)
        release.set()
        await _leads(log, again.ballot)

        # Nothing fills slot 1 until the next proposal: the caller learns now.
        with pytest.raises(UnavailableError) as err:
            async with asyncio.timeout(2):
                await proposed
        assert err.value.reason == "COMMIT_UNKNOWN"
    finally:
        release.set()
        await log.stop()
