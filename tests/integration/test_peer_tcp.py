"""The TCP peer transport (``--peer-ports``): real sockets on loopback, a real
``PeerService`` behind the listener, real TLS and tokens; and an in-process
cluster whose nodes talk TCP to some peers and gRPC to one that has no port."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest
import uvloop

from consensus.messages import Heartbeat, Message
from pqueue.cli.devcluster import free_ports
from pqueue.client import Client
from pqueue.node import peer_tcp, peers
from pqueue.node.auth import PEER, Verifier, issue, node_subject
from pqueue.node.peer_codec import encode
from pqueue.node.peer_tcp import FrameError, HelloRefused, PeerListener, header, read_frame
from pqueue.node.peers import PeerService, PeerTransport
from pqueue.node.replicated import ClusterConfig
from pqueue.node.server import NodeServer, ServerConfig
from pqueue.storage.sqlite import SqliteStorage
from pqueue.v1 import peer_pb2 as ppb
from pqueue.v1 import peer_pb2_grpc as ppbg
from pqueue.wire.tls import Tls
from tests.certs import Authority
from tests.inproc import Cluster

SECRET = b"t" * 32


def token(node: int, ttl_s: float = 600, now_s: float | None = None) -> str:
    return issue(SECRET, "cluster", [PEER], ttl_s, subject=node_subject(node), now_s=now_s)


def beat(src: int = 1, dst: int = 2, commit: int = 7) -> Heartbeat:
    return Heartbeat(src=src, dst=dst, ballot=(3, src), commit_index=commit)


@asynccontextmanager
async def listening(
    verifier: Verifier | None = None, tls: Tls | None = None, host: str = "127.0.0.1"
) -> AsyncIterator[tuple[PeerListener, PeerService, list[Message], int]]:
    """A listener on ``host`` (any port) in front of a PeerService that keeps
    what it is handed: (listener, service, delivered, port)."""
    got: list[Message] = []
    service = PeerService(got.append, verifier)
    listener = PeerListener(service, tls)
    port = await listener.bind(host, 0)
    listener.start()
    try:
        yield listener, service, got, port
    finally:
        await listener.stop()


@asynccontextmanager
async def sending(
    port: int,
    grpc_port: int = 1,
    token: str | None = None,
    tls: Tls | None = None,
) -> AsyncIterator[PeerTransport]:
    """Node 1's transport towards node 2 (TCP ``port``; its gRPC at ``grpc_port``)."""
    transport = PeerTransport(
        1,
        {1: "127.0.0.1:1", 2: f"127.0.0.1:{grpc_port}"},
        tls=tls,
        token=token,
        peer_ports={1: 1, 2: port},
    )
    transport.start()
    try:
        yield transport
    finally:
        await transport.stop()


