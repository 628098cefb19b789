"""A balancer in front of a real 3-node cluster (one process, real gRPC, SQLite)."""

from __future__ import annotations

import asyncio
import contextlib
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from balancer.config import BalancerConfig
from balancer.pool import PoolConfig
from balancer.proxy import passthrough
from balancer.server import BalancerServer
from pqueue.client import Client
from pqueue.errors import (
    InvalidArgumentError,
    LeaseLostError,
    NotFoundError,
)
from pqueue.v1 import balancer_pb2 as bpb
from pqueue.v1 import queue_pb2 as pb
from pqueue.v1 import queue_pb2_grpc as pbg
from tests.inproc import Cluster


class Setup:
    def __init__(self, cluster: Cluster, balancer: BalancerServer) -> None:
        self.cluster = cluster
        self.balancer = balancer

    def backend(self, node_id: int) -> str:
        return self.cluster.addresses[node_id]

    async def status(self) -> dict[str, bpb.BackendStatus]:
        async with Client(self.balancer.address) as c:
            return {b.address: b for b in (await c.balancer_status()).backends}

    async def wait_for(
        self, what: str, check: Callable[[], Awaitable[bool]], timeout_s: float = 10.0
    ) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if await check():
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}")


def balancer_config(cluster: Cluster, probe_interval_s: float = 0.2) -> BalancerConfig:
    # Generous timeouts: three nodes, the balancer and the client share one
    # event loop here, on a CI machine of two cores.
    return BalancerConfig(
        backends=tuple(cluster.addresses[i] for i in sorted(cluster.addresses)),
        metrics_listen="127.0.0.1:0",
        probe_interval_s=probe_interval_s,
        probe_timeout_s=1.0,
        seed=1,
        grace_s=0.5,
        pool=PoolConfig(report_expiry_s=probe_interval_s * 4 + 3.0, slow_start_s=1.0),
    )


@contextlib.asynccontextmanager
async def balanced(tmp_path: Path, metrics: bool = False) -> AsyncIterator[Setup]:
    """Three nodes in this process and a balancer that knows their leader."""
    cluster = Cluster(tmp_path, metrics=metrics)
    await cluster.start()
    try:
        await cluster.leader()
        balancer = BalancerServer(balancer_config(cluster))
        await balancer.start()
        try:
            s = Setup(cluster, balancer)

            async def knows_leader() -> bool:
                return balancer.backends.pool.leader() is not None

            await s.wait_for("the balancer to know the leader", knows_leader)
            yield s
        finally:
            await balancer.stop()
    finally:
        await cluster.stop()


@pytest.fixture
async def setup(tmp_path: Path) -> AsyncIterator[Setup]:
    async with balanced(tmp_path) as s:
        yield s


async def test_the_api_works_through_the_balancer_with_error_details_intact(setup: Setup) -> None:
    async with Client(setup.balancer.address, max_retries=0) as c:
        await c.create_queue("q", pb.QueueConfig(max_priority=10))
        job_id = (await c.enqueue("q", b"hello", priority=3)).job_id
        [leased] = await c.lease("q")
        assert (leased.job_id, leased.payload) == (job_id, b"hello")
        job = await c.get_job("q", job_id, consistent=True)  # a read that must lead
        assert job.state == pb.JOB_STATE_LEASED
        await c.ack("q", leased.job_id, leased.lease_id)
        with pytest.raises(LeaseLostError) as lost:  # ABORTED + ErrorInfo, through the proxy
            await c.ack("q", leased.job_id, leased.lease_id)
        assert lost.value.job_id == job_id
        with pytest.raises(InvalidArgumentError) as bad:  # BadRequest names the field
            await c.enqueue("q", b"x", priority=11)
        assert "priority" in bad.value.field
        with pytest.raises(NotFoundError):
            await c.get_job("q", 424242)
        [stats] = await c.stats("q", consistent=True)
        assert stats.acked_total == 1


