"""Rolling upgrades: a 3-node cluster where node 3 plays an older release.

Node 3 supports every log feature but ``shares`` (``NodeConfig.features``)
and announces so on its peer streams. The leader must not use queue shares
while it is a member; if an entry needing them reaches it anyway, it must
stop before applying it (log failed, NOT_SERVING, an error naming the
feature and the entry) while the others go on, and stop again on restart.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pqueue import features
from pqueue.client import Client
from pqueue.commitlog import Result
from pqueue.errors import FailedPreconditionError, NotLeaderError, UpgradeRequiredError
from pqueue.replicated import ReplicatedLog
from pqueue.snapshot import state_hash
from pqueue.v1 import log_pb2 as logpb
from pqueue.v1 import queue_pb2 as pb
from tests.inproc import Cluster

OLD = 3
OLD_FEATURES = features.SUPPORTED - {features.SHARES}
SHARED = pb.QueueConfig(shares=[pb.TenantShare(tenant="acme", weight=3)])


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    c = Cluster(tmp_path, features={OLD: OLD_FEATURES})
    await c.start()
    try:
        yield c
    finally:
        await c.stop()


async def _new_leader(cluster: Cluster) -> int:
    """The leader, once it is not the old node and has heard the old node announce."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        leader = await cluster.leader()
        if leader == OLD:  # move the lead away: restart the old node
            await cluster.stop_node(OLD)
            await cluster.leader()
            await cluster.start_node(OLD)
            continue
        if cluster.servers[leader].node.announced.get(OLD) == OLD_FEATURES:
            return leader
        await asyncio.sleep(0.05)
    raise AssertionError("no leader that has heard the old node")


def _skip_gate(cluster: Cluster) -> None:
    """Make the new nodes propose what the old one lacks (whichever leads),
    as a leader that mistook the old node's support would."""
    for i, server in cluster.servers.items():
        if i != OLD:
            server.node.check_features = lambda command: None  # type: ignore[method-assign]


