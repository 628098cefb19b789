"""Issue 12, item 9 and peer identity, with real servers: log lines no caller
can forge, forwarded addresses believed only from hops that prove it, and
per-node peer tokens that are checked, revocable and rotated without a restart."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import re
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import jwt
import pytest

from balancer.config import BalancerConfig
from balancer.pool import PoolConfig
from balancer.server import BalancerServer
from consensus.messages import Prepare
from pqueue.client import Client
from pqueue.errors import PQueueError
from pqueue.node.auth import BALANCER, PEER, RevokedTokens, Verifier, issue, node_subject
from pqueue.node.peer_codec import encode
from pqueue.node.server import NodeServer
from pqueue.v1 import queue_pb2 as pb
from pqueue.v1 import queue_pb2_grpc as pbg
from pqueue.wire.logs import JsonFormatter, TextFormatter
from pqueue.wire.tokens import TokenFile
from tests.certs import Authority
from tests.inproc import Cluster, node_tokens, one_node
from tests.peer_wire import send_peer

SECRET = b"s" * 32
PQ = (sys.executable, "-m", "pqueue.cli")
LINE_START = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} \[[A-Z]+\] ")


def token(tenant: str, *roles: str, subject: str = "", token_id: str | None = None) -> str:
    return issue(SECRET, tenant, roles, 600, subject=subject, token_id=token_id)


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[NodeServer]:
    async with one_node(tmp_path, verifier=Verifier(SECRET)) as srv:
        yield srv


@pytest.fixture
def written() -> Iterator[tuple[io.StringIO, io.StringIO]]:
    """What the root logger writes, as text and as JSON lines (as ``pq node`` does)."""
    text, js = io.StringIO(), io.StringIO()
    handlers = [logging.StreamHandler(text), logging.StreamHandler(js)]
    handlers[0].setFormatter(TextFormatter("p"))
    handlers[1].setFormatter(JsonFormatter("p"))
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.INFO)
    for h in handlers:
        root.addHandler(h)
    try:
        yield text, js
    finally:
        for h in handlers:
            root.removeHandler(h)
        root.setLevel(level)


def balancer_for(
    addresses: list[str], balancer_token: str | None = None, probe: str | None = None
) -> BalancerServer:
    return BalancerServer(
        BalancerConfig(
            backends=tuple(addresses),
            probe_interval_s=0.2,
            probe_timeout_s=1.0,
            pool=PoolConfig(report_expiry_s=4.0, slow_start_s=1.0),
            probe_token=probe,
            balancer_token=balancer_token,
            grace_s=0.5,
        )
    )


async def wait_until(what: str, check: object, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def test_a_forged_jwt_header_cannot_forge_node_or_balancer_log_lines(
    node: NodeServer, written: tuple[io.StringIO, io.StringIO]
) -> None:
    forged = "\n2026-01-01 00:00:00.000 [ERROR] n1/pqueue.v1.Queue/Ack: forged\x1b[31m\u2028"
    crit = jwt.encode(
        {"tenant": "acme", "roles": ["producer"], "exp": int(time.time()) + 600},
        SECRET,
        "HS256",
        headers={"crit": [forged]},  # unauthenticated: PyJWT quotes it in its refusal
    )
    balancer = balancer_for([node.address], probe=token("ops", "admin"))
    await balancer.start()
    try:
        await wait_until("a leader", lambda: balancer.backends.pool.leader() is not None)
        for address in (node.address, balancer.address):
            async with grpc.aio.insecure_channel(address) as ch:
                stub = pbg.QueueStub(ch)
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await stub.Enqueue(
                        pb.EnqueueRequest(queue="q", job=pb.JobSpec(payload=b"x")),
                        metadata=(("authorization", f"Bearer {crit}"), ("x-request-id", "crit-1")),
                    )
                assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert "forged" in (refused.value.details() or "")  # the caller still learns why
                # A name carrying a line is refused (and not echoed); metadata cannot
                # carry one at all (gRPC refuses control characters in headers).
                with pytest.raises(grpc.aio.AioRpcError) as bad:
                    await stub.Enqueue(
                        pb.EnqueueRequest(queue="q" + forged, job=pb.JobSpec(payload=b"x")),
                        metadata=(("authorization", f"Bearer {token('acme', 'producer')}"),),
                    )
                assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        text, js = written
        await wait_until("the error lines", lambda: text.getvalue().count("forged") >= 3)
    finally:
        await balancer.stop()
    lines = text.getvalue().splitlines()
    mentions = [line for line in lines if "forged" in line]
    # Node (direct), node (via the balancer) and the balancer: each one error line.
    routes = {line.split("] ", 1)[1].split(":", 1)[0] for line in mentions}
    assert {"n1/pqueue.v1.Queue/Enqueue", "balancer/pqueue.v1.Queue/Enqueue"} <= routes
    for line in lines:
        assert LINE_START.match(line) or line.startswith("    "), f"a forged line: {line!r}"
    assert "\x1b" not in text.getvalue()
    assert "\u2028" not in text.getvalue()
    for line in js.getvalue().splitlines():
        parsed = json.loads(line)  # one object per line, none split
        assert "\x1b" not in parsed["message"]


async def forwarded_line(
    address: str, caplog: pytest.LogCaptureFixture, rid: str, *metadata: tuple[str, str]
) -> logging.LogRecord:
    """The node's request record of one Enqueue sent with ``metadata``."""
    async with grpc.aio.insecure_channel(address) as ch:
        await pbg.QueueStub(ch).Enqueue(
            pb.EnqueueRequest(queue="q", job=pb.JobSpec(payload=b"x")),
            metadata=(("x-request-id", rid), *metadata),
        )
    [rec] = [
        r
        for r in caplog.records
        if r.name == "pqueue.requests" and getattr(r, "request_id", "") == rid
        and r.getMessage().startswith("Received") and not getattr(r, "route", "").startswith("b")
    ]  # fmt: skip
    return rec


