"""Auth, tenants and TLS as users meet them: real servers, real tokens, real certificates."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from balancer.config import BalancerConfig
from balancer.pool import PoolConfig
from balancer.server import BalancerServer
from pqueue.client import Client
from pqueue.errors import (
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
)
from pqueue.node.auth import Verifier, issue
from pqueue.node.quotas import Quotas
from pqueue.node.server import NodeServer
from pqueue.v1 import peer_pb2, peer_pb2_grpc
from pqueue.v1 import queue_pb2 as pb
from pqueue.wire.tls import Tls, channel
from tests.certs import Authority, ec_pair, rsa_pair
from tests.inproc import Cluster, node_tokens, one_node
from tests.peer_wire import send_batch

SECRET = b"s" * 32
PQ = (sys.executable, "-m", "pqueue.cli")


def token(tenant: str, *roles: str, key: bytes = SECRET, ttl_s: float = 600) -> str:
    return issue(key, tenant, roles, ttl_s)


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[NodeServer]:
    async with one_node(tmp_path, verifier=Verifier(SECRET)) as srv:
        yield srv


def as_(node: NodeServer, tok: str | None) -> Client:
    return Client(node.address, max_retries=0, token=tok)


async def test_no_token_or_a_bad_one_is_unauthenticated(node: NodeServer) -> None:
    expired = issue(SECRET, "acme", ["producer"], 1, now_s=time.time() - 3600)
    forged = token("acme", "producer", key=b"x" * 32)
    for tok in (None, "not-a-jwt", expired, forged):
        async with as_(node, tok) as c:
            with pytest.raises(UnauthenticatedError):
                await c.enqueue("q", b"x")
            with pytest.raises(UnauthenticatedError):
                await c.stats()
    async with Client(node.address, max_retries=0) as c:  # malformed header, not a token
        call = c._stubs.queue.Stats(pb.StatsRequest(), metadata=(("authorization", "Basic x"),))
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await call
        assert bad.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_a_token_without_the_role_is_permission_denied(node: NodeServer) -> None:
    async with as_(node, token("acme", "producer")) as producer:
        await producer.enqueue("q", b"x")
        with pytest.raises(PermissionDeniedError):
            await producer.lease("q")
        with pytest.raises(PermissionDeniedError):
            await producer.purge("q")  # queue management is the operator's
    async with as_(node, token("acme", "consumer")) as consumer:
        [job] = await consumer.lease("q")
        await consumer.ack("q", job.job_id, job.lease_id)
        with pytest.raises(PermissionDeniedError):
            await consumer.enqueue("q", b"x")


async def test_tenants_cannot_see_or_touch_each_others_queues(node: NodeServer) -> None:
    a = as_(node, token("acme", "producer", "consumer"))
    b = as_(node, token("bolt", "producer", "consumer"))
    admin = as_(node, token("ops", "admin"))
    try:
        mine = (await a.enqueue("jobs", b"acme's")).job_id
        await b.enqueue("jobs", b"bolt's")
        await b.enqueue("other", b"bolt's too")
        # Same name, two queues: each tenant sees one job, its own, by the name it used.
        [leased] = await a.lease("jobs")
        assert (leased.payload, leased.queue, leased.job_id) == (b"acme's", "jobs", mine)
        assert [s.queue for s in await a.stats()] == ["jobs"]
        assert [q.queue for q in await a.list_queues()] == ["jobs"]
        assert sorted(s.queue for s in await b.stats()) == ["jobs", "other"]
        assert (await a.get_job("jobs", mine)).queue == "jobs"
        # Naming the other tenant's queue outright is refused, for every kind of call.
        for call in (
            a.enqueue("bolt/jobs", b"x"),
            a.lease("bolt/jobs"),
            a.stats("bolt/other"),
            a.get_job("bolt/jobs", 1),
            a.list_dead("bolt/jobs"),
        ):
            with pytest.raises(PermissionDeniedError):
                await call
        # Guessing an id on one's own queue finds nothing of the other tenant's.
        with pytest.raises(NotFoundError):
            await a.get_job("jobs", mine + 1)
        # Naming one's own tenant outright is the same queue.
        assert (await a.get_job("acme/jobs", mine)).job_id == mine
        # The operator sees every queue by its full name and may act on any.
        assert sorted(q.queue for q in await admin.list_queues()) == [
            "acme/jobs",
            "bolt/jobs",
            "bolt/other",
        ]
        [bolts] = await admin.lease("bolt/jobs")
        assert bolts.payload == b"bolt's"
        assert await admin.purge("bolt/other") == 1
    finally:
        for c in (a, b, admin):
            await c.close()


@pytest.mark.parametrize("pair", [rsa_pair, ec_pair], ids=["RS256", "ES256"])
async def test_public_key_tokens(tmp_path: Path, pair: object) -> None:
    assert callable(pair)
    private, public = pair()
    async with one_node(tmp_path, verifier=Verifier(public)) as srv:
        async with Client(
            srv.address, max_retries=0, token=issue(private, "t", ["producer"], 60)
        ) as c:
            await c.enqueue("q", b"x")
        wrong, _ = pair()
        async with Client(
            srv.address, max_retries=0, token=issue(wrong, "t", ["producer"], 60)
        ) as c:
            with pytest.raises(UnauthenticatedError):
                await c.enqueue("q", b"x")


async def test_pq_token_issue_and_the_cli_use_it(node: NodeServer, tmp_path: Path) -> None:
    key = tmp_path / "secret"
    key.write_bytes(SECRET)
    issued = await asyncio.create_subprocess_exec(
        *PQ, "token", "issue", "--tenant", "acme", "--role", "producer", "--role", "consumer",
        "--key-file", str(key), "--ttl", "1h",
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, _ = await issued.communicate()
    assert issued.returncode == 0
    tok = out.decode().strip()
    assert Verifier(SECRET).verify(tok).tenant == "acme"
    # A key file as an editor leaves it (a final newline): both sides read it alike.
    edited = tmp_path / "edited"
    edited.write_bytes(SECRET + b"\n")
    again = await asyncio.create_subprocess_exec(
        *PQ, "token", "issue", "--tenant", "acme", "--role", "admin", "--key-file", str(edited),
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, _ = await again.communicate()
    assert Verifier.from_file(edited).verify(out.decode().strip()).roles == {"admin"}
    run = await asyncio.create_subprocess_exec(
        *PQ, "--endpoint", node.address, "--token", tok, "-o", "json", "enqueue", "q", "hi",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await run.communicate()
    assert run.returncode == 0, err
    refused = await asyncio.create_subprocess_exec(
        *PQ, "--endpoint", node.address, "enqueue", "q", "hi", stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await refused.communicate()
    assert refused.returncode != 0
    assert b"UNAUTHENTICATED" in err


def test_a_node_refuses_to_listen_beyond_loopback_without_auth(tmp_path: Path) -> None:
    cmd = [*PQ, "node", "--data-dir", str(tmp_path / "n1"), "--listen", "0.0.0.0:0"]
    done = subprocess.run(cmd, capture_output=True, timeout=60)
    assert done.returncode == 2  # a refused command line (docs/operations.md)
    assert b"refusing to serve 0.0.0.0:0 without auth" in done.stderr


async def test_open_mode_says_so_loudly(tmp_path: Path) -> None:
    cmd = [*PQ, "node", "--data-dir", str(tmp_path / "n1"), "--listen", "127.0.0.1:0"]
    proc = await asyncio.create_subprocess_exec(*cmd, stderr=asyncio.subprocess.PIPE)
    try:
        assert proc.stderr is not None
        seen = b""
        while b"AUTH IS OFF" not in seen:
            line = await asyncio.wait_for(proc.stderr.readline(), 30)
            assert line, seen
            seen += line
        assert b"[WARNING]" in seen
    finally:
        proc.terminate()
        await proc.wait()


async def speak_peer(address: str, tls: Tls | None, tok: str | None = None) -> None:
    """Open a peer stream and send one (empty) batch, as a node would."""
    metadata = (("authorization", f"Bearer {tok}"),) if tok else ()
    async with channel(address, tls) as ch:
        await send_batch(
            lambda: peer_pb2_grpc.PeerStub(ch).Send(timeout=3, metadata=metadata),
            peer_pb2.PeerBatch(),
        )


async def test_a_cluster_on_mutual_tls_refuses_whoever_lacks_a_certificate(
    tmp_path: Path,
) -> None:
    ca = Authority.new()
    tls = {i: ca.tls(f"n{i}") for i in (1, 2, 3)}
    cluster = Cluster(
        tmp_path,
        tls=lambda i: tls[i],
        verifier=Verifier(SECRET),
        peer_token=node_tokens(SECRET),
    )
    await cluster.start()
    try:
        leader = await cluster.leader()  # the nodes elected one over mutual TLS
        address = cluster.addresses[leader]
        producer = token("acme", "producer")
        async with Client(address, max_retries=0, tls=ca.tls("client"), token=producer) as c:
            await c.enqueue("q", b"x")
        # A follower forwards over mutual TLS, with the caller's token.
        follower = next(i for i in cluster.addresses if i != leader)
        client_tls = ca.tls("client")
        async with Client(cluster.addresses[follower], max_retries=0, tls=client_tls) as c:
            with pytest.raises(UnauthenticatedError):
                await c.enqueue("q", b"x")
        async with Client(
            cluster.addresses[follower], max_retries=0, tls=client_tls, token=producer
        ) as c:
            await c.enqueue("q", b"y")
        await cluster.settled()
        # No certificate, another CA's certificate, or plaintext: no connection at all.
        stranger = Authority.new("another CA")
        for who in (
            Tls(ca=ca.pem),
            Tls(*stranger.issue("rogue"), ca=ca.pem),
            None,
        ):
            async with Client(address, max_retries=0, tls=who, token=producer, timeout_s=3) as c:
                with pytest.raises(UnavailableError):
                    await c.enqueue("q", b"z")
            # Nor may such a node speak the peer protocol.
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await speak_peer(address, who)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        # A certificate from the cluster's own CA (as clients and balancers hold) lets
        # one connect, but not speak the peer protocol without a peer token: not
        # with none, not with a producer's, not even with an admin's.
        insider = ca.tls("a client")
        for tok in (None, producer, token("ops", "admin")):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await speak_peer(address, insider, tok)
            expected = grpc.StatusCode.UNAUTHENTICATED if tok is None else (
                grpc.StatusCode.PERMISSION_DENIED
            )  # fmt: skip
            assert refused.value.code() == expected
        # Through a balancer: TLS to clients, mutual TLS and a probe token to the nodes.
        balancer_ca = Authority.new("balancer CA")
        cert, key = balancer_ca.issue("balancer")
        balancer = BalancerServer(
            BalancerConfig(
                backends=tuple(cluster.addresses[i] for i in sorted(cluster.addresses)),
                probe_interval_s=0.2,
                probe_timeout_s=1.0,
                pool=PoolConfig(report_expiry_s=4.0, slow_start_s=1.0),
                tls=Tls(cert=cert, key=key),
                backend_tls=ca.tls("balancer"),
                probe_token=token("ops", "admin"),
                grace_s=0.5,
            )
        )
        await balancer.start()
        try:
            deadline = time.monotonic() + 10
            while balancer.backends.pool.leader() is None:
                assert time.monotonic() < deadline, "the balancer never saw a leader"
                await asyncio.sleep(0.05)
            via = Tls(ca=balancer_ca.pem)
            async with Client(balancer.address, tls=via, token=producer) as c:
                await c.enqueue("q", b"via the balancer")
            async with Client(balancer.address, tls=via, max_retries=0) as c:
                with pytest.raises(UnauthenticatedError):  # the node checks, through the hop
                    await c.enqueue("q", b"x")
        finally:
            await balancer.stop()
        async with Client(address, tls=ca.tls("c"), token=token("acme", "consumer")) as c:
            got = await c.lease("q", max_jobs=10)
        assert sorted(j.payload for j in got) == [b"via the balancer", b"x", b"y"]
    finally:
        await cluster.stop()


QUOTAS = """
[defaults]
enqueue_per_s = 1000

