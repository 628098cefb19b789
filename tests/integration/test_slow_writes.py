"""A node whose disk stalls says so: a durable write slower than
``SLOW_WRITE_S`` is a WARNING naming the node and how long it took (one line
per ``SLOW_WRITE_LOG_EVERY_S`` at most); writes at the disk's pace are not
told."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from pqueue.client import Client
from pqueue.node.replicated import SlowWrites
from tests.disk import FaultyDisk
from tests.inproc import Cluster


def test_slow_writes_are_told_at_most_once_a_while_with_the_rest_counted() -> None:
    slow = SlowWrites(over_s=0.1, every_s=10.0)
    assert slow.note(0.05, now=100.0) is None  # at the disk's pace
    assert slow.note(0.1, now=100.0) is None  # not over
    assert slow.note(0.15, now=100.0) == "a durable write took 150 ms (over 100 ms)"
    assert slow.note(0.3, now=101.0) is None  # told within the last 10 s
    assert slow.note(0.09, now=105.0) is None
    assert slow.note(0.2, now=112.0) == (
        "a durable write took 200 ms (over 100 ms); 2 such in the last 12 s, the slowest 300 ms"
    )
    # A new window: its slowest is its own, not the last window's 300 ms.
    assert slow.note(0.12, now=123.0) == "a durable write took 120 ms (over 100 ms)"
    assert slow.note(0.11, now=124.0) is None
    assert slow.note(0.13, now=134.0) == (
        "a durable write took 130 ms (over 100 ms); 2 such in the last 11 s, the slowest 130 ms"
    )
    # Held back, then no slow write again: the next write past the window tells them.
    assert slow.note(0.7, now=135.0) is None
    assert slow.note(0.01, now=140.0) is None
    assert slow.note(0.01, now=150.0) == (
        "1 durable write(s) over 100 ms in the last 16 s, the slowest 700 ms"
    )
    assert slow.note(0.01, now=170.0) is None  # nothing left to tell


async def test_a_node_whose_disk_stalls_logs_it_once_for_the_lot(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    stores: dict[int, FaultyDisk] = {}

    def storage(i: int) -> FaultyDisk:
        stores[i] = FaultyDisk(tmp_path / f"n{i}")
        return stores[i]

    caplog.set_level(logging.WARNING, logger="pqueue.node.replicated")
    cluster = Cluster(tmp_path, storage=storage)
    await cluster.start()
    try:
        leader = await cluster.leader()
        stalling = next(i for i in stores if i != leader)
        async with Client(cluster.addresses[leader]) as client:
            await client.create_queue("q")
            stores[stalling].stall_s = 0.15
            for i in range(3):
                await client.enqueue("q", f"job {i}".encode())
            # The other follower's vote commits the writes meanwhile; the
            # stalling one catches up behind them.
            await asyncio.sleep(0.5)
            stores[stalling].stall_s = 0.0
    finally:
        await cluster.stop()
    said = [r.getMessage() for r in caplog.records]
    # (This machine's own disk may stall the other nodes too: only the
    # stalling node's lines are counted.)
    slow = [m for m in said if m.startswith(f"node {stalling} (follower): a durable write took ")]
    assert len(slow) == 1, said  # one line for the lot, within SLOW_WRITE_LOG_EVERY_S
    assert "commits that needed this node's vote waited for it" in slow[0]