async def test_writes_reach_the_leader_in_one_hop(setup: Setup) -> None:
    leader = await setup.cluster.leader()
    # The proxy's own path: look-aside would send the enqueues to the leader itself.
    async with Client(setup.balancer.address, max_retries=0, look_aside=False) as c:
        await c.create_queue("q")
        for i in range(30):
            await c.enqueue("q", f"job-{i}")
        await c.lease("q", max_jobs=5)
    status = await setup.status()
    assert status[setup.backend(leader)].leader
    # Two calls, and the SDK's SubmitStream, carrying the 30 enqueues.
    assert status[setup.backend(leader)].leader_calls >= 3
    assert setup.cluster.servers[leader].node.submit_stream_requests == 30
    for i, server in setup.cluster.servers.items():
        if i != leader:
            assert status[setup.backend(i)].leader_calls == 0
            assert not server.forwarder._channels  # no follower forwarded anything: one hop


async def test_reads_spread_over_every_node_by_weight(setup: Setup) -> None:
    async with Client(setup.balancer.address, max_retries=0) as c:
        await c.create_queue("q")
        await setup.cluster.settled()  # reads are served from each node's applied state
        for _ in range(300):
            await c.stats("q")
    status = await setup.status()
    reads = {a: b.reads for a, b in status.items()}
    assert sum(reads.values()) >= 300
    for n in reads.values():  # idle nodes weigh alike: each gets a fair share
        assert n > 0.15 * sum(reads.values()), reads


async def test_a_long_poll_passes_through_and_ends_on_time(setup: Setup) -> None:
    async with Client(setup.balancer.address, max_retries=0) as c:
        await c.create_queue("q")
        started = time.monotonic()
        assert await c.lease("q", wait_ms=700) == []
        waited = time.monotonic() - started
        assert 0.6 < waited < 5.0, waited

        poll = asyncio.create_task(c.lease("q", wait_ms=10_000))
        await asyncio.sleep(0.3)
        assert not poll.done()
        await c.enqueue("q", b"wake up")
        [job] = await asyncio.wait_for(poll, 5)
        assert job.payload == b"wake up"


async def test_the_callers_deadline_is_passed_on(setup: Setup) -> None:
    leader = setup.cluster.servers[await setup.cluster.leader()]
    async with Client(setup.balancer.address) as c:
        await c.create_queue("q")
    async with grpc.aio.insecure_channel(setup.balancer.address) as channel:
        poll = pb.LeaseRequest(queue="q", wait_ms=20_000)
        started = time.monotonic()
        call = pbg.QueueStub(channel).Lease(poll, timeout=1.5)  # the deadline wins

        async def parked_on_the_leader() -> bool:
            return leader.node.waiting_long_polls == 1

        await setup.wait_for("the long poll to reach the leader", parked_on_the_leader)
        with pytest.raises(grpc.aio.AioRpcError) as late:
            await call
        assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - started < 10.0

    async def poll_ended_on_the_node() -> bool:
        return leader.node.waiting_long_polls == 0

    await setup.wait_for("the node to drop the abandoned long poll", poll_ended_on_the_node)


async def test_a_leader_failover_costs_at_most_one_retry(setup: Setup) -> None:
    async with Client(setup.balancer.address, max_retries=1, timeout_s=10) as c:
        await c.create_queue("q")
        under_way = asyncio.Event()

        async def produce() -> None:
            for i in range(200):
                # Any failure here means more than one retry was needed.
                await c.enqueue("q", f"p-{i}", idempotency_key=f"k-{i}")
                if i == 20:
                    under_way.set()

        producer = asyncio.create_task(produce())
        await under_way.wait()
        old = await setup.cluster.leader()
        await setup.cluster.stop_node(old)  # drains: NOT_SERVING, then gone
        await producer
        [stats] = await c.stats("q", consistent=True)
        assert stats.ready == 200  # every enqueue once, none lost, none doubled
        assert c.retries <= 1


async def test_a_draining_node_is_ejected_at_once_and_reads_go_on(setup: Setup) -> None:
    # Probes every 30 s and reports good for a minute: only the health
    # watch can tell this balancer that a node drains.
    watcher = BalancerServer(balancer_config(setup.cluster, probe_interval_s=30.0))
    await watcher.start()
    try:
        pool = watcher.backends.pool

        async def all_up() -> bool:
            return pool.leader() is not None and not any(b.ejected for b in pool.backends.values())

        await setup.wait_for("the first probes", all_up)
        leader = await setup.cluster.leader()
        follower = next(i for i in setup.cluster.servers if i != leader)
        async with Client(watcher.address, max_retries=0) as c:
            await c.create_queue("q")
            await setup.cluster.settled()
            stop = asyncio.create_task(setup.cluster.stop_node(follower))

            async def ejected() -> bool:
                return pool.backends[setup.backend(follower)].ejected

            await setup.wait_for("the draining node's ejection", ejected, timeout_s=2.0)
            await stop
            for _ in range(50):
                await c.stats("q")  # never picked again, so never an error
    finally:
        await watcher.stop()


