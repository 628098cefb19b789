"""``pq dev-cluster`` (what ``make cluster`` runs) and ``pq cluster ...``.

Starts each node as its own ``pq node`` process on loopback, prints a table
of nodes, ports and data dirs, waits for a leader, and supervises: a node an
operator stopped (``pq cluster stop-node N``) stays down until
``pq cluster start-node N``; a node that died on its own is reported and
stays down too, so failover can be watched. Ctrl-C or SIGTERM stops them all.

It never lies: it refuses to start when one of its ports is taken (another
cluster's, say), says ``ready:`` only once every one of its own processes
runs and its balancer names one of its own nodes as leader, and exits
non-zero when its nodes cannot run (every node or the balancer gone on its
own). ``stop-node`` signals a PID only if that process is the node's own
``pq node`` on its data dir; ``start-node`` on a running node says so and
changes nothing. The cluster's id (``--cluster-id`` of every node) is drawn
once per cluster directory and kept in ``DIR/CLUSTER_ID``.

Over 400 lines on purpose: one program (processes, ports, pid files), for
development only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from pqueue.cli import render
from pqueue.client import Client
from pqueue.errors import PQueueError

#: Where the OS draws ports for ``bind(0)`` and for every outgoing
#: connection's local end (Linux's default, if /proc says nothing).
EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
#: The lowest port ``free_ports`` picks (below: well-known services).
LOWEST_PICKED = 10_000


def ephemeral_range(path: Path = EPHEMERAL_RANGE) -> tuple[int, int]:
    """The OS's ephemeral port range (32768-60999 where unknown)."""
    try:
        low, high = (int(x) for x in path.read_text().split())
    except (OSError, ValueError):
        return 32_768, 60_999
    return low, high


def free_ports(n: int, ephemeral: tuple[int, int] | None = None) -> list[int]:
    """``n`` distinct ports free on 127.0.0.1 now (for tests, benches and a
    local cluster; whoever binds them later may still find one taken).

    Picked below the OS's ephemeral range where there is room: a port the
    OS hands out for ``bind(0)`` is one it hands out again, to the next
    ``bind(0)`` or to an outgoing connection's local end, as soon as it is
    closed, so a node started on it a moment later could find it taken (CI
    saw two nodes of one fault-test cluster fail to bind that way). A port
    below the range is only ever taken by an explicit bind. Each is checked
    by binding it, all held until all are found."""
    low, _ = ephemeral or ephemeral_range()
    span = range(LOWEST_PICKED, low)
    socks: list[socket.socket] = []
    try:
        if len(span) >= 4 * n:
            for port in random.sample(span, min(len(span), 64 * n)):
                s = socket.socket()
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    s.close()
                    continue
                socks.append(s)
                if len(socks) == n:
                    return [s.getsockname()[1] for s in socks]
        while len(socks) < n:  # no room below the range (or all taken): the OS's pick
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
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
        cluster_id: str = "",
        peer_ports: dict[int, int] | None = None,
    ) -> None:
        self.id = node_id
        self.metrics = metrics
        #: Where it takes its peers' TCP connections ("": none).
        self.peer = f"127.0.0.1:{peer_ports[node_id]}" if peer_ports else ""
        self.name = f"n{node_id}"
        self.address = addresses[node_id]
        self.data = root / self.name
        self.log = root / f"{self.name}.log"
        self.cmd = [sys.executable, "-m", "pqueue.cli", "node", "--data-dir", str(self.data)]
        self.cmd += ["--listen", self.address, "--node-id", str(node_id)]
        self.cmd += ["--peers", peers_arg(addresses)]
        if peer_ports:
            self.cmd += [
                "--peer-ports",
                ",".join(f"{i}={p}" for i, p in sorted(peer_ports.items())),
            ]
        if cluster_id:
            self.cmd += ["--cluster-id", cluster_id]
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

    def tail(self, lines: int = 3) -> str:
        """The last lines of its log (why it exited)."""
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join("    " + line for line in text.splitlines()[-lines:])


class _Balancer(_Node):
    """The balancer in front of the nodes: supervised like one, never restarted."""

    def __init__(self, root: Path, address: str, metrics: str, backends: list[str]) -> None:
        super().__init__(root, 0, {0: address}, metrics=metrics)
        self.name = "balancer"
        self.data = root / self.name
        self.log = root / f"{self.name}.log"
        self.cmd = [sys.executable, "-m", "pqueue.cli", "balancer", "run", "--listen", address]
        self.cmd += ["--backends", ",".join(backends), "--metrics-listen", metrics]


