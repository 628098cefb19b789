"""``make bench``'s pqueue columns (``bench.systems``): each cell on a cluster
no cell ran on. Real ``pq node`` and ``pq balancer`` processes."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.systems import PqCluster, PqSystem
from pqueue.client import Client
from pqueue.errors import NotFoundError


async def test_each_pqueue_cell_gets_a_cluster_no_cell_ran_on(tmp_path: Path) -> None:
    pq = PqCluster(tmp_path / "pq")
    await pq.start()
    try:
        direct = PqSystem(pq, "pq-direct")
        balanced = PqSystem(pq, "pq-balancer")
        await direct.new_queue("first")  # the first cell: the cluster start made
        before, root = dict(pq.cluster.ports), pq.cluster.root
        async with Client(direct.target(), max_retries=0) as c:
            await c.enqueue("first", b"left behind")
        await balanced.new_queue("second")  # the next cell, another column: a new cluster
        assert set(pq.cluster.ports.values()).isdisjoint(before.values())
        assert not root.exists()  # the old data went with it
        assert balanced.target() == pq.balancer
        async with Client(balanced.target(), max_retries=0) as c:
            assert [s.queue for s in await c.stats("second", consistent=True)] == ["second"]
            with pytest.raises(NotFoundError):
                await c.stats("first", consistent=True)  # nothing of the earlier cell
        assert set((await balanced.pids()).values()) == {"nodes", "balancer"}
    finally:
        await pq.stop()
