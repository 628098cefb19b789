"""``pq dev-cluster`` (what ``make cluster`` runs) and ``pq cluster ...``.

Starts each node as its own ``pq node`` process on loopback, prints a table
of nodes, ports and data dirs, waits for a leader, and supervises: a node an
operator stopped (``pq cluster stop-node N``) stays down until
``pq cluster start-node N``; a node that died on its own is reported and
stays down too, so failover can be watched. Ctrl-C or SIGTERM stops them all.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from pqueue import render
from pqueue.client import Client
from pqueue.errors import PQueueError
from pqueue.tls import Tls


def free_ports(n: int) -> list[int]:
    """Ports the OS has just handed out (for tests; a small race remains)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def cluster_addresses(nodes: int, base_port: int) -> dict[int, str]:
    """Node id -> address: base_port+1.. (or free ports when base_port is 0)."""
    ports = free_ports(nodes) if base_port == 0 else [base_port + i for i in range(1, nodes + 1)]
    return {i: f"127.0.0.1:{port}" for i, port in enumerate(ports, start=1)}


def peers_arg(addresses: dict[int, str]) -> str:
    """``1=host:port,2=host:port,...``"""
    return ",".join(f"{i}={a}" for i, a in sorted(addresses.items()))


class _Node:
    def __init__(
        self,
        root: Path,
        node_id: int,
        addresses: dict[int, str],
        store: str | None = None,
        metrics: str = "",
    ) -> None:
        self.id = node_id
        self.metrics = metrics
        self.name = f"n{node_id}"
        self.address = addresses[node_id]
        self.data = root / self.name
        self.log = root / f"{self.name}.log"
        self.cmd = [sys.executable, "-m", "pqueue.cli", "node", "--data-dir", str(self.data)]
        self.cmd += ["--listen", self.address, "--node-id", str(node_id)]
        self.cmd += ["--peers", peers_arg(addresses)]
        if store:
            self.cmd += ["--store", store, "--pg-schema", f"pq_n{node_id}"]
        if metrics:
            self.cmd += ["--metrics-listen", metrics]
        self.proc: subprocess.Popen[bytes] | None = None
        self.reported_exit = False

    def start(self) -> None:
        self.data.mkdir(parents=True, exist_ok=True)
        (self.data / "STOPPED").unlink(missing_ok=True)
        (self.data / "START").unlink(missing_ok=True)
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=log)
        (self.data / "PID").write_text(f"{self.proc.pid}\n")
        self.reported_exit = False

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class _Balancer(_Node):
    """The balancer in front of the nodes: supervised like one, never restarted."""

    def __init__(self, root: Path, address: str, metrics: str, backends: list[str]) -> None:
        super().__init__(root, 0, {0: address}, metrics=metrics)
        self.name = "balancer"
        self.data = root / self.name
        self.log = root / f"{self.name}.log"
        self.cmd = [sys.executable, "-m", "pqueue.cli", "balancer", "run", "--listen", address]
        self.cmd += ["--backends", ",".join(backends), "--metrics-listen", metrics]


async def _statuses(
    addresses: dict[int, str], timeout_s: float = 1.0, **options: Any
) -> dict[int, Any]:
    """Each node's own status (None where it cannot be asked); ``options``:
    more ``Client`` options (token, TLS), as for the first node asked."""

    async def one(address: str) -> Any:
        try:
            async with Client(address, timeout_s=timeout_s, max_retries=0, **options) as c:
                return await c.node_status()
        except PQueueError:
            return None

    results = await asyncio.gather(*(one(a) for a in addresses.values()))
    return dict(zip(addresses, results, strict=True))


async def _balancer_leader(address: str) -> str:
    try:
        async with Client(address, timeout_s=0.5, max_retries=0) as c:
            return (await c.balancer_status()).leader_address
    except PQueueError:
        return ""