async def test_the_balancer_serves_health_reflection_metrics_and_refuses_the_rest(
    setup: Setup,
) -> None:
    async with grpc.aio.insecure_channel(setup.balancer.address) as channel:
        health_stub = health_pb2_grpc.HealthStub(channel)

        async def serving() -> bool:  # once a backend is up (the fixture waited for one)
            reply = await health_stub.Check(health_pb2.HealthCheckRequest())
            return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

        await setup.wait_for("the balancer's health to say SERVING", serving, timeout_s=2.0)
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        async for reply in stub.ServerReflectionInfo(iter([request])):
            names = {s.name for s in reply.list_services_response.service}
            assert {"pqueue.v1.Queue", "pqueue.v1.Admin", "pqueue.v1.Balancer"} <= names
        peer_only: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
            "/pqueue.v1.Peer/Send"
        )
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await peer_only(b"")
        assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED
    async with Client(setup.balancer.address) as c:
        await c.create_queue("q")
        await c.stats("q", consistent=True)
    url = f"http://{setup.balancer.metrics_address}/metrics"
    text = (await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read())).decode()
    for name in (
        "pq_balancer_backend_weight",
        "pq_balancer_picks_total",
        "pq_balancer_ejections_total",
        "pq_balancer_retries_total",
        'pq_grpc_server_handled_total{code="OK",method="CreateQueue",service="pqueue.v1.Admin"}',
    ):
        assert name in text


def test_metadata_passthrough_keeps_the_call_and_drops_the_hop() -> None:
    kept = passthrough(
        (
            ("x-request-id", "abc"),
            ("authorization", "Bearer t"),
            ("user-agent", "grpc-python"),
            ("grpc-timeout", "1S"),
            ("pq-forwarded-by", "2"),
            ("grpc-status-details-bin", b"\x08\x05"),
            ("grpc-retry-pushback-ms", "200"),
        )
    )
    # The request id and the caller's IP go on too, but as the balancer took
    # them (``pqueue.wire.observe.hop_metadata``), not as copied.
    assert kept == (
        ("authorization", "Bearer t"),
        ("grpc-status-details-bin", b"\x08\x05"),
        ("grpc-retry-pushback-ms", "200"),
    )


async def test_a_client_reads_its_own_writes_through_the_balancer_by_default(
    setup: Setup,
) -> None:
    # The balancer spreads reads over all three nodes; a follower that has not
    # applied the write yet must wait for it (min_index), never answer without it.
    async with Client(setup.balancer.address) as c:
        for i in range(20):
            queue = f"ryw{i}"
            sent = await c.enqueue(queue, b"x")  # creates the queue
            assert (await c.get_job(queue, sent.job_id)).state == pb.JOB_STATE_READY
            [stats] = await c.stats(queue)
            assert stats.enqueued_total == 1
            assert queue in {q.queue for q in await c.list_queues()}
            assert (await c.get_queue(queue)).stats.ready == 1
            [leased] = await c.lease(queue)
            assert c.last_log_index > sent.log_index  # a lease is a write too
            assert (await c.get_job(queue, sent.job_id)).state == pb.JOB_STATE_LEASED
            await c.ack(queue, leased.job_id, leased.lease_id)
            assert (await c.get_job(queue, sent.job_id)).state == pb.JOB_STATE_COMPLETED
            [done] = (await c.list_jobs(queue, state="completed")).jobs
            assert done.job_id == sent.job_id
            await c.update_queue(queue, max_attempts=7)
            [info] = [q for q in await c.list_queues() if q.queue == queue]
            assert info.config.max_attempts == 7
    status = await setup.status()
    followers = [b for a, b in status.items() if a != setup.backend(await setup.cluster.leader())]
    assert sum(b.reads for b in followers) > 0  # followers did answer reads
