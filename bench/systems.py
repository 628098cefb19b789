"""The systems ``make bench`` compares, server side: start, a fresh queue per
cell, what is left in it afterwards, and the processes whose CPU counts.

- pqueue: 3 ``pq node`` processes on SQLite (fsync per group commit), called
  through a ``pq balancer`` process or directly at the leader;
- PostgreSQL: the server at ``PQ_BENCH_PG_DSN`` (a ``bench.pg.Pgmq`` table
  per cell); its CPU is its background processes' and the backends serving
  the bench's own connections (read from /proc; never signalled);
- NATS JetStream: three ``nats-server`` processes of our own (free ports, a
  temp dir), a work-queue stream with 3 replicas per cell.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import time
import uuid
from pathlib import Path
from typing import Protocol

import asyncpg
import nats
import nats.errors
import nats.js.errors
import psutil
from nats.aio.client import Client as NatsConnection
from nats.js import JetStreamContext, api

from bench.pg import Pgmq
from pqueue.cli.devcluster import free_ports
from pqueue.client import Client
from pqueue.errors import NotFoundError
from tests.faults.cluster import ProcCluster

NATS_BINARIES = ("nats-server", "/usr/sbin/nats-server")


class System(Protocol):
    """One column of the table."""

    key: str
    label: str
    #: "pqueue", "postgres" or "nats" (which drivers the agents use).
    kind: str

    def target(self) -> str: ...

    async def new_queue(self, name: str) -> str:
        """A fresh, empty queue for one cell; its name for the agents."""
        ...

    async def left(self, queue: str) -> int:
        """Jobs still in the queue (ready, delayed, leased or dead)."""
        ...

    async def drop_queue(self, queue: str) -> None: ...

    async def pids(self) -> dict[int, str]:
        """Server-side processes whose CPU a job costs, by what they are."""
        ...


# ------------------------------------------------------------------ pqueue


class PqCluster:
    """The 3-node cluster and its balancer, shared by pqueue's columns. With
    ``fresh`` (``make bench``'s default), every cell gets a cluster no cell
    ran on (empty data dirs, new ports), so none meets the log, records and
    heap that earlier cells left; ``keep``: the old clusters' dirs stay."""

    def __init__(
        self,
        root: Path,
        fresh: bool = True,
        keep: bool = False,
        peer_tcp: bool = True,
        failed_logs: Path | None = None,
        node_args: tuple[str, ...] = (),
    ) -> None:
        self.root, self.fresh, self.keep = root, fresh, keep
        #: More ``pq node`` flags for every node (``--node-arg``).
        self.node_args = node_args
        #: Where the logs of a cluster that failed to start are copied (kept
        #: when the data dirs go), so that a failed cell can be read later.
        self.failed_logs = failed_logs
        #: Consensus over the TCP peer transport (as ``make cluster``), or gRPC streams.
        self.peer_tcp = peer_tcp
        self.generation = 0
        self.cluster = self._new_cluster(root / "c0")
        self.balancer = ""
        #: Whether a cell ran on this cluster.
        self._served = False

    def _new_cluster(self, root: Path) -> ProcCluster:
        extra = dict.fromkeys(range(1, 4), self.node_args)
        return ProcCluster(root, peer_tcp=self.peer_tcp, extra=extra)

    async def start(self) -> None:
        await self.cluster.start()
        self.balancer = await self.cluster.start_balancer(probe_interval_s=1.0)

    async def stop(self) -> None:
        await self.cluster.stop()

    async def for_a_cell(self) -> None:
        """Before each cell: with ``fresh``, a cluster no cell ran on."""
        if self.fresh and self._served:
            await self.cluster.stop()
            if not self.keep:
                shutil.rmtree(self.cluster.root, ignore_errors=True)
            self.generation += 1
            self.cluster = self._new_cluster(self.root / f"c{self.generation}")
            try:
                await self.start()
            except Exception:
                self._keep_logs()
                raise
        self._served = True

    def _keep_logs(self) -> None:
        if self.failed_logs is None:
            return
        kept = self.failed_logs / f"failed-cluster-{self.generation}"
        kept.mkdir(parents=True, exist_ok=True)
        for log in self.cluster.root.glob("*.log"):
            shutil.copy(log, kept / log.name)


#: pqueue's columns: key -> (label, through the balancer, the SDK's look-aside).
PQ_MODES = {
    "pq-balancer": ("pqueue via balancer", True, True),
    "pq-direct": ("pqueue direct", False, True),
    "pq-proxy": ("pqueue via balancer, proxy only", True, False),
}


class PqSystem:
    """One pqueue column: clients given the balancer's address (with the
    SDK's default look-aside: operations and streams go to the leader it
    names, ``pq-balancer``; or without, everything through its proxy,
    ``pq-proxy``), or the leader's (``pq-direct``)."""

    kind = "pqueue"

    def __init__(self, cluster: PqCluster, key: str) -> None:
        self.c = cluster
        self.key = key
        self.label, self.via_balancer, self.look_aside = PQ_MODES[key]
        self.leader = 0

    def target(self) -> str:
        if self.via_balancer:
            return self.c.balancer
        return self.c.cluster.address(self.leader)

    async def new_queue(self, name: str) -> str:
        """Created at the leader (of a fresh cluster, by default); returned
        once every node has applied it (a balancer may send the agents'
        first calls to any of them)."""
        await self.c.for_a_cell()
        self.leader = await self.c.cluster.leader()
        async with Client(self.c.cluster.address(self.leader), timeout_s=30) as c:
            await c.create_queue(name)
        deadline = time.monotonic() + 30
        for i in self.c.cluster.ports:
            async with Client(self.c.cluster.address(i), timeout_s=30) as c:
                while True:
                    try:
                        await c.stats(name)
                        break
                    except NotFoundError:
                        if time.monotonic() > deadline:
                            raise
                        await asyncio.sleep(0.02)
        return name

    async def _stats(self, queue: str) -> tuple[int, int]:
        """(jobs left, acks the queue took)."""
        async with Client(self.c.cluster.endpoint, timeout_s=30) as c:
            [s] = await c.stats(queue, consistent=True)
        return s.ready + s.delayed + s.leased + s.dead, s.acked_total

    async def left(self, queue: str) -> int:
        return (await self._stats(queue))[0]

    async def acked(self, queue: str) -> int:
        """Acks the queue took, by its own count (a job acked twice counts twice)."""
        return (await self._stats(queue))[1]

    async def drop_queue(self, queue: str) -> None:
        async with Client(self.c.cluster.endpoint, timeout_s=30) as c:
            await c.delete_queue(queue)

    async def pids(self) -> dict[int, str]:
        out = {p.pid: "nodes" for p in self.c.cluster.procs.values()}
        if self.via_balancer and self.c.cluster.balancer is not None:
            out[self.c.cluster.balancer.pid] = "balancer"
        return out


# -------------------------------------------------------------- PostgreSQL


class PgSystem:
    key = "postgres"
    label = "PostgreSQL SKIP LOCKED"
    kind = "postgres"

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.conn: asyncpg.Connection | None = None
        self.prefix = f"pqbench_{uuid.uuid4().hex[:8]}"
        self.tables: set[str] = set()

    async def start(self) -> None:
        self.conn = await asyncpg.connect(self.dsn, timeout=10)

    async def version(self) -> str:
        assert self.conn is not None
        return "PostgreSQL " + str(await self.conn.fetchval("SHOW server_version"))

    async def stop(self) -> None:
        if self.conn is None:
            return
        for t in sorted(self.tables):
            await self.conn.execute(Pgmq(t).drop())
        await self.conn.close()

    def target(self) -> str:
        return self.dsn

    async def new_queue(self, name: str) -> str:
        assert self.conn is not None
        table = f"{self.prefix}_{name.replace('-', '_')}"
        await self.conn.execute(Pgmq(table).create())
        self.tables.add(table)
        return table

    async def left(self, queue: str) -> int:
        assert self.conn is not None
        return int(await self.conn.fetchval(Pgmq(queue).count()))

    async def drop_queue(self, queue: str) -> None:
        assert self.conn is not None
        await self.conn.execute(Pgmq(queue).drop())
        self.tables.discard(queue)

    async def pids(self) -> dict[int, str]:
        """The server's own processes (postmaster, WAL writer, checkpointer,
        autovacuum, ...); the backends serving the agents are added by the
        bench. Empty when the server is not on this machine."""
        assert self.conn is not None
        rows = await self.conn.fetch(
            "SELECT pid FROM pg_stat_activity WHERE backend_type <> 'client backend'"
        )
        out: dict[int, str] = {}
        for pid in [r["pid"] for r in rows]:
            with contextlib.suppress(psutil.Error):
                proc = psutil.Process(pid)
                if proc.name().startswith("postgres"):
                    out[pid] = "postgres"
                    out[proc.ppid()] = "postgres"  # the postmaster
        return out


# -------------------------------------------------------------------- NATS


async def _quiet(exc: Exception) -> None:
    """nats-py logs every failed connect at ERROR; the callers here retry or raise."""


def nats_binary() -> str | None:
    for name in NATS_BINARIES:
        if found := shutil.which(name):
            return found
    return None


class NatsCluster:
    """Three ``nats-server`` processes with JetStream, clustered, in ``root``."""

    def __init__(self, root: Path, binary: str) -> None:
        self.root = root
        self.binary = binary
        self.procs: list[subprocess.Popen[bytes]] = []
        self.ports: list[int] = []

    def version(self) -> str:
        out = subprocess.run(
            [self.binary, "--version"], capture_output=True, text=True, check=False
        )
        return out.stdout.strip()

    @property
    def urls(self) -> str:
        return ",".join(f"nats://127.0.0.1:{p}" for p in self.ports)

    async def start(self, timeout_s: float = 30.0) -> None:
        ports = free_ports(6)
        self.ports, routes = ports[:3], ports[3:]
        route_list = ", ".join(f"nats-route://127.0.0.1:{p}" for p in routes)
        for i, (port, route) in enumerate(zip(self.ports, routes, strict=True), start=1):
            store = self.root / f"s{i}"
            store.mkdir(parents=True, exist_ok=True)
            conf = self.root / f"s{i}.conf"
            conf.write_text(
                f'server_name: "s{i}"\n'
                f"listen: 127.0.0.1:{port}\n"
                f'jetstream {{ store_dir: "{store}" }}\n'
                f'cluster {{ name: "pqbench", listen: 127.0.0.1:{route}, '
                f"no_advertise: true, routes: [{route_list}] }}\n"
            )
            self._launch(conf, self.root / f"s{i}.log")
        await self._ready(timeout_s)

    def _launch(self, conf: Path, log_path: Path) -> None:
        with log_path.open("ab") as log:
            cmd = [self.binary, "-c", str(conf)]
            self.procs.append(subprocess.Popen(cmd, stdout=log, stderr=log))

    async def _ready(self, timeout_s: float) -> None:
        """JetStream answers (a meta leader is elected) on every server."""
        deadline = time.monotonic() + timeout_s
        last = ""
        for port in self.ports:
            while True:
                for p in self.procs:
                    if p.poll() is not None:
                        raise RuntimeError(f"nats-server exited {p.returncode}: see {self.root}")
                try:
                    nc = await nats.connect(
                        f"nats://127.0.0.1:{port}",
                        connect_timeout=1,
                        allow_reconnect=False,
                        error_cb=_quiet,
                    )
                    try:
                        await nc.jetstream(timeout=2).account_info()
                        break
                    finally:
                        await nc.close()
                except (OSError, nats.errors.Error, TimeoutError) as exc:
                    last = f"{type(exc).__name__}: {exc}"
                if time.monotonic() > deadline:
                    raise RuntimeError(f"NATS JetStream not ready in {timeout_s:.0f} s: {last}")
                await asyncio.sleep(0.2)

    async def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                await asyncio.to_thread(p.wait, 10)
            except subprocess.TimeoutExpired:
                p.kill()
                await asyncio.to_thread(p.wait)


class NatsSystem:
    key = "nats"
    label = "NATS JetStream R3"
    kind = "nats"
    DURABLE = "workers"

    def __init__(self, cluster: NatsCluster) -> None:
        self.cluster = cluster

    def target(self) -> str:
        return self.cluster.urls

    async def _js(self) -> tuple[NatsConnection, JetStreamContext]:
        nc = await nats.connect(servers=self.cluster.urls.split(","), error_cb=_quiet)
        return nc, nc.jetstream(timeout=30)

    async def new_queue(self, name: str) -> str:
        stream = name.replace("-", "_").upper()
        nc, js = await self._js()
        try:
            await js.add_stream(
                api.StreamConfig(
                    name=stream,
                    subjects=[f"{stream}.jobs"],
                    retention=api.RetentionPolicy.WORK_QUEUE,
                    storage=api.StorageType.FILE,
                    num_replicas=3,
                )
            )
            await js.add_consumer(
                stream,
                api.ConsumerConfig(
                    durable_name=self.DURABLE,
                    ack_policy=api.AckPolicy.EXPLICIT,
                    ack_wait=30,
                    max_ack_pending=1_000_000,
                    max_waiting=4096,
                ),
            )
        finally:
            await nc.close()
        return stream

    async def left(self, queue: str) -> int:
        nc, js = await self._js()
        try:
            return int((await js.stream_info(queue)).state.messages)
        finally:
            await nc.close()

    async def drop_queue(self, queue: str) -> None:
        nc, js = await self._js()
        try:
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await js.delete_stream(queue)
        finally:
            await nc.close()

    async def pids(self) -> dict[int, str]:
        return {p.pid: "nats" for p in self.cluster.procs}