async def _until(cond: Callable[[], Awaitable[bool]], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await cond():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        await asyncio.sleep(0.02)


async def test_the_leader_does_not_use_a_feature_an_old_member_lacks(cluster: Cluster) -> None:
    leader = await _new_leader(cluster)
    async with Client(cluster.addresses[leader], max_retries=3) as c:
        with pytest.raises(FailedPreconditionError) as err:
            await c.create_queue("shared", SHARED)
        assert not isinstance(err.value, NotLeaderError)
        assert "'shares'" in err.value.message
        assert f"node {OLD} has not announced 'shares'" in err.value.message
        # Everything the old node supports still works, through any node.
        await c.create_queue("plain", pb.QueueConfig(max_attempts=3))
        for k in range(5):
            await c.enqueue("plain", f"job-{k}")
    async with Client(cluster.addresses[OLD], max_retries=3) as c:
        with pytest.raises(FailedPreconditionError):  # forwarded to the leader: same answer
            await c.create_queue("shared", SHARED)
        await c.enqueue("plain", b"via the old node")
    await cluster.settled()
    for server in cluster.servers.values():
        assert "shared" not in server.node.machine.queues
        assert not server.node.log.failed.is_set()
    assert len({state_hash(s.node.machine) for s in cluster.servers.values()}) == 1


async def _health(address: str) -> int:
    async with grpc.aio.insecure_channel(address) as ch:
        reply = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
        return int(reply.status)


async def test_an_old_replica_that_meets_a_newer_entry_stops_loudly_and_the_rest_go_on(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="pqueue.node")
    leader = await _new_leader(cluster)
    async with Client(cluster.addresses[leader], max_retries=3) as c:
        await c.enqueue("plain", b"before")
    await cluster.settled()
    before = cluster.servers[OLD].node.machine.applied_index

    # Force it: a leader that skips the gate (as one that mistook the old
    # node's support would) proposes a command needing 'shares'.
    lead = cluster.servers[leader].node
    _skip_gate(cluster)
    creates: list[int] = []  # the index of the entry that creates the shared queue
    apply = lead.apply

    def watch(entry: logpb.LogEntry) -> list[Result]:
        if any(cmd.create_queue.queue == "shared" for cmd in entry.commands):
            creates.append(entry.index)
        return apply(entry)

    lead.apply = watch  # type: ignore[method-assign]
    async with Client(cluster.addresses[leader], max_retries=3) as c:
        await c.create_queue("shared", SHARED)  # a majority (the new nodes) applies it
        old = cluster.servers[OLD].node
        await asyncio.wait_for(old.log.failed.wait(), timeout=10)
        # The others go on without it.
        for k in range(5):
            await c.enqueue("shared", f"after-{k}")
    entry = creates[0]  # (a retried create may have left a second, idempotent one)
    assert entry > before

    # It applied nothing of that entry, nor anything after it.
    assert old.machine.applied_index == entry - 1
    assert "shared" not in old.machine.queues
    assert not old.serving

    async def not_serving() -> bool:
        status = await _health(cluster.addresses[OLD])
        return status == int(health_pb2.HealthCheckResponse.NOT_SERVING)

    await _until(not_serving)
    stopped = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any(
        f"log entry {entry} needs feature(s) 'shares'" in m and "Upgrade this node" in m
        for m in stopped
    ), stopped

    # Every replica that applied is in the same state.
    news = [s for i, s in cluster.servers.items() if i != OLD]

    async def level() -> bool:
        return len({s.node.machine.applied_index for s in news}) == 1

    await _until(level)
    assert len({state_hash(s.node.machine) for s in news}) == 1
    assert all(len(s.node.machine.queues["shared"].jobs) == 5 for s in news)

    # Restarted, still old: it stops again, the same way, at the same entry.
    caplog.clear()
    await cluster.stop_node(OLD)
    await cluster.start_node(OLD)
    old = cluster.servers[OLD].node
    await asyncio.wait_for(old.log.failed.wait(), timeout=10)
    assert old.machine.applied_index == entry - 1
    assert "shared" not in old.machine.queues
    stopped = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any(f"log entry {entry} needs feature(s) 'shares'" in m for m in stopped), stopped


async def test_an_old_replica_stops_at_a_snapshot_that_needs_a_feature_it_lacks(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    """Behind the leader's compacted log, the old node is sent a snapshot
    whose state came from an entry needing 'shares': it must not install it."""
    caplog.set_level(logging.ERROR, logger="pqueue.node")
    leader = await _new_leader(cluster)
    async with Client(cluster.addresses[leader], max_retries=3) as c:
        await c.enqueue("plain", b"before")
    await cluster.settled()
    old_index = cluster.servers[OLD].node.machine.applied_index
    await cluster.stop_node(OLD)
    lead = cluster.servers[leader]
    _skip_gate(cluster)
    for server in cluster.servers.values():  # both new nodes compact their logs
        assert isinstance(server.node.log, ReplicatedLog)
        server.node.log.config = dataclasses.replace(
            server.node.log.config, snapshot_every_entries=4
        )
    log = lead.node.log
    assert isinstance(log, ReplicatedLog)
    async with Client(cluster.addresses[leader], max_retries=3) as c:
        await c.create_queue("shared", SHARED)
        for k in range(12):
            await c.enqueue("shared", f"after-{k}")
    await cluster.settled()
    for server in cluster.servers.values():  # the old node must take a snapshot
        assert isinstance(server.node.log, ReplicatedLog)
        assert server.node.log.replica is not None
        assert server.node.log.replica.snapshot_index > old_index + 1

    await cluster.start_node(OLD)
    old = cluster.servers[OLD].node
    await asyncio.wait_for(old.log.failed.wait(), timeout=10)
    assert old.machine.applied_index <= old_index  # the snapshot was not installed
    assert "shared" not in old.machine.queues
    stopped = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("needs feature(s) 'shares'" in m and "snapshot" in m for m in stopped), stopped

    # It stored the snapshot before trying it: restarted, it refuses to start.
    await cluster.stop_node(OLD)
    with pytest.raises(UpgradeRequiredError, match="'shares'"):
        await cluster.start_node(OLD)
    await cluster.servers.pop(OLD).stop()