def run_dev_cluster(
    root: Path, base_port: int, nodes: int, metrics_port: int, store: str | None = None
) -> int:
    """Run until interrupted; non-zero if the cluster fails to come up."""
    root.mkdir(parents=True, exist_ok=True)
    addresses = cluster_addresses(nodes, base_port)
    balancer_port = base_port or free_ports(1)[0]
    if base_port == 0 or metrics_port == 0:  # 0: any free ports
        metrics_ports = free_ports(nodes + 1)
    else:
        metrics_ports = [metrics_port + i for i in range(nodes + 1)]
    balancer = _Balancer(
        root,
        f"127.0.0.1:{balancer_port}",
        f"127.0.0.1:{metrics_ports[0]}",
        [addresses[i] for i in sorted(addresses)],
    )
    nodes_ = [
        _Node(root, i, addresses, store, f"127.0.0.1:{metrics_ports[i]}") for i in sorted(addresses)
    ]
    cluster = [*nodes_, balancer]
    stop = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        for node in cluster:
            node.start()
        deadline = time.monotonic() + 30
        leader = ""
        while not leader:  # the balancer knows a leader: nodes elected one, it probed them
            if stop or time.monotonic() > deadline or not all(n.running() for n in cluster):
                print(f"the cluster did not come up; see the logs in {root}/")
                return 1
            time.sleep(0.2)
            leader = asyncio.run(_balancer_leader(balancer.address))
        print(f"balancer: {balancer.address}  (metrics: http://{balancer.metrics}/metrics)\n")
        rows = [
            {
                "name": n.name,
                "address": n.address,
                "metrics": f"http://{n.metrics}/metrics",
                "data_dir": str(n.data),
                "log": str(n.log),
            }
            for n in cluster
        ]
        print(render.table(rows))
        print(f"\nleader: n{next(n.id for n in nodes_ if n.address == leader)} ({leader})")
        print(f"ready: export PQ_ENDPOINT={balancer.address}  (Ctrl-C stops the cluster)")
        print(
            "\n*** AUTH IS OFF: this local cluster takes any call from anyone who can reach "
            "127.0.0.1. See README, Security, for tokens, quotas and TLS. ***"
        )
        sys.stdout.flush()
        while not stop:
            for node in cluster:
                if (node.data / "START").exists() and not node.running():
                    print(f"starting {node.name}", flush=True)
                    node.start()
                elif not node.running() and not node.reported_exit:
                    node.reported_exit = True
                    how = "stopped" if (node.data / "STOPPED").exists() else "exited"
                    code = node.proc.returncode if node.proc else "?"
                    again = f"; `pq cluster start-node {node.id}` brings it back" if node.id else ""
                    print(f"{node.name} {how} (status {code}){again}", flush=True)
            time.sleep(0.2)
        return 0
    finally:
        # The balancer first, so it is not left probing nodes that are gone.
        for node in reversed(cluster):
            if node.running() and node.proc is not None:
                node.proc.send_signal(signal.SIGTERM)
        for node in reversed(cluster):
            if node.proc is None:
                continue
            try:
                node.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                node.proc.kill()
            print(f"stopped {node.name}")


def stop_node(root: Path, node_id: int) -> str:
    """Ask the dev cluster's node to stop (SIGTERM); it stays down."""
    data = root / f"n{node_id}"
    pid_file = data / "PID"
    if not pid_file.exists():
        raise ValueError(f"no node n{node_id} under {root}")
    (data / "STOPPED").touch()
    try:
        os.kill(int(pid_file.read_text()), signal.SIGTERM)
    except ProcessLookupError:
        return f"n{node_id} was not running"
    return f"stopping n{node_id}"


def start_node(root: Path, node_id: int) -> str:
    """Ask the running dev cluster to start a stopped node again."""
    data = root / f"n{node_id}"
    if not data.exists():
        raise ValueError(f"no node n{node_id} under {root}")
    (data / "START").touch()
    return f"asked the dev cluster to start n{node_id}"


async def cluster_status(
    endpoint: str, timeout_s: float, token: str | None = None, tls: Tls | None = None
) -> list[dict[str, Any]]:
    """One row per node, from each node's own view; unreachable nodes say so.
    ``token`` and ``tls`` go with every call (the first node's and its peers')."""
    options: dict[str, Any] = {"token": token, "tls": tls}
    async with Client(endpoint, timeout_s=timeout_s, max_retries=0, **options) as c:
        first = await c.node_status()
    peers = dict(first.peers) or {first.node_id: first.address or endpoint}
    statuses = await _statuses(peers, timeout_s=min(timeout_s, 2.0), **options)
    top = max((s.commit_index for s in statuses.values() if s is not None), default=0)
    rows = []
    for node_id in sorted(peers):
        s = statuses[node_id]
        if s is None:
            rows.append({"node": f"n{node_id}", "address": peers[node_id], "role": "down"})
            continue
        rows.append(
            {
                "node": f"n{node_id}",
                "address": peers[node_id],
                "role": s.role,
                "ballot": s.ballot,
                "leader": f"n{s.leader_id}" if s.leader_id else "",
                "commit": s.commit_index,
                "applied": s.applied_index,
                "lag": top - s.applied_index,
                "snapshot": s.snapshot_index,
                "pending": s.pending,
            }
        )
    return rows