[tenants.flood]
enqueue_per_s = 5
enqueue_burst = 5
max_inflight_leases = 2
max_queue_depth = 6
"""


async def test_quotas_refuse_with_a_retry_delay_and_keep_to_their_tenant(tmp_path: Path) -> None:
    flood = token("flood", "producer", "consumer")
    async with one_node(tmp_path, verifier=Verifier(SECRET), quotas=Quotas.parse(QUOTAS)) as srv:
        async with Client(srv.address, max_retries=0, token=flood) as c:
            for i in range(5):
                await c.enqueue("q", f"{i}".encode())
            with pytest.raises(ResourceExhaustedError) as over:
                await c.enqueue("q", b"one too many")
            assert 0.1 <= over.value.retry_after_s <= 0.2  # a job at 5/s, at least 100 ms
            # The same refusal on the wire: RESOURCE_EXHAUSTED with gRPC's pushback trailer.
            call = c._stubs.queue.Enqueue(
                pb.EnqueueRequest(queue="q", job=pb.JobSpec(payload=b"x")),
                metadata=(("authorization", f"Bearer {flood}"),),
            )
            with pytest.raises(grpc.aio.AioRpcError) as wire:
                await call
            assert wire.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            pushback = dict(wire.value.trailing_metadata() or ())["grpc-retry-pushback-ms"]
            assert 100 <= int(pushback) <= 200
            # Leases: at most two held at once.
            held = await c.lease("q", max_jobs=10)
            assert len(held) == 2
            with pytest.raises(ResourceExhaustedError):
                await c.lease("q")
            # Depth: five in the queue; the bucket refills, the queue takes one more only.
            await asyncio.sleep(0.5)
            await c.enqueue("q", b"sixth")
            await asyncio.sleep(0.5)
            with pytest.raises(ResourceExhaustedError, match="limit is 6"):
                await c.enqueue("q", b"seventh")
        # Another tenant is not held back by the first's limits.
        async with Client(srv.address, max_retries=0, token=token("calm", "producer")) as c:
            for _ in range(20):
                await c.enqueue("q", b"x")
        # The SDK, allowed to retry, waits out the pushback instead of failing.
        async with Client(srv.address, max_retries=3, token=flood) as c:
            await c.ack_many("q", [(j.job_id, j.lease_id) for j in held])  # depth: 4 of 6
            for i in range(7):  # over the rate (not the depth): each waits its turn
                await c.enqueue("q", b"after a wait", idempotency_key=f"k{i % 2}")
            assert c.retries > 0


async def test_every_call_naming_another_tenants_queue_is_refused(node: NodeServer) -> None:
    async with as_(node, token("bolt", "producer", "consumer")) as b:
        await b.enqueue("jobs", b"bolt's")
    acme = as_(node, token("acme", "producer", "consumer"))
    try:
        for call in (
            acme.ack("bolt/jobs", 1, 1),
            acme.nack("bolt/jobs", 1, 1),
            acme.extend("bolt/jobs", 1, 1, 1000),
            acme.enqueue_batch("bolt/jobs", [pb.JobSpec(payload=b"x")]),
        ):
            with pytest.raises(PermissionDeniedError):
                await call
    finally:
        await acme.close()
    async with as_(node, token("acme", "admin")) as admin:  # the operator may
        assert [s.queue for s in await admin.stats("bolt/jobs")] == ["bolt/jobs"]
    async with as_(node, token("acme", "producer", "consumer", "peer")) as peer:
        with pytest.raises(PermissionDeniedError):  # peer is no queue role
            await peer.purge("jobs")
