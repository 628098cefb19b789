"""A cluster of nodes in one process: real gRPC between them, SQLite on each
(or the store ``Cluster(storage=...)`` makes)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

from pqueue.cli.devcluster import free_ports
from pqueue.core import features
from pqueue.core.snapshot import state_hash
from pqueue.node.auth import PEER, Verifier, issue, node_subject
from pqueue.node.queue_node import NodeConfig
from pqueue.node.replicated import ClusterConfig
from pqueue.node.server import NodeServer, ServerConfig
from pqueue.storage import Storage
from pqueue.storage.sqlite import SqliteStorage
from pqueue.testing import lifecycle_on as lifecycle_on
from pqueue.testing import started_node
from pqueue.wire.tls import Tls
from pqueue.wire.tokens import TokenSource

#: One node alone: ``pqueue.testing.started_node``, the one users test against.
one_node = started_node


def node_tokens(key: bytes, ttl_s: float = 600) -> Callable[[int], str]:
    """Each node's own peer token (``sub`` ``node:<id>``), for ``Cluster(peer_token=...)``."""
    return lambda i: issue(key, "cluster", [PEER], ttl_s, subject=node_subject(i))


def awaiting(coro: object) -> str:
    """Where a suspended coroutine waits, outermost first ("a:12 -> b:40"):
    ``Task.get_stack`` gives only the outer frame on 3.11, so the chain of
    ``cr_await`` is followed down."""
    where = []
    while coro is not None and (frame := getattr(coro, "cr_frame", None)) is not None:
        where.append(f"{frame.f_code.co_name}:{frame.f_lineno}")
        coro = getattr(coro, "cr_await", None)
    return " -> ".join(where)


