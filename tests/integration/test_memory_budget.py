"""``pq node --memory-budget-mb``: over budget, enqueues are refused and nothing else (issue 14)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pqueue.client import Client, job_spec
from pqueue.errors import ResourceExhaustedError
from pqueue.node.server import NodeServer
from tests.inproc import Cluster, one_node

#: Below any Python process's idle RSS: every reading is over it.
TINY = 1 << 20


def refusals(server: NodeServer) -> float | None:
    return server.metrics.registry.get_sample_value("pq_node_memory_refusals_total")


async def test_over_its_budget_a_node_refuses_enqueues_and_still_serves(tmp_path: Path) -> None:
    # No budget (the default): enqueues are taken.
    async with one_node(tmp_path) as server:
        async with Client(server.address, max_retries=0) as c:
            await c.enqueue_batch("q", [job_spec(b"a"), job_spec(b"b")])
            await c.enqueue("q", b"c")
        assert server.metrics.registry.get_sample_value("pq_node_memory_budget_bytes") == 0
    # The same node restarted with a budget below its RSS.
    async with one_node(tmp_path, memory_budget_bytes=TINY) as server:
        async with Client(server.address, max_retries=0) as c:
            with pytest.raises(ResourceExhaustedError) as refused:
                await c.enqueue("q", b"d")
            message = str(refused.value)
            assert "RSS" in message
            assert "memory budget of 1 MiB" in message
            assert "lease and ack" in message
            assert "raise the budget" in message
            with pytest.raises(ResourceExhaustedError):
                await c.enqueue_batch("q", [job_spec(b"e")])
            # Refused before proposing: nothing changed.
            (stats,) = await c.stats("q", consistent=True)
            assert (stats.ready, stats.enqueued_total) == (3, 3)
            # Consuming (what frees memory) works.
            jobs = await c.lease("q", max_jobs=3, lease_ms=10_000)
            assert sorted(j.payload for j in jobs) == [b"a", b"b", b"c"]
            await c.ack_many("q", [(j.job_id, j.lease_id) for j in jobs[:2]])
            await c.nack("q", jobs[2].job_id, jobs[2].lease_id)
            (stats,) = await c.stats("q", consistent=True)
            assert (stats.acked_total, stats.nacked_total) == (2, 1)
        registry = server.metrics.registry
        assert registry.get_sample_value("pq_node_memory_budget_bytes") == TINY
        assert refusals(server) == 2


async def test_a_follower_over_its_budget_refuses_without_forwarding(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path, server_options={"memory_budget_bytes": TINY})
    await cluster.start()
    try:
        leader = await cluster.leader()
        follower = next(i for i in cluster.servers if i != leader)
        # The single Enqueue call (a Submit is forwarded whole: the leader checks its own).
        async with Client(cluster.addresses[follower], max_retries=0, batching=False) as c:
            with pytest.raises(ResourceExhaustedError, match=f"node n{follower} is out of memory"):
                await c.enqueue("q", b"x")
        assert refusals(cluster.servers[follower]) == 1
        assert refusals(cluster.servers[leader]) == 0  # never reached it
    finally:
        await cluster.stop()