class _Web(_Node):
    """``pq web`` (the HTTP/JSON API) in front of the balancer: supervised like
    the balancer, never restarted; the cluster runs on without it."""

    def __init__(self, root: Path, address: str, balancer: str) -> None:
        super().__init__(root, 0, {0: address})
        self.name = "web"
        self.data = root / self.name
        self.log = root / f"{self.name}.log"
        self.cmd = [sys.executable, "-m", "pqueue.cli", "--endpoint", balancer]
        self.cmd += ["web", "--listen", address]

    def answers(self) -> bool:
        """Whether it serves HTTP yet (its OpenAPI description)."""
        try:
            with urllib.request.urlopen(f"http://{self.address}/openapi.json", timeout=1) as r:
                return bool(r.status == 200)
        except OSError:
            return False


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
    """The leader our balancer names, once that leader's log has turned the
    job lifecycle on ("" before): a new cluster's leader turns it on when it
    has heard every member announce it, and until then refuses the calls
    that need it (an ack with a result) with FAILED_PRECONDITION."""
    from pqueue.core import features  # a server's module: only dev-cluster loads it

    try:
        async with Client(address, timeout_s=0.5, max_retries=0) as c:
            leader = (await c.balancer_status()).leader_address
        if not leader:
            return ""
        async with Client(leader, timeout_s=0.5, max_retries=0) as c:
            status = await c.node_status()
        return leader if features.LIFECYCLE in status.log_features else ""
    except PQueueError:
        return ""


def taken_ports(addresses: list[str]) -> list[str]:
    """The addresses among these something already listens on (as a server
    binds: with SO_REUSEADDR, so a closed connection's TIME_WAIT is no obstacle)."""
    taken = []
    for address in addresses:
        host, _, port = address.rpartition(":")
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, int(port)))
            except OSError:
                taken.append(address)
    return taken


def cluster_id_of(root: Path) -> str:
    """This cluster directory's id: drawn at its first start, kept in ``CLUSTER_ID``."""
    path = root / "CLUSTER_ID"
    if not path.exists():
        tmp = root / "CLUSTER_ID.tmp"
        tmp.write_text(f"dev-{secrets.token_hex(4)}\n")
        tmp.replace(path)
    return path.read_text().strip()


def _runs(pid: int, command: str, flag: str, path: Path, default: str = "") -> bool:
    """Whether process ``pid`` is a ``pq <command>`` given ``flag path`` (or
    none, when ``default`` is that path), judged by its command line and
    working directory."""
    import psutil  # only when signalling: the client commands never load it

    try:
        proc = psutil.Process(pid)
        cmdline, cwd = proc.cmdline(), proc.cwd()
    except psutil.Error:  # gone, a zombie, or not ours to look at
        return False
    if command not in cmdline:
        return False
    if flag in cmdline[:-1]:
        given = Path(cmdline[cmdline.index(flag) + 1])
    elif default:
        given = Path(default)
    else:
        return False
    return (Path(cwd) / given).resolve() == path.resolve()


def node_pid(root: Path, node_id: int) -> int | None:
    """The PID of the dev cluster's node ``node_id`` if it runs (its PID file
    names a live ``pq node`` on its data dir), else None."""
    data = root / f"n{node_id}"
    try:
        pid = int((data / "PID").read_text())
    except (OSError, ValueError):
        return None
    return pid if _runs(pid, "node", "--data-dir", data) else None


def supervisor_pid(root: Path) -> int | None:
    """The PID of the ``pq dev-cluster`` supervising ``root``, if one runs."""
    try:
        pid = int((root / "SUPERVISOR").read_text())
    except (OSError, ValueError):
        return None
    return pid if _runs(pid, "dev-cluster", "--dir", root, default=".cluster") else None


def run_dev_cluster(
    root: Path,
    base_port: int,
    nodes: int,
    metrics_port: int,
    store: str | None = None,
    web_port: int = 7780,
) -> int:
    """Run until interrupted; non-zero if the cluster fails to come up, or
    can no longer run (every node, or the balancer, gone on its own)."""
    root.mkdir(parents=True, exist_ok=True)
    running = supervisor_pid(root)
    if running is not None and running != os.getpid():
        print(f"a dev cluster already runs under {root}/ (pid {running})", file=sys.stderr)
        return 1
    nodes_, balancer = _plan(root, base_port, nodes, metrics_port, store)
    web_port = web_port if base_port and web_port else free_ports(1)[0]
    web = _Web(root, f"127.0.0.1:{web_port}", balancer.address)
    cluster = [*nodes_, balancer, web]
    if not _ports_free(cluster):
        return 1
    (root / "SUPERVISOR").write_text(f"{os.getpid()}\n")
    stop = _Stop()
    try:
        for node in cluster:
            node.start()
        leader = _wait_ready(root, nodes_, balancer, web, stop)
        if leader is None:
            return 1
        _print_ready(nodes_, balancer, web, leader)
        return _supervise(root, nodes_, balancer, web, stop)
    finally:
        _shut_down(root, cluster)


