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

gRPC runs as pq's own processes run it (``pqueue.cli.grpc_env``'s poller
path) unless ``GRPC_EXPERIMENTS`` is set. It prints the round trip's
p50/p90/p99 and µs of CPU per round trip of each side over the measured
round trips (each process counts its own; the asking side's includes the
wake-up after its pause), per shape, over ``--rounds`` rounds that
alternate the shapes. Each process binds port 0
and dies with its parent. ``--hogs N`` runs N processes busy half of each
millisecond meanwhile, as a full machine's other processes are: a hop's
latency is mostly the wake-ups of the processes and threads it crosses.
Quote ratios between shapes of one run; the machine is shared.

    python -m bench.hops [--n 2000] [--rounds 3] [--hogs 0] [--payload 2048] [-o json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import os
import select
import signal
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

from pqueue.cli.grpc_env import POLLER_PATH

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
#: The asking side's last request: the answering side reports and ends.
_QUIT = b"q"
#: prctl(2): a signal for this process when its parent dies.
_PR_SET_PDEATHSIG = 1
#: The bench's pid, in its children's environment.
_PARENT_ENV = "PQ_HOPS_PARENT"
_ROOT = Path(__file__).resolve().parents[1]


def _cpu_s() -> float:
    """This process's CPU so far (user + system, every thread)."""
    return time.process_time()


def _die_with_parent() -> None:
    """Linux: this process gets SIGKILL when its parent dies (a bench killed
    by a timeout leaves no busy or waiting process behind); one whose parent
    died before it got here ends now."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != int(os.environ.get(_PARENT_ENV, os.getppid())):
        os._exit(1)


class _Answers:
    """The answering side's count: its CPU from the first measured request
    (after the warm-up) to the last, and the end (a ``q`` request)."""

    def __init__(self) -> None:
        self.seen = 0
        self.started = 0.0
        self.cpu_s = 0.0
        self.done = asyncio.Event()

    def request(self, message: bytes) -> bool:
        """Count ``message``; False once it is the end."""
        if message == _QUIT:
            self.cpu_s = _cpu_s() - self.started if self.started else 0.0
            self.done.set()
            return False
        self.seen += 1
        if self.seen == WARMUP + 1:
            self.started = _cpu_s()
        return True


class _Framed(asyncio.Protocol):
    """Length-prefixed messages from a TCP connection, each handed on."""

    def __init__(self, deliver: Callable[[bytes], None]) -> None:
        self.deliver = deliver
        self.buffer = bytearray()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while len(self.buffer) >= _FRAME.size:
            (size,) = _FRAME.unpack_from(self.buffer)
            if len(self.buffer) < _FRAME.size + size:
                return
            self.deliver(bytes(self.buffer[_FRAME.size : _FRAME.size + size]))
            del self.buffer[: _FRAME.size + size]


def _framed(message: bytes) -> bytes:
    return _FRAME.pack(len(message)) + message


async def _answer(shape: str) -> None:
    """The answering process: serve, say the port, answer until ``q``, then
    print its CPU over the measured requests."""
    answers = _Answers()
    reply = b"y" * REPLY_BYTES
    loop = asyncio.get_running_loop()
    if shape == "tcp":
        back: list[asyncio.Transport] = []
        owed = 0  # requests that came before the connection back

        def deliver(message: bytes) -> None:
            nonlocal owed
            if answers.request(message):
                if back:
                    back[0].write(_framed(reply))
                else:
                    owed += 1

        server = await loop.create_server(lambda: _Framed(deliver), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        print(f"ready {port}", flush=True)
        back.append(await _connect_tcp(int(await _read_line())))
        back[0].write(_framed(reply) * owed)
        await answers.done.wait()
        back[0].close()
        server.close()
    else:
        channel: list[grpc.aio.Channel] = []
        peer_calls: list[grpc.aio.StreamUnaryCall[bytes, bytes]] = []

        back_ready = asyncio.Event()

        async def take(requests: AsyncIterator[bytes], _: Any) -> bytes:
            async for message in requests:
                if answers.request(message):
                    await back_ready.wait()  # the stream back is open
                    await peer_calls[0].write(reply)
            return b""

        async def unary(request: bytes, _: Any) -> bytes:
            answers.request(request)
            return reply

        async def bidi(requests: AsyncIterator[bytes], context: Any) -> None:
            async for message in requests:
                if not answers.request(message):
                    return
                await context.write(reply)

        grpc_server = grpc.aio.server()
        handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
            "Take": grpc.stream_unary_rpc_method_handler(take),
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
            "Bidi": grpc.stream_stream_rpc_method_handler(bidi),
        }
        grpc_server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(_SERVICE, handlers),)
        )
        port = grpc_server.add_insecure_port("127.0.0.1:0")
        await grpc_server.start()
        print(f"ready {port}", flush=True)
        if shape == "grpc-peer":  # answers go back on a stream of its own
            channel.append(grpc.aio.insecure_channel(f"127.0.0.1:{await _read_line()}"))
            peer_calls.append(channel[0].stream_unary(f"/{_SERVICE}/Take")())
            back_ready.set()
        await answers.done.wait()
        if peer_calls:
            await peer_calls[0].done_writing()
            await peer_calls[0]
        for ch in channel:
            await ch.close()
        await grpc_server.stop(1)
    print(json.dumps({"cpu_s": answers.cpu_s, "seen": answers.seen}), flush=True)


async def _read_line() -> str:
    """A line from stdin (the driver's), read off the event loop."""
    line: str = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    return line.strip()


async def _connect_tcp(port: int) -> asyncio.Transport:
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_connection(asyncio.Protocol, "127.0.0.1", port)
    return transport


async def _ask(shape: str, other: int, n: int, payload: int) -> None:
    """The asking process: ``n`` timed round trips after a warm-up, then
    ``q``; prints the times and its CPU over them."""
    inbox: asyncio.Queue[bytes] = asyncio.Queue()
    loop = asyncio.get_running_loop()
    send: Callable[[bytes], Awaitable[None]]
    finish: Callable[[], Awaitable[Any]]
    if shape in ("tcp", "grpc-peer"):  # answers come to a server of this side's own
        if shape == "tcp":
            server = await loop.create_server(lambda: _Framed(inbox.put_nowait), "127.0.0.1", 0)
            port = server.sockets[0].getsockname()[1]
        else:

            async def take(requests: AsyncIterator[bytes], _: Any) -> bytes:
                async for message in requests:
                    inbox.put_nowait(message)
                return b""

            grpc_server = grpc.aio.server()
            handler: grpc.RpcMethodHandler[Any, Any] = grpc.stream_unary_rpc_method_handler(take)
            grpc_server.add_generic_rpc_handlers(
                (grpc.method_handlers_generic_handler(_SERVICE, {"Take": handler}),)
            )
            port = grpc_server.add_insecure_port("127.0.0.1:0")
            await grpc_server.start()
        print(f"port {port}", flush=True)
    if shape == "tcp":
        transport = await _connect_tcp(other)

        async def send_tcp(message: bytes) -> None:
            transport.write(_framed(message))

        async def finish_tcp() -> None:
            transport.close()  # what is buffered goes first
            await asyncio.sleep(0.05)
            server.close()

        send, finish = send_tcp, finish_tcp
    else:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{other}")
        await channel.channel_ready()
        if shape == "grpc-peer":
            call: grpc.aio.StreamUnaryCall[bytes, bytes] = channel.stream_unary(
                f"/{_SERVICE}/Take"
            )()

            async def send_peer(message: bytes) -> None:
                await call.write(message)

            async def finish_peer() -> None:
                await call.done_writing()
                await call  # the other side has read everything, the q too
                await channel.close()
                await grpc_server.stop(1)

            send, finish = send_peer, finish_peer
        elif shape == "grpc-stream":
            bidi: grpc.aio.StreamStreamCall[bytes, bytes] = channel.stream_stream(
                f"/{_SERVICE}/Bidi"
            )()

            async def send_bidi(message: bytes) -> None:
                await bidi.write(message)
                if message != _QUIT:
                    reply = await bidi.read()
                    assert isinstance(reply, bytes)
                    inbox.put_nowait(reply)

            async def finish_bidi() -> None:
                await bidi.done_writing()
                await bidi.wait_for_connection()
                await channel.close()

            send, finish = send_bidi, finish_bidi
        else:
            unary: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
                f"/{_SERVICE}/Unary"
            )

            async def send_unary(message: bytes) -> None:
                reply = await unary(message)
                if message != _QUIT:
                    inbox.put_nowait(reply)

            async def finish_unary() -> None:
                await channel.close()

            send, finish = send_unary, finish_unary
    request = b"x" * payload
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
    await send(_QUIT)
    await finish()
    print(json.dumps({"times": times, "cpu_s": cpu}), flush=True)


def _line(proc: subprocess.Popen[str], timeout_s: float, what: str) -> str:
    """The next line ``proc`` prints, within ``timeout_s``."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
    line = proc.stdout.readline() if ready else ""
    if not line:
        raise SystemExit(f"{what}: no answer in {timeout_s:.0f} s (exit {proc.poll()})")
    return line.strip()


def _round(shape: str, n: int, payload: int) -> dict[str, float]:
    """One round of ``shape``: an answering process and an asking one, each
    on a port of its own choosing (bound to 0, so no two share one)."""
    cmd = [sys.executable, "-m", "bench.hops", "--side", shape]
    env = dict(os.environ, **{_PARENT_ENV: str(os.getpid())})
    # gRPC's I/O path as pq's processes take it (unless the caller chose one).
    env.setdefault("GRPC_EXPERIMENTS", POLLER_PATH)
    pipes: dict[str, Any] = {"stdout": subprocess.PIPE, "text": True, "cwd": _ROOT, "env": env}
    answering = subprocess.Popen([*cmd, "--answer"], stdin=subprocess.PIPE, **pipes)
    asking: subprocess.Popen[str] | None = None
    try:
        ready = _line(answering, 60, f"{shape}: the answering process").split()
        if ready[:1] != ["ready"]:
            raise SystemExit(f"{shape}: the answering process said {ready!r}")
        ask = [*cmd, "--other", ready[1], "--n", str(n), "--payload", str(payload)]
        asking = subprocess.Popen(ask, stderr=subprocess.PIPE, **pipes)
        if shape in ("tcp", "grpc-peer"):  # it answers on a connection back
            port = _line(asking, 60, f"{shape}: the asking process").split()[-1]
            assert answering.stdin is not None
            answering.stdin.write(port + "\n")
            answering.stdin.flush()
        try:
            asked, err = asking.communicate(timeout=60 + n * 0.02)
        except subprocess.TimeoutExpired:
            raise SystemExit(f"{shape}: the asking process took too long") from None
        if asking.returncode:
            raise SystemExit(f"{shape}: the asking process failed:\n{err}")
        answered, _ = answering.communicate(timeout=30)
    finally:
        for proc in (asking, answering):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
    result = json.loads(asked.strip().splitlines()[-1])
    theirs = json.loads(answered.strip().splitlines()[-1])
    if theirs["seen"] != WARMUP + n:
        raise SystemExit(f"{shape}: {theirs['seen']} requests answered of {WARMUP + n}")
    times = sorted(result["times"])
    k = len(times)
    return {
        "p50_us": times[k // 2] * 1e6,
        "p90_us": times[int(k * 0.9)] * 1e6,
        "p99_us": times[min(k - 1, int(k * 0.99))] * 1e6,
        "asking_cpu_us": result["cpu_s"] / n * 1e6,
        # Over the requests after the warm-up, as the asking side's.
        "answering_cpu_us": theirs["cpu_s"] / n * 1e6,
    }


def _hog() -> None:
    """Busy half of every millisecond, for ever (a process of a full machine)."""
    _die_with_parent()
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
    parser.add_argument("--other", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--answer", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--hog", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.hog:
        _hog()
    if args.side:
        _die_with_parent()
        uvloop.install()
        if args.answer:
            asyncio.run(_answer(args.side))
        else:
            asyncio.run(_ask(args.side, args.other, args.n, args.payload))
        return 0
    if args.n < 1 or args.rounds < 1 or args.payload < 1 or args.hogs < 0:
        parser.error("--n, --rounds and --payload must be at least 1, --hogs 0 or more")
    shapes = [s for s in args.shapes.split(",") if s]
    unknown = set(shapes) - set(SHAPES)
    if unknown:
        parser.error(f"unknown shapes {sorted(unknown)}; choose from {', '.join(SHAPES)}")
    hogs: list[subprocess.Popen[bytes]] = []
    results: dict[str, list[dict[str, float]]] = {s: [] for s in shapes}
    try:
        for _ in range(args.hogs):
            hogs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "bench.hops", "--hog"],
                    cwd=_ROOT,
                    env=dict(os.environ, **{_PARENT_ENV: str(os.getpid())}),
                )
            )
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
