"""Look-aside (issue 15): a client given a balancer's address learns the
leader from its answers (``pq-leader``) and sends its operations and new
``Consume`` streams to the leader directly, going back through the balancer
when the leader fails or cannot be reached. Real 3-node clusters (in this
process, or ``pq dev-cluster`` processes for a SIGKILL), a real balancer."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from pqueue.cli.devcluster import node_pid
from pqueue.client import Client
from pqueue.errors import PQueueError
from pqueue.node.auth import Verifier, issue
from pqueue.v1 import queue_pb2 as pb
from pqueue.wire.keys import CLUSTER_KEY, LEADER_KEY
from pqueue.worker import Worker, WorkerConfig
from tests.inproc import Cluster
from tests.integration.test_balancer import Setup, balanced
from tests.integration.test_balancer_streams import running
from tests.integration.test_dev_cluster import dev_cluster, stop, until_ready

OTHER_SECRET = b"o" * 32


async def _until(what: str, check: Callable[[], bool], timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


def _forwarded(setup: Setup) -> int:
    """Leader calls and streams the balancer forwarded, over all backends."""
    return sum(b.leader_calls for b in setup.balancer.backends.pool.backends.values())


async def _warm(client: Client, queue: str) -> None:
    """Enqueue (through the balancer) until the client sends to the leader directly."""
    deadline = time.monotonic() + 20
    n = 0
    while client.look_aside_counts.direct == 0:
        assert time.monotonic() < deadline, "the client never went to the leader directly"
        await client.enqueue(queue, b"warm-%d" % n)
        n += 1
        await asyncio.sleep(0.05)


async def test_operations_and_the_worker_stream_go_to_the_leader_directly(
    tmp_path: Path,
) -> None:
    async with balanced(tmp_path) as setup, Client(setup.balancer.address) as client:
        leader = setup.cluster.servers[await setup.cluster.leader()]
        await client.create_queue("q")
        await _warm(client, "q")
        warm = (await client.stats("q", consistent=True))[0].ready
        forwarded = _forwarded(setup)
        direct = client.look_aside_counts.direct
        await asyncio.gather(*(client.enqueue("q", b"%d" % i) for i in range(100)))
        # Every enqueue went to the leader itself: none through the balancer.
        assert client.look_aside_counts.direct == direct + 100
        assert _forwarded(setup) == forwarded

        handled: list[bytes] = []

        async def handler(job: pb.LeasedJob) -> None:
            handled.append(job.payload)

        worker = Worker(client, "q", handler, config=WorkerConfig(concurrency=8))
        gauge = setup.balancer.metrics.registry.get_sample_value
        async with running(worker):
            await _until("every job", lambda: worker.stats.acked >= 100 + warm)
            # The stream is the leader's, not carried by the balancer.
            assert client.look_aside_counts.streams_direct >= 1
            assert leader.node.consume_streams == 1
            assert gauge("pq_balancer_streams_open") == 0
        [stats] = await client.stats("q", consistent=True)
        assert (stats.ready, stats.leased, stats.acked_total) == (0, 0, 100 + warm)


async def test_look_aside_off_sends_everything_through_the_balancer(tmp_path: Path) -> None:
    async with (
        balanced(tmp_path) as setup,
        Client(setup.balancer.address, look_aside=False) as client,
    ):
        await client.create_queue("q")
        leader = setup.cluster.servers[await setup.cluster.leader()]
        forwarded = _forwarded(setup)
        for i in range(20):
            await client.enqueue("q", b"%d" % i)
        assert _forwarded(setup) == forwarded + 1  # one SubmitStream, carried
        assert leader.node.submit_stream_requests == 20
        worker = Worker(client, "q", lambda job: asyncio.sleep(0), config=WorkerConfig())
        async with running(worker):
            await _until("every job", lambda: worker.stats.acked >= 20)
        counts = client.look_aside_counts
        assert (counts.direct, counts.via_endpoint, counts.streams_direct) == (0, 20, 0)
        assert counts.streams_via_endpoint == 1


def _blackhole() -> socket.socket:
    """A port that accepts TCP connections (the kernel's backlog) and never
    speaks: a channel to it never becomes READY."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    return sock


def _closed_port() -> str:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    address = f"127.0.0.1:{sock.getsockname()[1]}"
    sock.close()
    return address


@pytest.mark.parametrize("kind", ["refused", "blackholed"])
async def test_an_unreachable_leader_address_leaves_every_call_on_the_balancer(
    tmp_path: Path, kind: str
) -> None:
    hole = _blackhole() if kind == "blackholed" else None
    bad = f"127.0.0.1:{hole.getsockname()[1]}" if hole is not None else _closed_port()
    try:
        async with balanced(tmp_path) as setup:
            backends = setup.balancer.backends

            def announce(address: str, advertised: str, cluster_id: str) -> None:
                # The nodes advertise an address this client cannot reach.
                backends.leader_metadata[address] = ((LEADER_KEY, bad),)

            backends._announce = announce  # type: ignore[method-assign]
            backends.leader_metadata.clear()
            async with Client(setup.balancer.address, max_retries=0) as client:
                await client.create_queue("q")
                leader = setup.cluster.servers[await setup.cluster.leader()]
                started = time.monotonic()
                for i in range(30):  # past the connect timeout: nothing waits for it
                    await client.enqueue("q", b"%d" % i)
                    await asyncio.sleep(0.05 if i < 20 else 0.3)
                assert time.monotonic() - started < 20
                worker = Worker(client, "q", lambda job: asyncio.sleep(0), config=WorkerConfig())
                async with running(worker):
                    await _until("every job", lambda: worker.stats.acked >= 30)
                counts = client.look_aside_counts
                assert counts.direct == 0
                assert counts.via_endpoint >= 30
                assert counts.streams_direct == 0
                # Each on the balancer's SubmitStream to the leader.
                assert leader.node.submit_stream_requests >= 30
    finally:
        if hole is not None:
            hole.close()


async def test_a_leader_address_that_reaches_another_cluster_takes_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The balancer's cluster ("pqueue", the default) names as its leader an
    address that, from this client, reaches a node of another cluster (NAT,
    split DNS, a port reused): that node refuses the direct calls and stream
    unrun (WRONG_CLUSTER), and everything lands in the balancer's cluster.
    That node checks tokens (its own cluster's), and the cluster check comes
    first: a token it does not know would end the calls UNAUTHENTICATED."""
    other = Cluster(
        tmp_path / "other",
        n=1,
        cluster_options={"cluster_id": "other-cluster"},
        verifier=Verifier(OTHER_SECRET),
    )
    await other.start()
    try:
        await other.leader()
        stray = other.addresses[1]
        admin = issue(OTHER_SECRET, "ops", ["admin"], 600)
        async with Client(stray, max_retries=0, token=admin) as there:
            assert (await there.node_status()).cluster_id == "other-cluster"
            await there.create_queue("q")  # a write that reached it would land
        async with balanced(tmp_path / "main") as setup:
            backends = setup.balancer.backends
            leader_id = await setup.cluster.leader()
            assert setup.cluster.servers[leader_id].node.log.cluster_id == "pqueue"

            def announce(address: str, advertised: str, cluster_id: str) -> None:
                # What the probes report (the real cluster id), beside an
                # address that means the other cluster's node from here.
                assert cluster_id == "pqueue"
                backends.leader_metadata[address] = ((LEADER_KEY, stray), (CLUSTER_KEY, cluster_id))

            backends._announce = announce  # type: ignore[method-assign]
            backends.leader_metadata.clear()
            caplog.set_level(logging.WARNING, logger="pqueue.lookaside")
            async with (
                Client(setup.balancer.address, max_retries=0) as consumer,
                Client(setup.balancer.address, max_retries=0) as producer,
            ):
                await producer.create_queue("q")
                leader_at = setup.cluster.addresses[leader_id]
                await _until(
                    "a probe to name it", lambda: bool(backends.leader_metadata.get(leader_at))
                )
                worker = Worker(consumer, "q", lambda job: asyncio.sleep(0), config=WorkerConfig())
                async with running(worker):
                    # The worker's stream through the balancer names the stray
                    # leader; its next stream goes there and is refused.
                    await _until("the stream to be refused", lambda: not consumer.leader_address)
                    await _until(
                        "a stream tried direct",
                        lambda: consumer.look_aside_counts.streams_direct > 0,
                    )
                    for i in range(30):  # max_retries=0: the resend spends no attempt
                        await producer.enqueue("q", b"%d" % i)
                        await asyncio.sleep(0.02)
                    await _until("every job", lambda: worker.stats.acked >= 30)
                assert producer.look_aside_counts.direct >= 1  # tried, refused, sent on
                assert producer.leader_address == ""
                assert consumer.leader_address == ""
            stats = (await _stats(setup.balancer.address, "q")).enqueued_total
            assert stats == 30
        refused = [
            r.getMessage() for r in caplog.records if "not a node of its cluster" in r.getMessage()
        ]
        assert len(refused) == 2, refused  # once per client
        async with Client(stray, max_retries=0, token=admin) as there:
            assert (await there.stats("q", consistent=True))[0].enqueued_total == 0
    finally:
        await other.stop()


async def _stats(endpoint: str, queue: str) -> pb.QueueStats:
    async with Client(endpoint, max_retries=0) as client:
        return (await client.stats(queue, consistent=True))[0]


async def test_a_killed_leader_sends_the_client_back_through_the_balancer(
    tmp_path: Path,
) -> None:
    root = tmp_path / "c"
    proc = await dev_cluster(root, "--base-port", "0", "--metrics-port", "0")
    try:
        lines = await until_ready(proc)
        balancer = next(x for x in lines if x.startswith("balancer: ")).split()[1]
        async with Client(balancer, timeout_s=5) as client:
            await client.create_queue("q")
            await _warm(client, "q")
            leader = client.leader_address
            rows = [line.split() for line in lines if line.startswith("n")]
            [name] = [row[0] for row in rows if leader in row]
            acked: set[str] = set()
            failed = 0

            async def produce(prefix: str, n: int) -> None:
                nonlocal failed
                for i in range(n):
                    key = f"{prefix}-{i}"
                    try:
                        await client.enqueue("q", key, idempotency_key=key)
                    except PQueueError:
                        failed += 1  # not acknowledged: may or may not be there
                    else:
                        acked.add(key)

            await produce("before", 50)
            pid = node_pid(root, int(name.lstrip("n")))
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            await produce("after", 200)
            # Back through the balancer, to the new leader, and then to it directly.
            await _until("a new direct leader", lambda: client.leader_address not in ("", leader))
            direct = client.look_aside_counts.direct
            await produce("later", 20)
            assert client.look_aside_counts.direct == direct + 20
            jobs = [job.payload.decode() async for job in client.iter_jobs("q", "ready")]
            # Nothing acknowledged is lost, and keyed enqueues never doubled.
            assert acked <= set(jobs)
            assert len(jobs) == len(set(jobs))
            assert failed <= 20, failed
    finally:
        await stop(proc)


async def test_a_handover_moves_the_client_off_the_old_leader(tmp_path: Path) -> None:
    """The old leader stays up as a follower: a call marked look-aside is
    answered NOT_LEADER there (nothing ran) instead of being forwarded, so
    the client follows the hint, goes back through the balancer and then
    straight to the new leader; it does not stay two hops from it."""
    async with balanced(tmp_path) as setup, Client(setup.balancer.address) as client:
        old = await setup.cluster.leader()
        await client.create_queue("q")
        await _warm(client, "q")
        assert client.leader_address == setup.cluster.addresses[old]
        assert await setup.cluster.servers[old].node.log.transfer_leadership(10.0)
        new = await setup.cluster.leader()
        assert new != old
        n = 0

        def on_new_leader() -> bool:
            return client.leader_address == setup.cluster.addresses[new]

        deadline = time.monotonic() + 30
        while not on_new_leader():
            assert time.monotonic() < deadline, f"still at {client.leader_address}"
            await client.enqueue("q", b"after-%d" % n)  # every one succeeds meanwhile
            n += 1
            await asyncio.sleep(0.02)
        before = client.look_aside_counts.direct
        for i in range(20):
            await client.enqueue("q", b"direct-%d" % i)
        assert client.look_aside_counts.direct - before == 20
        jobs = [j async for j in client.iter_jobs("q", "ready")]
        payloads = [j.payload for j in jobs]
        wanted = [b"after-%d" % i for i in range(n)] + [b"direct-%d" % i for i in range(20)]
        assert sorted(p for p in payloads if not p.startswith(b"warm-")) == sorted(wanted)