async def test_forwarded_addresses_are_believed_only_from_a_balancer_or_a_peer(
    node: NodeServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pqueue.requests")
    producer = ("authorization", f"Bearer {token('acme', 'producer')}")
    claim = (("pq-forwarded-by", "balancer"), ("x-forwarded-for", "203.0.113.9"))
    # Any client can send the headers: the node logs its real address, and the claim as one.
    for i, proof in enumerate(
        [
            (),
            (("pq-forwarder-token", token("acme", "producer", "consumer")),),
            (("pq-forwarder-token", token("ops", "admin")),),  # admin is not a hop
            (("pq-forwarder-token", "not-a-jwt"),),
        ]
    ):
        rec = await forwarded_line(node.address, caplog, f"spoof-{i}", producer, *claim, *proof)
        assert rec.client_ip == "127.0.0.1"  # type: ignore[attr-defined]
        assert rec.claimed_client == "203.0.113.9"  # type: ignore[attr-defined]
        assert "claimed_client=203.0.113.9" in rec.getMessage()
    # A hop that proves it is one (a balancer's or a node's token) is believed.
    for i, hop in enumerate(
        [token("lb", BALANCER, subject="lb-1"), token("cluster", PEER, subject=node_subject(2))]
    ):
        hop_proof = ("pq-forwarder-token", hop)
        rec = await forwarded_line(node.address, caplog, f"hop-{i}", producer, *claim, hop_proof)
        assert rec.client_ip == "203.0.113.9"  # type: ignore[attr-defined]
        assert not hasattr(rec, "claimed_client")


async def test_a_client_cannot_launder_an_address_through_the_balancer(
    node: NodeServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pqueue.requests")
    balancer = balancer_for([node.address], balancer_token=token("lb", BALANCER))
    await balancer.start()
    try:
        await wait_until("a leader", lambda: balancer.backends.pool.leader() is not None)
        producer = ("authorization", f"Bearer {token('acme', 'producer')}")
        claim = (("pq-forwarded-by", "balancer"), ("x-forwarded-for", "203.0.113.9"))
        lb_proof = ("pq-forwarder-token", token("lb", BALANCER))  # even a stolen one is stripped
        await forwarded_line(balancer.address, caplog, "via-lb", producer, *claim, lb_proof)
    finally:
        await balancer.stop()
    lines = {
        r.route: r  # type: ignore[attr-defined]
        for r in caplog.records
        if getattr(r, "request_id", "") == "via-lb" and r.getMessage().startswith("Received")
    }
    at_balancer = lines["balancer/pqueue.v1.Queue/Enqueue"]
    at_node = lines["n1/pqueue.v1.Queue/Submit"]  # the balancer carried it in a Submit
    assert at_balancer.claimed_client == "203.0.113.9"  # type: ignore[attr-defined]
    # The balancer vouches (with its own token) for the address it saw, not the claim.
    assert at_node.client_ip == "127.0.0.1"  # type: ignore[attr-defined]
    assert "203.0.113.9" not in at_node.getMessage()


async def test_with_auth_off_forwarded_addresses_are_logged_as_claimed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pqueue.requests")
    async with one_node(tmp_path) as srv:
        claim = (("pq-forwarded-by", "balancer"), ("x-forwarded-for", "203.0.113.9"))
        rec = await forwarded_line(srv.address, caplog, "open-1", *claim)
    assert rec.client_ip == "127.0.0.1"  # type: ignore[attr-defined]
    assert "claimed_client=203.0.113.9" in rec.getMessage()


async def test_a_node_cannot_speak_for_another(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path, verifier=Verifier(SECRET), peer_token=node_tokens(SECRET))
    await cluster.start()
    try:
        leader = await cluster.leader()
        target, other = (i for i in sorted(cluster.addresses) if i != leader)
        replica = cluster.servers[target].node.log.replica  # type: ignore[attr-defined]
        # Holding node `other`'s token, claim to be the leader: a Prepare from the
        # live leader is one a follower must take (part of the issue's attack).
        spoof = encode(Prepare(src=leader, dst=target, ballot=(10**6, leader), from_slot=1))
        await send_peer(cluster.addresses[target], node_tokens(SECRET)(other), spoof)
        peers = cluster.servers[target].peers
        assert peers is not None
        assert peers.spoofed == 1
        await asyncio.sleep(0.2)
        assert replica.promised[0] < 10**6, "a message under another node's name was taken"
        # A token naming no node (the old shared kind) may not speak at all.
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await send_peer(cluster.addresses[target], token("cluster", PEER), spoof)
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        # Control: the same message under the leader's own token is taken.
        await send_peer(cluster.addresses[target], node_tokens(SECRET)(leader), spoof)
        # (The real leader, refused, may at once campaign above it: hence >=.)
        await wait_until("the promise", lambda: replica.promised[0] >= 10**6)
    finally:
        await cluster.stop()


def rotate(path: Path, tok: str) -> None:
    tmp = path.with_suffix(".new")
    tmp.write_text(tok + "\n")
    os.replace(tmp, path)


async def test_a_revoked_peer_token_is_cut_off_and_a_rotated_one_picked_up(
    tmp_path: Path,
) -> None:
    revoked = tmp_path / "revoked"
    files = {i: tmp_path / f"peer-token-{i}" for i in (1, 2, 3)}
    for i, path in files.items():
        rotate(path, token("cluster", PEER, subject=node_subject(i), token_id=f"n{i}-a"))
    cluster = Cluster(
        tmp_path,
        verifier=Verifier(SECRET, revoked=RevokedTokens(revoked)),
        peer_token=lambda i: TokenFile(files[i]),
    )
    await cluster.start()
    try:
        leader = await cluster.leader()
        follower, third = (i for i in sorted(cluster.addresses) if i != leader)
        await cluster.stop_node(third)  # the leader needs the follower's answers now
        producer = token("acme", "producer")
        async with Client(
            cluster.addresses[leader], max_retries=0, timeout_s=5, token=producer
        ) as c:
            await c.enqueue("q", b"before")
        # Revoke the follower's token: its stream to the leader ends, and a new one is refused.
        peers = cluster.servers[leader].peers
        assert peers is not None
        refused = peers.refused
        revoked.write_text(f"n{follower}-a\n")
        await wait_until("the stream to end", lambda: peers.refused > refused)
        with pytest.raises(PQueueError):
            async with Client(
                cluster.addresses[leader], max_retries=0, timeout_s=2, token=producer
            ) as c:
                await c.enqueue("q", b"no quorum")
        # Rotate: the follower reads its new token on its next connection, no restart.
        rotate(files[follower], token("cluster", PEER, subject=node_subject(follower)))
        deadline = time.monotonic() + 20
        while True:
            try:
                async with Client(cluster.addresses[leader], timeout_s=3, token=producer) as c:
                    await c.enqueue("q", b"after")
                break
            except PQueueError:
                assert time.monotonic() < deadline, "the rotated token was never used"
                await asyncio.sleep(0.2)
    finally:
        await cluster.stop()


async def test_pq_cluster_status_works_on_a_secured_cluster(tmp_path: Path) -> None:
    ca = Authority.new()
    cluster = Cluster(
        tmp_path,
        tls=lambda i: ca.tls(f"n{i}"),
        verifier=Verifier(SECRET),
        peer_token=node_tokens(SECRET),
    )
    await cluster.start()
    try:
        await cluster.leader()
        cert, key = ca.issue("ops")
        files = {"ca": ca.pem, "cert": cert, "key": key}
        for name, data in files.items():
            (tmp_path / name).write_bytes(data)
        run = await asyncio.create_subprocess_exec(
            *PQ, "--endpoint", cluster.addresses[1], "--token", token("ops", "admin"),
            "--tls-ca", str(tmp_path / "ca"), "--tls-cert", str(tmp_path / "cert"),
            "--tls-key", str(tmp_path / "key"), "-o", "json", "cluster", "status",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await run.communicate()
        assert run.returncode == 0, err.decode()
        rows = json.loads(out)
        assert sorted(r["node"] for r in rows) == ["n1", "n2", "n3"]
        assert all(r["role"] != "down" for r in rows), rows
    finally:
        await cluster.stop()