async def until(check: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def test_a_frame_is_its_length_then_its_bytes_and_nothing_else_is_taken() -> None:
    def reader(data: bytes) -> asyncio.StreamReader:
        r = asyncio.StreamReader()
        r.feed_data(data)
        r.feed_eof()
        return r

    r = reader(header(3) + b"abc" + header(0))
    assert await read_frame(r, 10) == b"abc"
    assert await read_frame(r, 10) == b""
    assert await read_frame(r, 10) is None  # a clean end, between frames
    with pytest.raises(FrameError, match="11-byte frame"):
        await read_frame(reader(header(11) + b"x" * 11), 10)
    with pytest.raises(FrameError, match="inside a frame's length"):
        await read_frame(reader(b"\x00\x00"), 10)
    with pytest.raises(FrameError, match="inside a frame"):
        await read_frame(reader(header(5) + b"abc"), 10)


async def test_messages_go_over_tcp_to_the_peer_port() -> None:
    async with listening() as (_, _, got, port), sending(port) as transport:
        transport.send(beat(commit=7))
        transport.send(beat(commit=8))
        await until(lambda: len(got) == 2)
        assert got == [beat(commit=7), beat(commit=8)]
        assert transport._small[2].transport == "tcp"


async def test_an_idle_tcp_link_writes_at_flush_without_waiting_for_its_task() -> None:
    async with listening() as (_, _, got, port), sending(port) as transport:
        transport.send(beat(commit=1))
        await until(lambda: len(got) == 1)
        link = transport._small[2]
        await until(lambda: link._direct is not None)  # its task now waits, idle
        transport.send(beat(commit=2))
        transport.send(beat(commit=3))
        assert len(link.queue) == 2  # queued, nothing yielded yet
        assert transport.flush()  # written here, in this call
        assert not link.queue
        await until(lambda: len(got) == 3)
        assert got[1:] == [beat(commit=2), beat(commit=3)]
        # Unflushed, they go as soon as the sender yields (still not by the task).
        transport.send(beat(commit=4))
        await asyncio.sleep(0)
        assert not link.queue
        await until(lambda: len(got) == 4)


async def test_a_flush_into_a_closed_connection_raises_nothing_and_the_link_redials() -> None:
    async with listening() as (listener, _, got, port), sending(port) as transport:
        transport.send(beat(commit=1))
        await until(lambda: len(got) == 1)
        link = transport._small[2]
        await until(lambda: link._direct is not None)
        await listener.stop()  # the peer goes away, its connections with it
        for commit in range(2, 40):  # into the closing connection, then none
            transport.send(beat(commit=commit))
            transport.flush()
            await asyncio.sleep(0.005)
        again: list[Message] = []
        back = PeerListener(PeerService(again.append, None), None)
        await back.bind("127.0.0.1", port)
        back.start()
        try:
            transport.send(beat(commit=99))
            transport.flush()
            await until(lambda: beat(commit=99) in again, timeout_s=10)
        finally:
            await back.stop()


async def test_a_link_over_its_socket_buffer_hands_back_to_its_task_and_keeps_order() -> None:
    from consensus.messages import Accept

    def accept(slot: int) -> Accept:
        value = bytes([slot]) * (3 << 20)  # over the 1 MiB a link writes before draining
        return Accept(src=1, dst=2, ballot=(3, 1), entries=((slot, value),), commit_index=0)

    async with listening() as (_, _, got, port), sending(port) as transport:
        transport.send(accept(1))
        await until(lambda: len(got) == 1, timeout_s=20)
        link = transport._links[2]
        await until(lambda: link._direct is not None)
        slot = 1
        while link._direct is not None:  # until the kernel's buffer is full too
            slot += 1
            assert slot < 40, "the socket never filled"
            transport.send(accept(slot))
            transport.flush()
        # Handed back: what comes now waits for the task, which drains the
        # socket, then sends the rest, in order.
        for more in (slot + 1, slot + 2):
            transport.send(accept(more))
            assert not transport.flush()
        assert len(link.queue) == 2
        await until(lambda: len(got) == slot + 2, timeout_s=30)
        assert [m.entries[0][0] for m in got if isinstance(m, Accept)] == list(range(1, slot + 3))
        await until(lambda: link._direct is not None)  # idle again: written directly


async def test_entries_of_megabytes_go_on_the_bulk_lane_whole() -> None:
    from consensus.messages import Accept

    value = bytes(range(256)) * (12 << 12)  # 12 MiB
    accept = Accept(src=1, dst=2, ballot=(3, 1), entries=((5, value),), commit_index=4)
    async with listening() as (_, _, got, port), sending(port) as transport:
        transport.send(accept)
        await until(lambda: len(got) == 1, timeout_s=20)
        assert got == [accept]
        assert transport._links[2].transport == "tcp"


async def test_a_hello_without_a_valid_token_is_refused_and_said(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    async with listening(Verifier(SECRET)) as (_, service, got, port):
        with pytest.raises(HelloRefused, match="requires a peer token"):
            await peer_tcp.dial("127.0.0.1", port, None, ppb.PeerHello(node=1))
        stranger = issue(b"x" * 32, "cluster", [PEER], 600, subject=node_subject(1))
        with pytest.raises(HelloRefused, match=r"signature|invalid|verif"):
            await peer_tcp.dial("127.0.0.1", port, None, ppb.PeerHello(node=1, token=stranger))
        not_a_peer = issue(SECRET, "cluster", ["producer"], 600, subject=node_subject(1))
        with pytest.raises(HelloRefused, match="peer role"):
            await peer_tcp.dial("127.0.0.1", port, None, ppb.PeerHello(node=1, token=not_a_peer))
        # A good token for node 1 in a hello that says node 2: refused too.
        with pytest.raises(HelloRefused, match="names node 2 but the token node 1"):
            await peer_tcp.dial("127.0.0.1", port, None, ppb.PeerHello(node=2, token=token(1)))
        # A hello that names no node at all: refused before its token is read.
        with pytest.raises(HelloRefused, match="must name its node"):
            await peer_tcp.dial("127.0.0.1", port, None, ppb.PeerHello(token=token(1)))
        assert service.refused == 4
        assert got == []
        # The sender says so too, and keeps trying (bounded noise).
        async with sending(port) as transport:
            transport.send(beat())
            await until(lambda: transport._small[2]._refusals >= 1)
        assert any("refused this node's hello" in r.getMessage() for r in caplog.records)
        assert got == []


@pytest.mark.parametrize("auth", [True, False])
async def test_a_node_speaks_only_for_itself_over_tcp(auth: bool) -> None:
    # With auth, the node its token names; without, the node its hello names.
    async with (
        listening(Verifier(SECRET) if auth else None) as (_, service, got, port),
        sending(port, token=token(1) if auth else None) as transport,
    ):
        transport.send(beat(src=3))  # claims another sender: dropped
        transport.send(beat(src=1, commit=9))
        await until(lambda: len(got) == 1)
        assert got == [beat(src=1, commit=9)]
        assert service.spoofed == 1


async def test_an_expired_token_ends_the_connection_and_each_one_after() -> None:
    now = [time.time()]
    verifier = Verifier(SECRET, clock_s=lambda: now[0], leeway_s=0)
    async with (
        listening(verifier) as (_, service, got, port),
        sending(port, token=token(1, ttl_s=60, now_s=now[0])) as transport,
    ):
        transport.send(beat(commit=1))
        await until(lambda: len(got) == 1)
        now[0] += 120  # the token has expired
        for commit in range(2, 100):  # the sender sees the end at its next write
            transport.send(beat(commit=commit))
            if service.refused >= 2:  # ended, and the next connection too
                break
            await asyncio.sleep(0.05)
        assert service.refused >= 2
        assert got == [beat(commit=1)]


async def test_mutual_tls_takes_only_a_certificate_from_the_ca() -> None:
    ca = Authority.new()
    async with listening(tls=ca.tls("node2")) as (_, _, got, port):
        async with sending(port, tls=ca.tls("node1")) as transport:
            transport.send(beat())
            await until(lambda: len(got) == 1)
            assert transport._small[2].transport == "tcp"
        # No client certificate: the handshake fails, nothing is read.
        with pytest.raises((OSError, EOFError, FrameError)):
            await peer_tcp.dial("127.0.0.1", port, Tls(ca=ca.pem), ppb.PeerHello(node=1))
        # A certificate from another CA: the same.
        other = Authority.new("another CA").tls("node1")
        with pytest.raises((OSError, EOFError, FrameError)):
            await peer_tcp.dial(
                "127.0.0.1", port, Tls(other.cert, other.key, ca.pem), ppb.PeerHello(node=1)
            )
        assert len(got) == 1
    # The dialing side checks the listener too: a certificate from another CA,
    # or one for another name, and it sends nothing.
    # (The test certificates name localhost and 127.0.0.1, not 127.0.0.2.)
    for listener_tls, host in ((other, "127.0.0.1"), (ca.tls("node2"), "127.0.0.2")):
        async with listening(tls=listener_tls, host=host) as (_, _, got, port):
            with pytest.raises(ssl.SSLCertVerificationError):
                await peer_tcp.dial(host, port, ca.tls("node1"), ppb.PeerHello(node=1))
            assert got == []


async def test_an_oversized_frame_or_a_silent_stranger_is_cut_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(peer_tcp, "HELLO_TIMEOUT_S", 0.3)
    async with listening() as (listener, _, got, port):
        # A hello larger than a hello may be: the connection ends unread.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(header(peer_tcp.HELLO_MAX_BYTES + 1) + b"x" * 100)
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        # A frame past the limit after a good hello: the same.
        reader, writer = await peer_tcp.dial("127.0.0.1", port, None, ppb.PeerHello(node=1))
        writer.write(header(peer_tcp.MAX_FRAME_BYTES + 1))
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        await until(lambda: listener.broken == 2)
        # Connected, and saying nothing: closed after the hello timeout.
        started = time.monotonic()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await asyncio.wait_for(reader.read(), 5) == b""
        assert time.monotonic() - started < 4
        writer.close()
        assert got == []


@asynccontextmanager
async def grpc_peer() -> AsyncIterator[tuple[list[Message], int]]:
    """Node 2 on gRPC only (an older release): what it is handed, its port."""
    got: list[Message] = []
    server = grpc.aio.server()
    ppbg.add_PeerServicer_to_server(PeerService(got.append), server)
    grpc_port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield got, grpc_port
    finally:
        await server.stop(0)


async def test_a_peer_without_a_tcp_listener_is_reached_over_grpc_and_tcp_once_it_has_one(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(peers, "GRPC_FALLBACK_S", 0.2)
    caplog.set_level(logging.INFO, logger="pqueue.node.peers")
    async with grpc_peer() as (got, grpc_port):
        nobody = free_ports(1)[0]
        async with sending(nobody, grpc_port=grpc_port) as transport:
            transport.send(beat(commit=3))
            await until(lambda: len(got) == 1)
            assert transport._small[2].transport == "grpc"
            assert any("no peer connection to" in r.getMessage() for r in caplog.records)
            # Upgraded: its TCP port opens, and the link moves there while it sends.
            on_tcp: list[Message] = []
            listener = PeerListener(PeerService(on_tcp.append))
            await listener.bind("127.0.0.1", nobody)
            listener.start()
            try:
                for commit in range(4, 200):
                    transport.send(beat(commit=commit))
                    if on_tcp:
                        break
                    await asyncio.sleep(0.05)
                assert on_tcp, "the link never moved to TCP"
                assert transport._small[2].transport == "tcp"
                # Every message went one way or the other: none was lost on the move.
                await until(lambda: len(got) + len(on_tcp) >= commit - 2)
                sent = sorted(m.commit_index for m in [*got, *on_tcp] if isinstance(m, Heartbeat))
                assert sent == list(range(3, commit + 1))
            finally:
                await listener.stop()


async def test_a_tcp_port_that_never_answers_falls_back_to_grpc(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A peer port that takes connections but never says a word (a firewall
    that drops, a proxy in the way): after a dial times out and the gRPC port
    answers, the link sends on gRPC rather than waiting for TCP."""
    monkeypatch.setattr(peer_tcp, "DIAL_TIMEOUT_S", 0.3)
    async with grpc_peer() as (got, grpc_port):
        with socket.socket() as silent:
            silent.bind(("127.0.0.1", 0))
            silent.listen()  # connections complete in the kernel; nothing answers
            port = silent.getsockname()[1]
            async with sending(port, grpc_port=grpc_port) as transport:
                transport.send(beat())
                await until(lambda: len(got) == 1)
                assert transport._small[2].transport == "grpc"


async def test_a_peer_that_is_not_up_is_not_taken_for_an_older_one(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Neither port answers yet (a node starting): TCP is asked again, not
    gRPC for the fallback's whole time; the peer is reached over TCP once up."""
    caplog.set_level(logging.INFO, logger="pqueue.node.peers")
    port, grpc_port = free_ports(2)
    async with sending(port, grpc_port=grpc_port) as transport:
        transport.send(beat())
        await asyncio.sleep(0.3)
        got: list[Message] = []
        listener = PeerListener(PeerService(got.append))
        await listener.bind("127.0.0.1", port)
        listener.start()
        try:
            await until(lambda: len(got) == 1)
            assert transport._small[2].transport == "tcp"
        finally:
            await listener.stop()
    assert not any("the gRPC stream" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("with_tls", [False, True])
async def test_a_hello_waits_for_the_node_to_serve_and_strangers_are_capped(
    monkeypatch: pytest.MonkeyPatch, with_tls: bool
) -> None:
    monkeypatch.setattr(peer_tcp, "MAX_UNWELCOMED", 3)
    ca = Authority.new()
    got: list[Message] = []
    listener = PeerListener(PeerService(got.append), ca.tls("node2") if with_tls else None)
    port = await listener.bind("127.0.0.1", 0)
    hello, tls = ppb.PeerHello(node=1), ca.tls("node1") if with_tls else None
    opened: list[asyncio.StreamWriter] = []

    async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        ssl, name = (tls.client_context(), "127.0.0.1") if tls is not None else (None, None)
        r, w = await asyncio.open_connection("127.0.0.1", port, ssl=ssl, server_hostname=name)
        opened.append(w)
        return r, w

    early = asyncio.create_task(peer_tcp.dial("127.0.0.1", port, tls, hello, timeout_s=10))
    try:
        # Before start (the node recovering), a hello is read but not answered.
        await asyncio.sleep(0.2)
        assert not early.done()
        # Two silent strangers fill the waiting room; the next is closed at once.
        # (With TLS, a stranger is counted once its handshake is done.)
        silent = [await connect() for _ in range(2)]
        await until(lambda: listener._unwelcomed == 3)
        reader, _ = await connect()
        assert await asyncio.wait_for(reader.read(), 5) == b""
        await until(lambda: listener.turned_away == 1)
        # Serving now: the early hello is welcomed, and its batches taken.
        listener.start()
        _, early_writer = await asyncio.wait_for(early, 5)
        opened.append(early_writer)
        batch = ppb.PeerBatch(messages=[encode(beat())]).SerializeToString()
        early_writer.write(header(len(batch)) + batch)
        await until(lambda: got == [beat()])
        assert listener.batches == 1
        # stop() ends every connection, welcomed or not, within its bound.
        started = time.monotonic()
        await listener.stop()
        assert time.monotonic() - started < 3
        assert not listener._connections
        for r, _ in silent:
            assert await asyncio.wait_for(r.read(), 5) == b""
        # And a connection that comes after is not taken at all.
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.1", port)
    finally:
        early.cancel()
        for w in opened:
            w.close()
        await listener.stop()


async def test_a_link_stopped_while_it_moves_to_tcp_leaves_no_connection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The transport stops while a link, its TCP dial made, still closes its
    gRPC stream: the new connection is closed with it, not left open."""
    monkeypatch.setattr(peers, "GRPC_FALLBACK_S", 0.1)
    closing = asyncio.Event()

    async def slow_finish(call: object) -> None:
        closing.set()
        await asyncio.sleep(30)

    monkeypatch.setattr(peers, "_finish", slow_finish)
    async with grpc_peer() as (got, grpc_port):
        nobody = free_ports(1)[0]
        async with sending(nobody, grpc_port=grpc_port) as transport:
            transport.send(beat())
            await until(lambda: len(got) == 1)
            listener = PeerListener(PeerService(lambda m: None))
            await listener.bind("127.0.0.1", nobody)
            listener.start()
            try:
                await asyncio.wait_for(closing.wait(), 10)  # dialed; the stream is closing
                assert listener._connections
            finally:
                await transport.stop()  # (again on the way out: harmless)
                await until(lambda: not listener._connections)
                await listener.stop()


async def test_a_cluster_mid_upgrade_runs_with_one_node_on_grpc(tmp_path: Path) -> None:
    """Nodes 1 and 2 take TCP; node 3 has no peer port (an older release):
    1 and 2 talk TCP to each other and gRPC to 3, and every node serves."""
    cluster = Cluster(tmp_path, peer_tcp={1, 2})
    await cluster.start()
    try:
        leader = await cluster.leader()
        async with Client(cluster.addresses[leader]) as c:
            ids = [(await c.enqueue("q", f"job {i}")).job_id for i in range(5)]
            jobs = await c.lease("q", max_jobs=5)
            assert sorted(j.job_id for j in jobs) == sorted(ids)
            await c.ack_many("q", [(j.job_id, j.lease_id) for j in jobs])
        await cluster.settled()
        links = {
            (i, j): link.transport
            for i in (1, 2)
            for j, link in cluster.servers[i].node.transport._links.items()
        }
        assert links == {(1, 2): "tcp", (1, 3): "grpc", (2, 1): "tcp", (2, 3): "grpc"}
        assert all(
            link.transport == "grpc" for link in cluster.servers[3].node.transport._links.values()
        )
        # (settled: node 3, reached only over gRPC, applied what the others did.)
        # What goes over TCP arrives: with node 1 or 2 leading, its heartbeats
        # reach the other through that node's listener.
        if leader == 3:
            assert await cluster.servers[3].node.log.transfer_leadership(10)
            leader = await cluster.leader()
        follower = cluster.servers[3 - leader].peer_listener
        assert follower is not None
        await until(lambda: follower.batches > 0)
        assert cluster.servers[3].peer_listener is None
    finally:
        await cluster.stop()


def test_a_taken_peer_port_stops_the_node_with_a_clear_error(tmp_path: Path) -> None:
    import subprocess
    import sys

    grpc_port, peer_port = free_ports(2)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", peer_port))
        taken.listen()
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "pqueue.cli",
                "node",
                "--data-dir",
                str(tmp_path / "n1"),
                "--listen",
                f"127.0.0.1:{grpc_port}",
                "--peers",
                f"1=127.0.0.1:{grpc_port},2=127.0.0.1:1,3=127.0.0.1:2",
                "--peer-ports",
                str(peer_port),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert out.returncode != 0
    assert f"cannot listen for peers on 127.0.0.1:{peer_port}" in out.stderr + out.stdout


async def test_a_node_that_fails_to_start_leaves_no_port_bound(tmp_path: Path) -> None:
    """Its metrics port taken: ``start`` fails, and neither its gRPC port nor
    its peer port is left listening (a retry in the same process can bind)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = NodeServer(
            SqliteStorage(tmp_path / "n1"),
            ServerConfig(
                listen="127.0.0.1:0", metrics_listen=f"127.0.0.1:{taken.getsockname()[1]}"
            ),
            cluster=ClusterConfig(node_id=1, addresses={}, peer_ports={1: 0}),
        )
        with pytest.raises(OSError, match="in use"):
            await server.start()
    assert server.peer_listener is not None
    peer_port = server.node.cluster.peer_ports[1] if server.node.cluster.peer_ports else 0
    for port in (server.port, peer_port):
        assert port
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.1", port)
    await server.stop()  # harmless after a failed start


def test_the_transport_on_uvloop(monkeypatch: pytest.MonkeyPatch) -> None:
    """pq's processes run on uvloop, whose sockets and TLS are its own: the
    transport's paths that lean on them, there too."""

    async def scenarios() -> None:
        await test_messages_go_over_tcp_to_the_peer_port()
        await test_mutual_tls_takes_only_a_certificate_from_the_ca()
        await test_a_hello_waits_for_the_node_to_serve_and_strangers_are_capped(
            monkeypatch, with_tls=True
        )
        await test_a_tcp_port_that_never_answers_falls_back_to_grpc(monkeypatch)

    uvloop.run(scenarios())