class _Stop:
    """Set by SIGTERM or SIGINT (installed on creation): stop the cluster."""

    def __init__(self) -> None:
        self.requested = False
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, signum: int, frame: object) -> None:
        self.requested = True


def _plan(
    root: Path, base_port: int, nodes: int, metrics_port: int, store: str | None
) -> tuple[list[_Node], _Balancer]:
    """The nodes and the balancer to run, with their ports (not started)."""
    if base_port == 0:  # any free ports, all from one call so that none collide
        free = iter(free_ports(3 * nodes + 2))
        addresses = {i: f"127.0.0.1:{next(free)}" for i in range(1, nodes + 1)}
        # Consensus over TCP, on ports of their own.
        peer_ports = {i: next(free) for i in range(1, nodes + 1)}
        balancer_port = next(free)
        metrics_ports = [next(free) for _ in range(nodes + 1)]
    else:
        addresses = cluster_addresses(nodes, base_port)
        # Consensus over TCP, on the ports after the nodes' (base_port+nodes+1...).
        peer_ports = {i: base_port + nodes + i for i in range(1, nodes + 1)}
        balancer_port = base_port
        metrics_ports = (
            free_ports(nodes + 1)
            if metrics_port == 0
            else [metrics_port + i for i in range(nodes + 1)]
        )
    balancer = _Balancer(
        root,
        f"127.0.0.1:{balancer_port}",
        f"127.0.0.1:{metrics_ports[0]}",
        [addresses[i] for i in sorted(addresses)],
    )
    cluster_id = cluster_id_of(root)
    nodes_ = [
        _Node(root, i, addresses, store, f"127.0.0.1:{metrics_ports[i]}", cluster_id, peer_ports)
        for i in sorted(addresses)
    ]
    return nodes_, balancer


def _ports_free(cluster: list[_Node]) -> bool:
    """Whether every port the cluster wants is free (if not, says which)."""
    taken = taken_ports([a for n in cluster for a in (n.address, n.metrics, n.peer) if a])
    if taken:
        print(
            f"refusing to start: {', '.join(taken)} already taken (another cluster? "
            "stop it, or give --base-port and --metrics-port free ranges; 0: any)",
            file=sys.stderr,
        )
        return False
    return True


def _wait_ready(
    root: Path, nodes: list[_Node], balancer: _Balancer, web: _Web, stop: _Stop
) -> str | None:
    """The leader's address once ready, or None (said why) if it did not come up."""
    cluster = [*nodes, balancer, web]
    deadline = time.monotonic() + 30
    ours = {n.address for n in nodes}
    leader = ""
    # Ready: every process of ours runs, our balancer names one of our nodes
    # as leader (they elected one, and it probed them), and the web API answers.
    answers = False
    while leader not in ours or not all(n.running() for n in cluster) or not answers:
        if stop.requested or time.monotonic() > deadline or not all(n.running() for n in cluster):
            print(f"the cluster did not come up; see the logs in {root}/", file=sys.stderr)
            for node in cluster:
                if not node.running() and node.proc is not None:
                    code = node.proc.returncode
                    print(f"{node.name} exited (status {code}):\n{node.tail()}", file=sys.stderr)
            return None
        time.sleep(0.2)
        leader = asyncio.run(_balancer_leader(balancer.address))
        answers = answers or web.answers()
    return leader


def _print_ready(nodes: list[_Node], balancer: _Balancer, web: _Web, leader: str) -> None:
    """The web API's URL, the table of processes, the leader, and the endpoint to export."""
    print(f"web: http://{web.address}  (dashboard; HTTP/JSON API under /v1/, /openapi.json)")
    print(f"balancer: {balancer.address}  (metrics: http://{balancer.metrics}/metrics)\n")
    rows = [
        {
            "name": n.name,
            "address": n.address,
            "metrics": f"http://{n.metrics}/metrics" if n.metrics else "",
            "data_dir": str(n.data),
            "log": str(n.log),
        }
        for n in [*nodes, balancer, web]
    ]
    print(render.table(rows))
    print(f"\nleader: n{next(n.id for n in nodes if n.address == leader)} ({leader})")
    print(f"ready: export PQ_ENDPOINT={balancer.address}  (Ctrl-C stops the cluster)")
    print(
        "\n*** AUTH IS OFF: this local cluster takes any call from anyone who can reach "
        "127.0.0.1. See docs/security.md for tokens, quotas and TLS. ***"
    )
    sys.stdout.flush()


def _supervise(root: Path, nodes: list[_Node], balancer: _Balancer, web: _Web, stop: _Stop) -> int:
    """Watch until asked to stop (0), or until the cluster cannot run (1)."""
    while not stop.requested:
        for node in [*nodes, balancer, web]:
            _watch(node)
        if _cannot_run(nodes, balancer):
            print(
                f"the cluster cannot run: {_cannot_run(nodes, balancer)}; see the logs in {root}/",
                file=sys.stderr,
                flush=True,
            )
            return 1
        time.sleep(0.2)
    return 0