class Cluster:
    """``n`` nodes on loopback; ``peer_token``: one for all, or node id -> its own."""

    def __init__(
        self,
        root: Path,
        n: int = 3,
        metrics: bool = False,
        tls: Callable[[int], Tls] | None = None,
        verifier: Verifier | None = None,
        peer_token: str | Callable[[int], TokenSource] | None = None,
        features: dict[int, frozenset[str]] | None = None,
        cluster_options: dict[str, Any] | None = None,
        node_options: dict[str, Any] | None = None,
        server_options: dict[str, Any] | None = None,
        storage: Callable[[int], Storage] | None = None,
        peer_tcp: Collection[int] | None = None,
    ) -> None:
        self.root = root
        #: The nodes that take peers' TCP connections (default: all, as
        #: ``make cluster`` runs). The others run without peer ports, while
        #: the rest are told a port for them where nothing listens (an older
        #: release, mid-upgrade): they reach those over gRPC.
        self.peer_tcp = set(range(1, n + 1)) if peer_tcp is None else set(peer_tcp)
        #: Each node's TCP peer port, filled in as they bind.
        self.peer_ports: dict[int, int] = {}
        #: Node id -> its store (default: SQLite under ``root``).
        self.storage = storage or (lambda i: SqliteStorage(root / f"n{i}"))
        #: More ``ServerConfig`` fields for every node (memory_budget_bytes...).
        self.server_options = server_options or {}
        #: Per node, the log features it supports (to play an older release).
        self.features = features or {}
        #: More ``ClusterConfig`` fields for every node (tick_ms, snapshot_every_entries...).
        self.cluster_options = {"tick_ms": 20, **(cluster_options or {})}
        #: More ``NodeConfig`` fields for every node (snapshot_every_entries...).
        self.node_options = node_options or {}
        self.metrics = metrics
        self.tls = tls
        self.verifier = verifier
        self.peer_token = peer_token
        self.addresses: dict[int, str] = {}
        self.servers: dict[int, NodeServer] = {}
        self.n = n

    def _server(self, i: int) -> NodeServer:
        config = ClusterConfig(
            node_id=i,
            addresses=self.addresses,
            peer_ports=self.peer_ports if i in self.peer_tcp else None,
            **self.cluster_options,
        )
        listen = self.addresses.get(i, "127.0.0.1:0")
        return NodeServer(
            self.storage(i),
            ServerConfig(
                listen=listen,
                grace_s=0.5,
                metrics_listen="127.0.0.1:0" if self.metrics else None,
                tls=self.tls(i) if self.tls is not None else None,
                verifier=self.verifier,
                peer_token=self.peer_token(i) if callable(self.peer_token) else self.peer_token,
                **self.server_options,
            ),
            node_config=(
                NodeConfig(
                    **{
                        "node_id": f"n{i}",
                        **self.node_options,
                        **({"features": self.features[i]} if i in self.features else {}),
                    }
                )
                if self.node_options or i in self.features
                else None
            ),
            cluster=config,
        )

    async def start(self) -> None:
        idle = [i for i in range(1, self.n + 1) if i not in self.peer_tcp]
        self.peer_ports.update(zip(idle, free_ports(len(idle)), strict=True))
        for i in range(1, self.n + 1):
            self.servers[i] = self._server(i)
            self.addresses[i] = await self.servers[i].bind()
        await asyncio.gather(*(s.start() for s in self.servers.values()))

    async def stop_node(self, i: int) -> None:
        await self.servers.pop(i).stop()

    async def start_node(self, i: int) -> None:
        self.servers[i] = self._server(i)
        await self.servers[i].start()

    async def leader(self, timeout_s: float = 10.0) -> int:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            leaders = [i for i, s in self.servers.items() if s.node.log.is_leader]
            # ...and every node knows it: a follower that has not heard from
            # it yet answers "no leader yet" instead of forwarding.
            if (
                len(leaders) == 1
                and all(s.node.log.leader_hint()[0] == leaders[0] for s in self.servers.values())
                and self._lifecycle_settled(leaders[0])
            ):
                return leaders[0]
            await asyncio.sleep(0.05)
        try:
            detail = self.describe()
        except Exception as exc:  # the diagnostic never hides the failure
            detail = f"  (describe failed: {exc!r})"
        raise AssertionError("no single leader:\n" + detail)

    def describe(self) -> str:
        """Each running node's view of the leadership, the lifecycle switch
        and its waiting proposals, plus where its tick loop waits: what a
        failed ``leader()`` needs to be read after the fact (a CI log)."""
        lines = []
        for i, server in sorted(self.servers.items()):
            node, log = server.node, server.node.log
            replica = getattr(log, "replica", None)
            status = replica.status() if replica is not None else None
            tick = getattr(node, "_tick_task", None)
            waits = awaiting(tick.get_coro()) if tick is not None and not tick.done() else ""
            lines.append(
                f"  n{i}: is_leader={log.is_leader} hint={log.leader_hint()[0]}"
                + (
                    f" role={status.role.value} ballot={status.ballot}"
                    f" next_slot={status.next_slot} commit={status.commit_index}"
                    if status is not None
                    else ""
                )
                + f" lifecycle={node.machine.lifecycle}"
                f" inflight={sorted(getattr(log, '_inflight', {}))}"
                f" announced={ {k: sorted(v) for k, v in sorted(node.announced.items())} }"
                f" tick_loop={waits or 'not running'}"
            )
        return "\n".join(lines)

    def _lifecycle_settled(self, leader: int) -> bool:
        """A cluster whose every member runs and supports the lifecycle
        feature has it on (the leader turns it on once it has heard them
        all): tests then see the semantics users see."""
        running = self.servers.values()
        if len(self.servers) < self.n or any(
            features.LIFECYCLE not in s.node.config.features for s in running
        ):
            return True
        return self.servers[leader].node.machine.lifecycle

    async def settled(self, timeout_s: float = 10.0) -> None:
        """Every running node has applied the same index."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            indexes = {s.node.machine.applied_index for s in self.servers.values()}
            if len(indexes) == 1:
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"nodes did not converge: {indexes}")

    async def same_state(self) -> None:
        """Every running node has applied the same entries and holds the
        same state (the same ``state_hash``)."""
        await self.settled()
        hashes = {state_hash(s.node.machine) for s in self.servers.values()}
        assert len(hashes) == 1, hashes

    async def stop(self) -> None:
        await asyncio.gather(*(s.stop() for s in self.servers.values()))
