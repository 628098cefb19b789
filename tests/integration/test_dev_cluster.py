"""``make cluster`` never lies: taken ports, stale PID files, start-node on a
running node, nodes that cannot run (issue 12, item 10)."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

from pqueue.cli.devcluster import node_pid

PQ = (sys.executable, "-m", "pqueue.cli")


async def dev_cluster(root: Path, *args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        *PQ, "dev-cluster", "--dir", str(root), *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip


async def until_ready(proc: asyncio.subprocess.Process) -> list[str]:
    """Its stdout up to ``ready:``; fails if it exits first."""
    assert proc.stdout is not None
    lines: list[str] = []
    while not lines or not lines[-1].startswith("ready:"):
        line = await asyncio.wait_for(proc.stdout.readline(), 60)
        if not line:
            raise AssertionError(f"dev-cluster exited: {lines}")
        lines.append(line.decode().strip())
    return lines


async def ended(proc: asyncio.subprocess.Process) -> tuple[int, str, str]:
    """Its exit status and all it printed (it must end on its own)."""
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def pq(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *PQ, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.terminate()
        try:
            await asyncio.wait_for(proc.communicate(), 30)
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def test_the_dev_cluster_never_lies(tmp_path: Path) -> None:
    root = tmp_path / "a"
    a = await dev_cluster(root, "--base-port", "0")
    sleeper = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "import time; time.sleep(60)"
    )
    try:
        lines = await until_ready(a)
        assert lines[0].startswith("web: http://127.0.0.1:")  # the web API's URL first
        balancer = next(x for x in lines if x.startswith("balancer: ")).split()[1]
        port = int(balancer.rsplit(":", 1)[1])

        # Another cluster on ports that are taken (this one's balancer): refused,
        # never "ready:", and the first cluster goes on.
        b = await dev_cluster(tmp_path / "b", "--base-port", str(port), "--metrics-port", "0")
        try:
            code, out, err = await ended(b)
        finally:
            await stop(b)
        assert code == 1
        assert "ready:" not in out
        assert "refusing to start: " in err
        assert f"127.0.0.1:{port}" in err.split("already taken")[0]
        code, out, err = await pq("--endpoint", balancer, "-o", "json", "enqueue", "q", "x")
        assert code == 0, err

        # start-node on a running node: says so, leaves nothing behind.
        pid = node_pid(root, 1)
        assert pid is not None
        code, out, err = await pq("-o", "json", "cluster", "start-node", "1", "--dir", str(root))
        assert code == 0, err
        assert "already running" in json.loads(out)["result"]
        assert not (root / "n1" / "START").exists()
        assert node_pid(root, 1) == pid

        # stop-node on a stale PID file (the PID reused by another process):
        # that process is not signalled.
        code, out, err = await pq("cluster", "stop-node", "3", "--dir", str(root))
        assert code == 0, err
        deadline = time.monotonic() + 20
        while node_pid(root, 3) is not None:
            assert time.monotonic() < deadline, "n3 did not stop"
            await asyncio.sleep(0.1)
        (root / "n3" / "PID").write_text(f"{sleeper.pid}\n")
        code, out, err = await pq("-o", "json", "cluster", "stop-node", "3", "--dir", str(root))
        assert code == 0, err
        assert "not running" in json.loads(out)["result"]
        await asyncio.sleep(0.3)
        assert sleeper.returncode is None  # alive: never signalled
        # ...and start-node brings the real node back.
        code, out, err = await pq("cluster", "start-node", "3", "--dir", str(root))
        assert code == 0, err
        deadline = time.monotonic() + 20
        while node_pid(root, 3) is None:
            assert time.monotonic() < deadline, "n3 did not start again"
            await asyncio.sleep(0.1)
    finally:
        sleeper.kill()
        await sleeper.wait()
        await stop(a)
    assert a.returncode == 0

    # Its nodes cannot run (the dirs belong to a 3-node cluster, not to 2):
    # it says why and exits non-zero, never "ready:".
    again = await dev_cluster(root, "--base-port", "0", "--nodes", "2")
    try:
        code, out, err = await ended(again)
    finally:
        await stop(again)
    assert code == 1
    assert "ready:" not in out
    assert "refusing to start with members [1, 2]" in err
