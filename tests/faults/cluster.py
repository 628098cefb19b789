"""A cluster of real ``pq node`` processes for fault tests (kill -9, SIGSTOP, partitions)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from pqueue.cli.devcluster import free_ports, peers_arg
from pqueue.client import Client
from pqueue.errors import PQueueError
from tests.faults.proxy import Proxy


class ProcCluster:
    def __init__(
        self,
        root: Path,
        nodes: int = 3,
        partitionable: bool = False,
        store: str | None = None,
        schema_prefix: str = "",
        extra: dict[int, tuple[str, ...]] | None = None,
        peer_tcp: bool = True,
    ) -> None:
        """``store``: a postgresql:// DSN puts node N in schema ``{schema_prefix}_nN``;
        ``extra``: more ``pq node`` flags, by node id; ``peer_tcp``: consensus
        over the TCP peer transport (``--peer-ports``), as ``make cluster`` runs it."""
        self.root = root
        self.extra = extra or {}
        self.store = store
        self.schema_prefix = schema_prefix
        self.n = nodes
        self.partitionable = partitionable
        self.peer_tcp = peer_tcp
        self.ports: dict[int, int] = {}
        #: Each node's TCP peer port (with ``peer_tcp``).
        self.peer_ports: dict[int, int] = {}
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.proxies: dict[tuple[int, int], Proxy] = {}
        #: The same per link for the TCP peer transport: (i, j) carries i's
        #: connections to j's peer port.
        self.peer_proxies: dict[tuple[int, int], Proxy] = {}
        self.balancer: subprocess.Popen[bytes] | None = None
        self.balancer_address = ""

    @property
    def endpoint(self) -> str:
        return "ipv4:" + ",".join(f"127.0.0.1:{p}" for _, p in sorted(self.ports.items()))

    def address(self, i: int) -> str:
        return f"127.0.0.1:{self.ports[i]}"

    def allocate_ports(self) -> None:
        """Pick every node's client port and (with ``peer_tcp``) peer port, all
        in one call so that no two collide."""
        ports = free_ports(2 * self.n)
        self.ports = dict(enumerate(ports[: self.n], start=1))
        if self.peer_tcp:
            self.peer_ports = dict(enumerate(ports[self.n :], start=1))

    async def start(self) -> None:
        self.allocate_ports()
        if self.partitionable:
            for i in self.ports:
                for j in self.ports:
                    if i != j:
                        self.proxies[(i, j)] = Proxy(self.ports[j])
                        await self.proxies[(i, j)].start()
                        if self.peer_tcp:
                            self.peer_proxies[(i, j)] = Proxy(self.peer_ports[j])
                            await self.peer_proxies[(i, j)].start()
        for i in self.ports:
            self.launch(i)
        await self.leader()

    def _peers_of(self, i: int) -> dict[int, str]:
        if not self.partitionable:
            return {j: self.address(j) for j in self.ports}
        return {
            j: self.address(j) if j == i else f"127.0.0.1:{self.proxies[(i, j)].port}"
            for j in self.ports
        }

    def _peer_ports_of(self, i: int) -> dict[int, int]:
        if not self.partitionable:
            return dict(self.peer_ports)
        return {
            j: port if j == i else self.peer_proxies[(i, j)].port
            for j, port in self.peer_ports.items()
        }

    def launch(self, i: int, program: tuple[str, ...] = ("-m", "pqueue.cli")) -> None:
        """Start node ``i``; ``program``: what the interpreter runs (``pq`` by default)."""
        data = self.root / f"n{i}"
        data.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, *program, "node", "--data-dir", str(data)]
        cmd += ["--listen", self.address(i), "--node-id", str(i), "--grace-s", "1"]
        cmd += ["--peers", peers_arg(self._peers_of(i)), "--log-level", "INFO"]
        if self.peer_tcp:
            ports = self._peer_ports_of(i)
            cmd += ["--peer-ports", ",".join(f"{j}={p}" for j, p in sorted(ports.items()))]
        if self.store:
            cmd += ["--store", self.store, "--pg-schema", self.schema(i)]
        cmd += self.extra.get(i, ())
        with (self.root / f"n{i}.log").open("ab") as log:
            self.procs[i] = subprocess.Popen(cmd, stdout=log, stderr=log)

    def schema(self, i: int) -> str:
        """Node ``i``'s PostgreSQL schema (with a postgresql store)."""
        return f"{self.schema_prefix}_n{i}"

    async def leader(self, timeout_s: float = 20.0, among: list[int] | None = None) -> int:
        """The one node that says it leads (and is running)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            leaders = []
            for i in among or list(self.ports):
                if self.procs[i].poll() is not None:
                    continue
                try:
                    async with Client(self.address(i), timeout_s=0.5, max_retries=0) as c:
                        if (await c.node_status()).role == "leader":
                            leaders.append(i)
                except PQueueError:
                    pass
            if len(leaders) == 1:
                return leaders[0]
            await asyncio.sleep(0.1)
        raise AssertionError("no single leader" + self._exited())

    def _exited(self) -> str:
        """The nodes that exited, each with its exit code and last log lines
        (a node that could not bind its port says so there)."""
        out = []
        for i, proc in sorted(self.procs.items()):
            if proc.poll() is None:
                continue
            try:
                tail = (self.root / f"n{i}.log").read_text(errors="replace").splitlines()[-3:]
            except OSError as exc:
                tail = [f"(no log: {exc})"]
            out.append(f"\n  n{i} exited ({proc.returncode}): " + "\n    ".join(tail))
        return "".join(out)

    async def start_balancer(self, probe_interval_s: float = 0.5) -> str:
        """A ``pq balancer`` process in front of the nodes; its address once it knows a leader."""
        self.balancer = self._launch_balancer(probe_interval_s)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.balancer.poll() is not None:
                raise AssertionError(f"the balancer exited: {self.balancer.returncode}")
            try:
                async with Client(self.balancer_address, timeout_s=0.5, max_retries=0) as c:
                    if (await c.balancer_status()).leader_address:
                        return self.balancer_address
            except PQueueError:
                pass
            await asyncio.sleep(0.1)
        raise AssertionError("the balancer did not learn a leader")

    def _launch_balancer(self, probe_interval_s: float) -> subprocess.Popen[bytes]:
        self.balancer_address = f"127.0.0.1:{free_ports(1)[0]}"
        cmd = [sys.executable, "-m", "pqueue.cli", "balancer", "run"]
        cmd += ["--listen", self.balancer_address, "--probe-interval-s", str(probe_interval_s)]
        cmd += ["--backends", ",".join(self.address(i) for i in sorted(self.ports))]
        with (self.root / "balancer.log").open("ab") as log:
            return subprocess.Popen(cmd, stdout=log, stderr=log)

    def kill9(self, i: int) -> None:
        self.procs[i].kill()
        self.procs[i].wait()

    def pause(self, i: int) -> None:
        os.kill(self.procs[i].pid, signal.SIGSTOP)

    def resume(self, i: int) -> None:
        os.kill(self.procs[i].pid, signal.SIGCONT)

    def isolate(self, i: int) -> None:
        for (a, b), proxy in [*self.proxies.items(), *self.peer_proxies.items()]:
            if i in (a, b):
                proxy.cut()

    def heal(self) -> None:
        for proxy in [*self.proxies.values(), *self.peer_proxies.values()]:
            proxy.heal()

    async def stop(self) -> None:
        if self.balancer is not None and self.balancer.poll() is None:
            self.balancer.terminate()
            try:
                await asyncio.to_thread(self.balancer.wait, 15)
            except subprocess.TimeoutExpired:
                self.balancer.kill()
        for proc in self.procs.values():
            if proc.poll() is None:
                with_signal(proc, signal.SIGCONT)
                proc.terminate()
        for proc in self.procs.values():
            try:
                await asyncio.to_thread(proc.wait, 15)
            except subprocess.TimeoutExpired:
                proc.kill()
        for proxy in [*self.proxies.values(), *self.peer_proxies.values()]:
            await proxy.stop()


def with_signal(proc: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, sig)


@contextlib.asynccontextmanager
async def started(
    root: Path, balancer_probe_s: float | None = None, **options: Any
) -> AsyncIterator[ProcCluster]:
    """A started ``ProcCluster`` (``options``: its constructor's), with a
    balancer probing every ``balancer_probe_s`` if given; stopped (healed
    first) on the way out, whatever happened."""
    c = ProcCluster(root, **options)
    try:
        await c.start()
        if balancer_probe_s is not None:
            await c.start_balancer(probe_interval_s=balancer_probe_s)
        yield c
    finally:
        c.heal()
        await c.stop()
