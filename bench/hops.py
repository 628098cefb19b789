"""What one message hop costs between two processes, by transport.

A job's path is a chain of hops: client to leader (a unary ``Submit``),
leader to followers and back (the peer streams), leader to worker (the
``Consume`` stream). This measures one request/response round trip between
two fresh processes on this machine, for each way pqueue could carry it:

- ``grpc-unary``: a unary call (``Submit``'s shape);
- ``grpc-stream``: a message each way on one open bidirectional stream
  (``Consume``'s shape);
- ``grpc-peer``: two one-way client streams, one each way, each process
  serving the other's (the peer transport's shape);
- ``tcp``: an asyncio ``Protocol`` on uvloop with 4-byte length framing,
  one connection each way (what a peer transport without gRPC would be).

It prints the round trip's p50/p90/p99 and µs of CPU per round trip of
each side (from ``/proc``), per shape, over ``--rounds`` rounds that
alternate the shapes. ``--hogs N`` runs N processes busy half of each
millisecond meanwhile, as a full machine's other processes are: a hop's
latency is mostly the wake-ups of the processes and threads it crosses.
Quote ratios between shapes of one run; the machine is shared.

    python -m bench.hops [--n 2000] [--rounds 3] [--hogs 0] [--payload 2048] [-o json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import uvloop

SHAPES = ("grpc-unary", "grpc-stream", "grpc-peer", "tcp")
#: The answer's size (a vote, a Submit's results).
REPLY_BYTES = 64
#: Round trips before the measured ones (connections, caches, JIT-free warm-up).
WARMUP = 100
#: Pause between round trips: each one meets idle processes, as a hop does
#: when the cluster is not saturated.
GAP_S = 0.001
_SERVICE = "bench.Hops"
_FRAME = struct.Struct(">I")
_ROOT = Path(__file__).resolve().parents[1]


def _cpu_s() -> float:
    """This process's CPU so far (user + system, every thread)."""
    return time.process_time()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class _Inbox:
    """Messages as they arrive, awaited one at a time."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()

    def put(self, message: bytes) -> None:
        self.queue.put_nowait(message)

    async def get(self) -> bytes:
        return await self.queue.get()


class _Framed(asyncio.Protocol):
    """Length-prefixed messages from a TCP connection into an inbox."""

    def __init__(self, inbox: _Inbox) -> None:
        self.inbox = inbox
        self.buffer = bytearray()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while len(self.buffer) >= _FRAME.size:
            (size,) = _FRAME.unpack_from(self.buffer)
            if len(self.buffer) < _FRAME.size + size:
                return
            self.inbox.put(bytes(self.buffer[_FRAME.size : _FRAME.size + size]))
            del self.buffer[: _FRAME.size + size]


async def _one_way_server(port: int, inbox: _Inbox) -> grpc.aio.Server:
    """A gRPC server taking a client stream of messages into ``inbox``."""

    async def take(requests: AsyncIterator[bytes], _: Any) -> bytes:
        async for message in requests:
            inbox.put(message)
        return b""

    async def unary(request: bytes, _: Any) -> bytes:
        return b"y" * REPLY_BYTES

    async def bidi(requests: AsyncIterator[bytes], context: Any) -> None:
        async for _message in requests:
            await context.write(b"y" * REPLY_BYTES)

    server = grpc.aio.server()
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
        "Take": grpc.stream_unary_rpc_method_handler(take),
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "Bidi": grpc.stream_stream_rpc_method_handler(bidi),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(_SERVICE, handlers),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server


async def _connect_tcp(port: int) -> asyncio.Transport:
    loop = asyncio.get_running_loop()
    for _ in range(200):
        try:
            transport, _ = await loop.create_connection(asyncio.Protocol, "127.0.0.1", port)
            return transport
        except OSError:
            await asyncio.sleep(0.02)
    raise SystemExit(f"no listener on {port}")


async def _peer_side(shape: str, my_port: int, other_port: int, answer: bool, n: int) -> None:
    """One process of a round. The answering side echoes every message; the
    asking side times ``n`` round trips and prints them with its CPU."""
    inbox = _Inbox()
    send: Callable[[bytes], Awaitable[None]]
    closers: list[Callable[[], Awaitable[Any]]] = []
    if shape == "tcp":
        server = await asyncio.get_running_loop().create_server(
            lambda: _Framed(inbox), "127.0.0.1", my_port
        )
        if answer:
            print("ready", flush=True)
        transport = await _connect_tcp(other_port)

        async def send_tcp(message: bytes) -> None:
            transport.write(_FRAME.pack(len(message)) + message)

        send = send_tcp

        async def close_tcp() -> None:
            transport.close()
            server.close()

        closers.append(close_tcp)
    else:
        grpc_server = await _one_way_server(my_port, inbox)
        closers.append(lambda: grpc_server.stop(0))
        if answer:
            print("ready", flush=True)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{other_port}")
        await channel.channel_ready()
        closers.append(channel.close)
        if shape == "grpc-peer":
            call: grpc.aio.StreamUnaryCall[bytes, bytes] = channel.stream_unary(
                f"/{_SERVICE}/Take"
            )()

            async def send_peer(message: bytes) -> None:
                await call.write(message)

            send = send_peer
        elif shape == "grpc-stream":
            bidi: grpc.aio.StreamStreamCall[bytes, bytes] = channel.stream_stream(
                f"/{_SERVICE}/Bidi"
            )()

            async def send_bidi(message: bytes) -> None:
                await bidi.write(message)
                reply = await bidi.read()
                assert isinstance(reply, bytes)
                inbox.put(reply)

            send = send_bidi
        else:
            unary: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
                f"/{_SERVICE}/Unary"
            )

            async def send_unary(message: bytes) -> None:
                inbox.put(await unary(message))

            send = send_unary
    payload = os.environ.get("PQ_HOPS_PAYLOAD", "2048")
    request = b"x" * int(payload)
    if answer:  # the echo side of the peer and tcp shapes; the others echo in the server
        if shape in ("grpc-peer", "tcp"):
            started = None
            while await inbox.get() != b"q":
                if started is None:
                    started = _cpu_s()
                await send(b"y" * REPLY_BYTES)
            print(json.dumps({"cpu_s": _cpu_s() - (started or _cpu_s())}), flush=True)
        else:
            await inbox.get()  # the unary and stream shapes answer in the server
            print(json.dumps({"cpu_s": None}), flush=True)
    else:
        for _ in range(WARMUP):
            await send(request)
            await inbox.get()
        times = []
        started = _cpu_s()
        for _ in range(n):
            begin = time.perf_counter()
            await send(request)
            await inbox.get()
            times.append(time.perf_counter() - begin)
            await asyncio.sleep(GAP_S)
        cpu = _cpu_s() - started
        print(json.dumps({"times": times, "cpu_s": cpu}), flush=True)
        if shape in ("grpc-peer", "tcp"):
            await send(b"q")
            await asyncio.sleep(0.2)
    for close in closers:
        await close()


def _cpu_of(pid: int) -> float:
    """A process's CPU so far, from /proc (seconds)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _round(shape: str, n: int, payload: int) -> dict[str, float]:
    """One round of ``shape``: an answering process and an asking one."""
    ports = (_free_port(), _free_port())
    env = dict(os.environ, PQ_HOPS_PAYLOAD=str(payload))
    cmd = [sys.executable, "-m", "bench.hops", "--side", shape, "--n", str(n)]
    answer = subprocess.Popen(
        [*cmd, "--ports", f"{ports[0]},{ports[1]}", "--answer"],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=_ROOT,
    )
    try:
        assert answer.stdout is not None
        if answer.stdout.readline().strip() != "ready":
            raise SystemExit(f"{shape}: the answering process did not start")
        before = _cpu_of(answer.pid)
        asked = subprocess.run(
            [*cmd, "--ports", f"{ports[1]},{ports[0]}"],
            capture_output=True,
            text=True,
            env=env,
            cwd=_ROOT,
            timeout=60 + n * 0.02,
            check=True,
        )
        after = _cpu_of(answer.pid)
        if shape in ("grpc-unary", "grpc-stream"):
            # These answer in its server: nothing tells the answering
            # process the round is over; end it.
            answer.terminate()
        answered, _ = answer.communicate(timeout=30)
    finally:
        if answer.poll() is None:
            answer.kill()
            answer.wait()
    result = json.loads(asked.stdout.strip().splitlines()[-1])
    times = sorted(result["times"])
    k = len(times)
    # The answering side's CPU: its own count from the first message where
    # it sees them (peer, tcp), else /proc over the asking side's warm-up
    # and measured round trips (ticks: coarse, so rounds of a few seconds).
    lines = answered.strip().splitlines() if answered else []
    own = json.loads(lines[-1]).get("cpu_s") if lines and lines[-1].startswith("{") else None
    answering_s = own if own is not None else after - before
    return {
        "p50_us": times[k // 2] * 1e6,
        "p90_us": times[int(k * 0.9)] * 1e6,
        "p99_us": times[min(k - 1, int(k * 0.99))] * 1e6,
        "asking_cpu_us": result["cpu_s"] / n * 1e6,
        "answering_cpu_us": answering_s / (n + WARMUP if own is None else n) * 1e6,
    }


def _hog() -> None:
    """Busy half of every millisecond, for ever (a process of a full machine)."""
    while True:
        until = time.perf_counter() + 0.0005
        while time.perf_counter() < until:
            pass
        time.sleep(0.0005)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--n", type=int, default=2000, help="round trips per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--hogs", type=int, default=0, help="busy processes meanwhile")
    parser.add_argument("--payload", type=int, default=2048, help="request bytes")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("-o", dest="output", choices=("table", "json"), default="table")
    parser.add_argument("--side", choices=SHAPES, help=argparse.SUPPRESS)
    parser.add_argument("--ports", help=argparse.SUPPRESS)
    parser.add_argument("--answer", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--hog", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.hog:
        _hog()
    if args.side:
        mine, other = (int(p) for p in args.ports.split(","))
        uvloop.install()
        asyncio.run(_peer_side(args.side, mine, other, args.answer, args.n))
        return 0
    shapes = [s for s in args.shapes.split(",") if s]
    unknown = set(shapes) - set(SHAPES)
    if unknown:
        parser.error(f"unknown shapes {sorted(unknown)}; choose from {', '.join(SHAPES)}")
    hogs = [
        subprocess.Popen([sys.executable, "-m", "bench.hops", "--hog"], cwd=_ROOT)
        for _ in range(args.hogs)
    ]
    results: dict[str, list[dict[str, float]]] = {s: [] for s in shapes}
    try:
        for r in range(args.rounds):
            for shape in shapes:
                row = _round(shape, args.n, args.payload)
                results[shape].append(row)
                if args.output == "table":
                    print(
                        f"round {r + 1} {shape:12} p50 {row['p50_us']:7.0f} µs",
                        file=sys.stderr,
                    )
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    if args.output == "json":
        print(json.dumps({"n": args.n, "hogs": args.hogs, "shapes": results}, indent=2))
        return 0
    print(
        f"one request ({args.payload} B) and its answer ({REPLY_BYTES} B) between two "
        f"processes, {args.n} round trips a round, {args.rounds} rounds, {args.hogs} busy "
        "processes meanwhile: min-max over the rounds"
    )
    columns = ("p50_us", "p90_us", "p99_us", "asking_cpu_us", "answering_cpu_us")
    print(f"{'shape':12} " + " ".join(f"{c:>17}" for c in columns))
    for shape, rows in results.items():
        cells = [f"{min(r[c] for r in rows):7.0f}-{max(r[c] for r in rows):<8.0f}" for c in columns]
        print(f"{shape:12} " + " ".join(f"{c:>17}" for c in cells))
    base = results.get("grpc-peer")
    if base and "tcp" in results:
        ratios = [t["p50_us"] / g["p50_us"] for t, g in zip(results["tcp"], base, strict=True)]
        print(
            f"tcp / grpc-peer, p50: {min(ratios):.2f}-{max(ratios):.2f}x "
            f"(median {statistics.median(ratios):.2f})"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