def _watch(node: _Node) -> None:
    """Start it if asked (``pq cluster start-node``); report it once it is down."""
    if (node.data / "START").exists():
        if node.running():  # asked while it ran: nothing to do, nothing kept
            (node.data / "START").unlink(missing_ok=True)
        else:
            print(f"starting {node.name}", flush=True)
            node.start()
    elif not node.running() and not node.reported_exit:
        node.reported_exit = True
        how = "stopped" if (node.data / "STOPPED").exists() else "exited"
        code = node.proc.returncode if node.proc else "?"
        again = f"; `pq cluster start-node {node.id}` brings it back" if node.id else ""
        why = f"\n{node.tail()}" if how == "exited" else ""
        print(f"{node.name} {how} (status {code}){again}{why}", flush=True)


def _shut_down(root: Path, cluster: list[_Node]) -> None:
    """Stop every process (SIGTERM, then SIGKILL after 15 s); free the directory."""
    # The web API and the balancer first, so they are not left calling nodes that are gone.
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
    with contextlib.suppress(OSError):
        if supervisor_pid(root) == os.getpid():
            (root / "SUPERVISOR").unlink()


def _cannot_run(nodes: list[_Node], balancer: _Balancer) -> str:
    """Why the cluster can no longer run ("" while it can): the balancer, or
    every node, gone on its own (not stopped by ``pq cluster stop-node``)."""
    if not balancer.running():
        return "the balancer exited"
    if all(not n.running() and not (n.data / "STOPPED").exists() for n in nodes):
        return "every node exited"
    return ""


def stop_node(root: Path, node_id: int) -> str:
    """Ask the dev cluster's node to stop (SIGTERM); it stays down. The PID
    file's process is signalled only if it is this node's ``pq node``."""
    data = root / f"n{node_id}"
    if not (data / "PID").exists():
        raise ValueError(f"no node n{node_id} under {root}")
    pid = node_pid(root, node_id)
    if pid is None:
        return f"n{node_id} is not running (its PID file names no pq node on {data})"
    (data / "STOPPED").touch()
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return f"n{node_id} was not running"
    return f"stopping n{node_id} (pid {pid})"


def start_node(root: Path, node_id: int) -> str:
    """Ask the running dev cluster to start a stopped node again; a running
    node is left as it is (and no request is left behind)."""
    data = root / f"n{node_id}"
    if not data.exists():
        raise ValueError(f"no node n{node_id} under {root}")
    pid = node_pid(root, node_id)
    if pid is not None:
        return f"n{node_id} is already running (pid {pid}); nothing to do"
    if supervisor_pid(root) is None:
        raise ValueError(f"no dev cluster runs under {root}: start it with `make cluster`")
    (data / "START").touch()
    return f"asked the dev cluster to start n{node_id}"


async def cluster_status(endpoint: str, timeout_s: float, **client: Any) -> list[dict[str, Any]]:
    """One row per node, from each node's own view; unreachable nodes say so.
    ``client``: ``Client`` options (``token``, ``tls``) for a secured cluster."""
    async with Client(endpoint, timeout_s=timeout_s, max_retries=0, **client) as c:
        first = await c.node_status()
    peers = dict(first.peers) or {first.node_id: first.address or endpoint}
    statuses = await _statuses(peers, timeout_s=min(timeout_s, 2.0), **client)
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
                "cluster": s.cluster_id,
            }
        )
    return rows


def register(sub: Any) -> None:
    """The ``dev-cluster`` subparser."""
    dev = sub.add_parser("dev-cluster", help="run a local cluster under DIR (make cluster)")
    dev.add_argument(
        "--dir", type=Path, default=Path(".cluster"), help="data, logs and pids live here"
    )
    dev.add_argument("--nodes", type=int, default=3, help="how many nodes")
    dev.add_argument(
        "--base-port",
        type=int,
        default=7700,
        help="the balancer listens on base, node N on base+N (0: any free ports)",
    )
    dev.add_argument(
        "--metrics-port",
        type=int,
        default=9700,
        help="/metrics of the balancer on this port, of node N on this port+N (0: any)",
    )
    dev.add_argument(
        "--store",
        default=None,
        help="postgresql://… to keep every node in PostgreSQL (schemas pq_n1, pq_n2, …); "
        "default: SQLite under DIR",
    )

    dev.add_argument(
        "--web-port",
        type=int,
        default=7780,
        help="`pq web` (the HTTP/JSON API) on this port (0, or --base-port 0: any)",
    )

    dev.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run the dev cluster until Ctrl-C."""
    return run_dev_cluster(
        args.dir, args.base_port, args.nodes, args.metrics_port, args.store, args.web_port
    )
