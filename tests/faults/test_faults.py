"""Faults on real processes, checked against the history (lost = 0, unexpected = 0).

Each scenario runs producers and consumers through the cluster's multi-address
endpoint, injects its fault, heals, drains the queue, and prints the counts.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from tests import pg
from tests.faults import workload
from tests.faults.cluster import ProcCluster, started
from tests.faults.history import History

Fault = Callable[[ProcCluster], Awaitable[None]]


async def scenario(
    cluster: ProcCluster,
    fault: Fault,
    settle_s: float = 2.0,
    history: History | None = None,
    endpoint: str = "",
) -> dict[str, int]:
    """Load through ``endpoint`` (default: every node), the fault, then the check."""
    endpoint = endpoint or cluster.endpoint
    history = history or History()
    stop = asyncio.Event()
    load = asyncio.create_task(workload.run(endpoint, history, stop))
    await asyncio.sleep(1.5)
    await fault(cluster)
    await asyncio.sleep(settle_s)
    stop.set()
    await load
    await workload.drain(endpoint, history)
    counts = history.check()
    print(f"\n{counts}")
    history.assert_safe()
    assert counts["enqueued"] > 50, counts  # the workload really ran
    return counts


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[ProcCluster]:
    async with started(tmp_path) as c:
        yield c


@pytest.fixture
async def pg_cluster(tmp_path: Path) -> AsyncIterator[ProcCluster]:
    """The same cluster, each node keeping its log in a PostgreSQL schema; its
    peers talk over their gRPC streams (no ``--peer-ports``: the transport of
    a node without a peer port, kept under fault tests here)."""
    prefix = pg.new_schema("pq_fault")
    c = ProcCluster(tmp_path, store=pg.dsn(), schema_prefix=prefix, peer_tcp=False)
    try:
        await c.start()
        yield c
    finally:
        await c.stop()
        await pg.drop_schemas(*(c.schema(i) for i in range(1, c.n + 1)))


@pytest.fixture
async def partitionable(tmp_path: Path) -> AsyncIterator[ProcCluster]:
    async with started(tmp_path, partitionable=True) as c:
        yield c


async def kill_9_of_the_leader(c: ProcCluster) -> None:
    old = await c.leader()
    c.kill9(old)
    new = await c.leader(among=[i for i in c.ports if i != old])
    assert new != old
    await asyncio.sleep(1.5)
    c.launch(old)  # it rejoins


async def test_kill_9_of_the_leader_under_load(cluster: ProcCluster) -> None:
    await scenario(cluster, kill_9_of_the_leader)


async def test_kill_9_of_the_leader_on_postgres(pg_cluster: ProcCluster) -> None:
    await scenario(pg_cluster, kill_9_of_the_leader)


async def test_kill_9_of_a_follower_under_load(cluster: ProcCluster) -> None:
    async def fault(c: ProcCluster) -> None:
        leader = await c.leader()
        follower = next(i for i in c.ports if i != leader)
        c.kill9(follower)
        await asyncio.sleep(1.5)
        assert await c.leader() == leader  # nothing to elect
        c.launch(follower)

    await scenario(cluster, fault)


async def test_a_paused_leader_steps_down_when_it_wakes(cluster: ProcCluster) -> None:
    async def fault(c: ProcCluster) -> None:
        old = await c.leader()
        c.pause(old)  # SIGSTOP past the election timeout
        new = await c.leader(among=[i for i in c.ports if i != old])
        await asyncio.sleep(1.0)
        c.resume(old)
        await asyncio.sleep(1.5)
        leader = await c.leader()  # one leader again: no split brain
        assert leader in c.ports
        assert new != old

    await scenario(cluster, fault)


async def whole_cluster_kill_9_and_restart(c: ProcCluster) -> None:
    for i in c.ports:
        c.kill9(i)
    await asyncio.sleep(0.5)
    for i in c.ports:
        c.launch(i)
    await c.leader()


async def test_whole_cluster_kill_9_and_restart(cluster: ProcCluster) -> None:
    await scenario(cluster, whole_cluster_kill_9_and_restart, settle_s=3.0)


async def test_whole_cluster_kill_9_and_restart_on_postgres(pg_cluster: ProcCluster) -> None:
    await scenario(pg_cluster, whole_cluster_kill_9_and_restart, settle_s=3.0)


async def test_a_minority_partition_keeps_the_majority_serving(partitionable: ProcCluster) -> None:
    history = History()

    async def fault(c: ProcCluster) -> None:
        leader = await c.leader()
        c.isolate(leader)  # the leader alone: the minority
        majority = [i for i in c.ports if i != leader]
        new = await c.leader(among=majority)
        assert new in majority
        from pqueue.client import Client
        from pqueue.errors import PQueueError

        async with Client(c.address(leader), timeout_s=2, max_retries=0) as alone:
            # The minority never acknowledges a write. The old leader may
            # still have accepted this one into its own log, and a later
            # leader whose phase 1 reaches it may commit it: a failed write's
            # outcome is unknown, as with any timeout, so it counts as tried.
            history.enqueue_attempt(b"from-the-minority")
            with pytest.raises(PQueueError):
                await alone.enqueue(workload.QUEUE, b"from-the-minority")
        await asyncio.sleep(1.0)
        c.heal()

    await scenario(partitionable, fault, settle_s=3.0, history=history)
