"""A 3-node cluster in one process: real gRPC between nodes, SQLite on each."""

from __future__ import annotations

import pytest

from pqueue.client import Client
from pqueue.core.snapshot import state_hash
from pqueue.errors import NotFoundError, PQueueError
from pqueue.v1 import queue_pb2 as pb
from tests.inproc import Cluster


async def test_any_node_takes_writes_and_every_node_applies_them(cluster: Cluster) -> None:
    leader = await cluster.leader()
    follower = next(i for i in cluster.servers if i != leader)
    async with Client(cluster.addresses[follower], max_retries=0) as c:
        ids = [(await c.enqueue("q", f"job-{k}", priority=k % 3)).job_id for k in range(20)]
        jobs = await c.lease("q", max_jobs=5)  # a lease through a follower, too
        await c.ack_many("q", [(j.job_id, j.lease_id) for j in jobs])
    await cluster.settled()
    hashes = {state_hash(s.node.machine) for s in cluster.servers.values()}
    assert len(hashes) == 1  # the same state everywhere
    for server in cluster.servers.values():
        [stats] = server.node.machine.stats("q", 0)
        assert (stats.enqueued_total, stats.acked_total) == (20, 5)
    assert len(set(ids)) == 20


async def test_consistent_reads_go_to_the_leader(cluster: Cluster) -> None:
    leader = await cluster.leader()
    follower = next(i for i in cluster.servers if i != leader)
    async with Client(cluster.addresses[follower], max_retries=0) as c:
        r = await c.enqueue("q", b"x")
        job = await c.get_job("q", r.job_id, consistent=True)
        assert job.state == pb.JOB_STATE_READY


async def test_leader_loss_elects_another_and_keeps_every_acknowledged_job(
    cluster: Cluster,
) -> None:
    leader = await cluster.leader()
    others = [i for i in cluster.servers if i != leader]
    acked: list[int] = []
    async with Client(cluster.addresses[others[0]], max_retries=0) as c:
        for k in range(30):
            acked.append((await c.enqueue("q", f"{k}", idempotency_key=f"k{k}")).job_id)
    await cluster.stop_node(leader)
    new_leader = await cluster.leader()
    assert new_leader != leader
    async with Client(cluster.addresses[others[1]], max_retries=3) as c:
        for k in range(30, 40):
            acked.append((await c.enqueue("q", f"{k}", idempotency_key=f"k{k}")).job_id)
        for job_id in acked:
            assert (await c.get_job("q", job_id, consistent=True)).job_id == job_id
    await cluster.start_node(leader)  # it rejoins and catches up
    await cluster.settled()
    assert len({state_hash(s.node.machine) for s in cluster.servers.values()}) == 1


async def test_a_minority_alone_refuses_writes(cluster: Cluster) -> None:
    await cluster.leader()
    survivor = 1
    for i in [i for i in list(cluster.servers) if i != survivor]:
        await cluster.stop_node(i)
    async with Client(cluster.addresses[survivor], max_retries=0, timeout_s=3) as c:
        with pytest.raises(PQueueError) as err:
            await c.enqueue("q", b"x")
    assert err.value.retriable  # UNAVAILABLE or a deadline: never a false success


async def test_a_node_that_cannot_forward_names_the_leader_and_the_sdk_follows(
    cluster: Cluster,
) -> None:
    import functools

    import grpc

    from pqueue.errors import NotLeaderError
    from pqueue.wire.keys import FORWARDED_KEY
    from pqueue.wire.status import from_rpc_error

    leader = await cluster.leader()
    follower = next(i for i in cluster.servers if i != leader)
    req = pb.EnqueueRequest(queue="q", job=pb.JobSpec(payload=b"x"))
    already_forwarded = ((FORWARDED_KEY, "n9"),)
    async with Client(cluster.addresses[follower], max_retries=0) as c:
        # A call that was already forwarded once is not forwarded again...
        with pytest.raises(grpc.aio.AioRpcError) as raw:
            await c._stubs.queue.Enqueue(req, metadata=already_forwarded)
        err = from_rpc_error(raw.value)
        assert isinstance(err, NotLeaderError)
        assert err.leader_id == str(leader)
        assert err.leader_address == cluster.addresses[leader]
    async with Client(cluster.addresses[follower], max_retries=0) as c:
        # ...and the SDK follows the leader hint in such an answer.
        r = await c._call(
            lambda s: functools.partial(s.queue.Enqueue, metadata=already_forwarded), req
        )
        assert r.job_id > 0


async def test_unknown_queue_lease_is_answered_by_the_leader_without_an_entry(
    cluster: Cluster,
) -> None:
    leader = await cluster.leader()
    follower = next(i for i in cluster.servers if i != leader)
    await cluster.settled()
    before = cluster.servers[leader].node.machine.applied_index
    for node in (leader, follower):  # a follower's lease is forwarded to the leader
        async with Client(cluster.addresses[node], max_retries=0) as c:
            with pytest.raises(NotFoundError, match="queue 'nope' not found"):
                await c.lease("nope")
            # With a wait, a queue not created yet is waited on like an empty one.
            assert await c.lease("nope", wait_ms=300) == []
    assert cluster.servers[leader].node.machine.applied_index == before
    # A queue created through one node is found at once through the other.
    async with (
        Client(cluster.addresses[follower], max_retries=0) as f,
        Client(cluster.addresses[leader], max_retries=0) as lead,
    ):
        await f.enqueue("fresh", b"x")
        assert len(await lead.lease("fresh", wait_ms=2_000)) == 1
