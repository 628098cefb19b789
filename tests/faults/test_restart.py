"""A node with a large log restarts after ``kill -9`` and serves every job (issue 14).

Batches of 1,000 jobs make few, large log entries: 100,000 jobs are 100
entries, far from the 10,000-entry snapshot rule, so the restart replays all
of them. Before the fix, a replay longer than the lone node's 10 s wait for
leadership killed it with ``cannot run: `` and an empty message; the second
test makes the replay that long on any machine (``tests.faults.slow_apply``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from pqueue.client import Client, job_spec
from pqueue.errors import PQueueError
from tests.faults.cluster import ProcCluster, started

QUEUE = "backlog"
PAYLOAD = b"p" * 100


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[ProcCluster]:
    """One real ``pq node`` process (a cluster of one)."""
    async with started(tmp_path, nodes=1) as c:
        yield c


async def fill(address: str, jobs: int, batch: int = 1_000, in_flight: int = 8) -> None:
    """``jobs`` jobs of 100 bytes, priorities 0..9, in batches, several calls at once."""
    calls = asyncio.Semaphore(in_flight)
    async with Client(address, timeout_s=60) as c:

        async def one(b: int) -> None:
            specs = [job_spec(PAYLOAD, priority=(b + i) % 10) for i in range(batch)]
            async with calls:
                await c.enqueue_batch(QUEUE, specs)

        await asyncio.gather(*(one(b) for b in range(jobs // batch)))


async def ready_after_restart(node: ProcCluster, timeout_s: float) -> int:
    """Wait for the restarted node to answer; its ready count (it must not exit)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        code = node.procs[1].poll()
        assert code is None, f"the node exited with {code}:\n{log_tail(node)}"
        try:
            async with Client(node.address(1), timeout_s=2, max_retries=0) as c:
                (stats,) = await c.stats(QUEUE)
                return stats.ready
        except PQueueError:
            await asyncio.sleep(0.2)
    raise AssertionError(f"no answer in {timeout_s:g} s:\n{log_tail(node)}")


def log_tail(node: ProcCluster) -> str:
    """The node's last lines, without the lines each request logs."""
    lines = (node.root / "n1.log").read_text().splitlines()
    return "\n".join([line for line in lines if "Received " not in line][-12:])


async def lease_one(address: str, jobs: int) -> None:
    """A lease succeeds; the other ``jobs - 1`` stay ready."""
    async with Client(address, timeout_s=10) as c:
        (job,) = await c.lease(QUEUE, max_jobs=1, lease_ms=60_000)
        assert job.payload == PAYLOAD
        (stats,) = await c.stats(QUEUE)
        assert (stats.ready, stats.leased) == (jobs - 1, 1)


async def test_a_node_restarts_after_kill_9_with_100k_jobs_in_its_log(node: ProcCluster) -> None:
    await fill(node.address(1), 100_000)
    node.kill9(1)
    node.launch(1)
    assert await ready_after_restart(node, timeout_s=60) == 100_000
    await lease_one(node.address(1), 100_000)
    assert "(no message)" not in (node.root / "n1.log").read_text()


async def test_a_replay_longer_than_the_wait_for_leadership_still_serves(
    node: ProcCluster,
) -> None:
    """12 entries of one command each, 1 s each to apply: 11 s to replay the
    stored commit index (the last entry's commit is not stored yet), past
    the 10 s the node once gave itself to lead; nothing fails meanwhile."""
    await fill(node.address(1), 12_000, in_flight=1)
    node.kill9(1)
    node.launch(1, program=("-m", "tests.faults.slow_apply", "1.0"))
    assert await ready_after_restart(node, timeout_s=60) == 12_000
    await lease_one(node.address(1), 12_000)
    log = (node.root / "n1.log").read_text()
    assert "cannot run" not in log
    assert "(no message)" not in log
