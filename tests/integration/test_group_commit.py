"""Group commit: while the leader's entry is open, new commands wait and go
together in the next one (``ClusterConfig.open_entries``)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from pqueue.client import Client
from pqueue.node.replicated import ReplicatedLog
from pqueue.storage.base import Storage
from tests.inproc import Cluster


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    # Slow ticks: the followers may hold their answers for a while without
    # the leader giving up its lead (an election timeout is 1-2 s).
    c = Cluster(tmp_path, cluster_options={"tick_ms": 100})
    await c.start()
    try:
        yield c
    finally:
        await c.stop()


def gate_persist(storage: Storage, gate: asyncio.Event) -> None:
    """Make ``storage`` wait for ``gate`` before each durable write (a slow disk)."""
    persist: Callable[..., Any] = storage.persist

    async def gated(*args: Any) -> None:
        await gate.wait()
        await persist(*args)

    storage.persist = gated  # type: ignore[method-assign,assignment]


async def until(check: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.005)


async def test_commands_arriving_while_an_entry_is_open_share_the_next_entry(
    cluster: Cluster,
) -> None:
    leader = await cluster.leader()
    # One call per enqueue (no SDK batching): the node must do the grouping.
    async with Client(cluster.addresses[leader], max_retries=0, batching=False) as c:
        await c.create_queue("q")
        log = cluster.servers[leader].node.log
        assert isinstance(log, ReplicatedLog)
        gate = asyncio.Event()
        for i, server in cluster.servers.items():
            if i != leader:
                gate_persist(server.node.storage, gate)
        try:
            first = asyncio.create_task(c.enqueue("q", b"first"))
            # The first entry is proposed at once, and stays open: no follower
            # has made it durable.
            await until(lambda: log.status().pending == 1 and not log._proposals)
            rest = [asyncio.create_task(c.enqueue("q", f"job-{k}")) for k in range(5)]
            await until(lambda: len(log._proposals) == 5)  # held: an entry is open
        finally:
            gate.set()
        answers = await asyncio.gather(*rest)
        opened = await first
    assert {a.log_index for a in answers} == {opened.log_index + 1}  # one entry, next
    await cluster.settled()
