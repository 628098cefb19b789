"""The node's gRPC server: public services, health, reflection, graceful stop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import cast

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from pqueue.node.auth import Verifier, trusted_hops
from pqueue.node.forward import Forwarder
from pqueue.node.memory import MemoryBudget
from pqueue.node.metrics import QUEUE_LABEL_MODES, NodeCollector, NodeMetrics
from pqueue.node.peer_tcp import PeerListener
from pqueue.node.peers import PeerService, host_of
from pqueue.node.queue_node import NodeConfig, QueueNode
from pqueue.node.quotas import Quotas
from pqueue.node.replicated import ClusterConfig, ReplicatedLog
from pqueue.node.servicer import AdminService, QueueService
from pqueue.storage import Storage
from pqueue.v1 import peer_pb2 as ppb
from pqueue.v1 import peer_pb2_grpc as ppbg
from pqueue.v1 import queue_pb2 as pb
from pqueue.v1 import queue_pb2_grpc as pbg
from pqueue.wire.admission import Admission, AdmissionConfig
from pqueue.wire.channels import MAX_CONCURRENT_STREAMS_NODE, server_options
from pqueue.wire.guard import Guard
from pqueue.wire.logs import describe
from pqueue.wire.metrics_http import MetricsServer, split_listen
from pqueue.wire.observe import Observer, served_methods
from pqueue.wire.serving import Serving, log_failure
from pqueue.wire.sizes import MAX_PEER_MESSAGE_BYTES
from pqueue.wire.tls import Tls, add_port
from pqueue.wire.tokens import TokenSource

logger = logging.getLogger(__name__)

SERVICE_NAMES = tuple(s.full_name for s in pb.DESCRIPTOR.services_by_name.values())
#: How long a stopping leader tries to hand leadership over before draining.
TRANSFER_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class ServerConfig:
    """Where and how the node listens."""

    listen: str = "127.0.0.1:0"
    #: HOST:PORT to serve Prometheus ``/metrics`` on (port 0: any); None: not served.
    metrics_listen: str | None = None
    #: TLS for the gRPC port and for calls to peers; with a CA, mutual TLS.
    tls: Tls | None = None
    #: Checks bearer tokens; None: auth is off (every caller may do anything).
    verifier: Verifier | None = None
    #: Per-tenant rates and limits; None: none.
    quotas: Quotas | None = None
    #: This node's token for its peers (role ``peer``, ``sub`` ``node:<id>``),
    #: when auth is on: a string, or a ``TokenFile`` re-read when it changes.
    #: A follower also shows it to the leader when it forwards a call, so that
    #: the leader believes the client address it passes on.
    peer_token: TokenSource | None = None
    #: How long in-flight calls may finish after a stop begins.
    grace_s: float = 5.0
    #: Per-method request caps and health-watch bounds (``pqueue.wire.admission``).
    admission: AdmissionConfig | None = None
    #: Bearer token a ``/metrics`` scrape must carry; None: none needed.
    metrics_token: str | None = None
    #: The ``queue`` label of per-queue series: ``queue``, ``tenant`` or ``off``.
    metrics_queue_labels: str = "queue"
    #: Refuse enqueues while the process's RSS is at or above this (0: never).
    memory_budget_bytes: int = 0

    def __post_init__(self) -> None:
        if ":" not in self.listen:
            raise ValueError(f"listen address {self.listen!r} needs a port (HOST:PORT)")
        if self.grace_s < 0:
            raise ValueError("grace_s must not be negative")
        if self.memory_budget_bytes < 0:
            raise ValueError("the memory budget must not be negative")
        if self.metrics_listen is not None:
            split_listen(self.metrics_listen)
        if self.metrics_queue_labels not in QUEUE_LABEL_MODES:
            raise ValueError(
                f"metrics queue labels must be one of {', '.join(QUEUE_LABEL_MODES)}, "
                f"not {self.metrics_queue_labels!r}"
            )


class NodeServer(Serving):
    """A ``QueueNode`` served over gRPC. ``async with`` or ``start``/``stop``."""

    def __init__(
        self,
        storage: Storage,
        server_config: ServerConfig | None = None,
        node_config: NodeConfig | None = None,
        cluster: ClusterConfig | None = None,
    ) -> None:
        self.config = server_config or ServerConfig()
        #: This server's own registry: several nodes fit in one process.
        self.metrics = NodeMetrics()
        if node_config is None and cluster is not None:
            node_config = NodeConfig(node_id=f"n{cluster.node_id}")  # names logs and metrics
        self.node = QueueNode(
            storage,
            node_config,
            cluster=cluster,
            observer=self.metrics,
            tls=self.config.tls,
            peer_token=self.config.peer_token,
        )
        self.memory = MemoryBudget(
            self.config.memory_budget_bytes,
            self.node.config.node_id,
            jobs=lambda: self.node.machine.job_count(),
        )
        #: The peer protocol's service, once bound (its refusal counters).
        self.peers: PeerService | None = None
        #: Peers' TCP connections (with peer ports), once bound.
        self.peer_listener: PeerListener | None = None
        self.metrics.registry.register(
            NodeCollector(
                self.node,
                queue_labels=self.config.metrics_queue_labels,
                memory=self.memory,
                receiving=lambda: (self.peers, self.peer_listener),
            )
        )
        self.metrics_server = (
            MetricsServer(
                self.metrics.registry, self.config.metrics_listen, self.config.metrics_token
            )
            if self.config.metrics_listen is not None
            else None
        )
        self.forwarder = Forwarder(self.config.tls, self.config.peer_token)
        self.health = HealthServicer()
        self._server: grpc.aio.Server | None = None
        #: Where the services are added: they are served observed and admitted.
        self._guard: Guard | None = None
        self._watch: asyncio.Task[None] | None = None
        self._started = False
        self.port = 0

    @property
    def address(self) -> str:
        """``host:port`` actually bound (port 0 resolved)."""
        host = self.config.listen.rsplit(":", 1)[0]
        return f"{host}:{self.port}"

    async def bind(self) -> str:
        """Bind the listen address (port 0 resolved) before starting; idempotent."""
        if self._server is None:
            observer = Observer(
                self.node.config.node_id,
                lambda: self.address,
                self.metrics.grpc,
                served_methods(pb.DESCRIPTOR, ppb.DESCRIPTOR),
                hops=trusted_hops(self.config.verifier),
            )
            self._server = grpc.aio.server(
                # The peer service's limit (the port is shared); each public
                # method has its own, smaller cap, checked before parsing.
                options=server_options(MAX_PEER_MESSAGE_BYTES, MAX_CONCURRENT_STREAMS_NODE),
            )
            # Every service behind admission and the observer (outermost: its
            # refusals are logged and counted), wrapped once per method.
            admission = Admission(
                self.config.admission, self.config.verifier, lambda: self.node.log.cluster_id
            )
            self._guard = Guard(observer, admission)
            self._server.add_generic_rpc_handlers((self._guard,))
            try:
                self.port = add_port(self._server, self.config.listen, self.config.tls)
            except RuntimeError as exc:
                self._server = None
                raise OSError(f"cannot listen on {self.config.listen}: {describe(exc)}") from exc
            if isinstance(self.node.log, ReplicatedLog):  # always, today; the seam allows others
                self.peers = PeerService(
                    self.node.log.on_message, self.config.verifier, self.node.note_features
                )
                try:
                    await self._bind_peer_port(self.peers)
                except BaseException:
                    await _release(self._server)
                    self._server = None
                    raise
        return self.address

    async def _bind_peer_port(self, peers: PeerService) -> None:
        """With peer ports, listen on this node's (its listen address's host)."""
        cluster = self.node.cluster
        if cluster.peer_ports is None:
            return
        host = host_of(self.config.listen)
        wanted = cluster.peer_ports.get(cluster.node_id, 0)
        listener = PeerListener(peers, self.config.tls)
        try:
            port = await listener.bind(host, wanted)
        except OSError as exc:
            raise OSError(
                f"cannot listen for peers on {host or '*'}:{wanted}: {describe(exc)}"
            ) from exc
        cluster.peer_ports[cluster.node_id] = port
        self.peer_listener = listener

    async def start(self) -> None:
        """Recover the node, then serve."""
        await self.bind()
        # A node alone learns its own address only now (port 0 resolved).
        self.node.cluster.addresses.setdefault(self.node.cluster.node_id, self.address)
        server, guard = self._server, self._guard
        assert server is not None
        assert guard is not None
        recovered = False
        try:
            if self.metrics_server is not None:
                await self.metrics_server.start()  # first: a taken port fails before recovery
            await self.node.start()
            recovered = True
            await self._serve(server, guard)
        except BaseException:
            await self._undo_start(recovered)
            raise
        self._started = True
        self.memory.start()
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        self._watch = asyncio.create_task(self._watch_log_loop(), name="pq-watch-log")
        self._watch.add_done_callback(log_failure)
        metrics = (
            f", metrics on http://{self.metrics_server.address}/metrics"
            if self.metrics_server is not None
            else ""
        )
        logger.info("node %s serving on %s%s", self.node.config.node_id, self.address, metrics)

    async def _undo_start(self, recovered: bool) -> None:
        """Close what a failed ``start`` opened: no port stays bound, whatever fails."""
        server, self._server = self._server, None
        async with contextlib.AsyncExitStack() as closing:  # run last to first
            if self.metrics_server is not None:
                closing.push_async_callback(self.metrics_server.stop)
            if recovered:
                closing.push_async_callback(self.node.stop)
            if server is not None:
                closing.push_async_callback(_release, server)
            if self.peer_listener is not None:
                closing.push_async_callback(self.peer_listener.stop)

    async def _serve(self, server: grpc.aio.Server, guard: Guard) -> None:
        """Register the services and take calls and peers."""
        verifier, quotas = self.config.verifier, self.config.quotas
        # The generated ``add_*`` functions take the guard as they take a server.
        services = cast(grpc.aio.Server, guard)
        queue = QueueService(
            self.node,
            self.forwarder,
            verifier,
            quotas,
            self.memory,
            count_operation=self.metrics.operation,
        )
        pbg.add_QueueServicer_to_server(queue, services)
        pbg.add_AdminServicer_to_server(AdminService(self.node, self.forwarder, verifier), services)
        if isinstance(self.node.log, ReplicatedLog):  # always, today; the seam allows others
            assert self.peers is not None  # made at bind
            ppbg.add_PeerServicer_to_server(self.peers, services)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, services)
        health_name = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
            reflection.aio.ReflectionServicer(
                (*SERVICE_NAMES, health_name, reflection.SERVICE_NAME)
            ),
            services,
        )
        await server.start()
        if self.peer_listener is not None:
            self.peer_listener.start()

    async def _set_health(
        self, status: health_pb2.HealthCheckResponse.ServingStatus.ValueType
    ) -> None:
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, status)

    async def _watch_log_loop(self) -> None:
        """Health follows the node: NOT_SERVING while its store is unreachable
        (it comes back with the store), and for good once its log failed."""
        serving = True
        while not self.node.log.failed.is_set():
            if self.node.serving != serving:
                serving = not serving
                logger.warning(
                    "node %s: storage %s, reporting %s",
                    self.node.config.node_id,
                    "reachable again" if serving else "unreachable",
                    "SERVING" if serving else "NOT_SERVING",
                )
                await self._set_health(
                    health_pb2.HealthCheckResponse.SERVING
                    if serving
                    else health_pb2.HealthCheckResponse.NOT_SERVING
                )
            try:
                async with asyncio.timeout(0.25):
                    await self.node.log.failed.wait()
            except TimeoutError:
                pass
        logger.error("node %s: log failed, reporting NOT_SERVING", self.node.config.node_id)
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)

    async def stop(self) -> None:
        """Drain: report NOT_SERVING, end long polls, let calls finish, then close.
        Bound but never started: close the ports."""
        if self._server is None or not self._started:
            if self._server is not None:
                await self._undo_start(recovered=False)
            return
        self._started = False
        # Taken now: a second stop meanwhile finds none and leaves this one to finish.
        server, self._server = self._server, None
        logger.info("node %s draining", self.node.config.node_id)
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.wait([self._watch])
        # A leader hands over first, while still serving: writes stall for
        # one round trip instead of an election timeout after we are gone.
        if self.node.log.is_leader and await self.node.log.transfer_leadership(TRANSFER_TIMEOUT_S):
            logger.info("node %s handed over leadership", self.node.config.node_id)
        await self.health.enter_graceful_shutdown()
        self.node.begin_drain()
        async with contextlib.AsyncExitStack() as closing:  # run last to first, each whatever fails
            if self.metrics_server is not None:
                closing.push_async_callback(self.metrics_server.stop)
            closing.push_async_callback(self.node.stop)
            closing.push_async_callback(self.forwarder.close)
            closing.push_async_callback(self.memory.stop)
            if self.peer_listener is not None:
                closing.push_async_callback(self.peer_listener.stop)
            drained_from = time.monotonic()
            await server.stop(self.config.grace_s)
            if self.peer_listener is not None and not self.node.log.is_leader:
                # Peer streams on the gRPC port held its grace open; over TCP
                # nothing does. A follower goes on taking peers' messages for
                # what is left of it (at most a handover's time), so a leader
                # stopping at the same moment (the whole cluster stopped) can
                # still hand over rather than wait out its transfer.
                left_s = self.config.grace_s - (time.monotonic() - drained_from)
                await asyncio.sleep(min(max(0.0, left_s), TRANSFER_TIMEOUT_S))

    def stop_events(self) -> tuple[asyncio.Event, ...]:
        """A failed log ends serving (``serve_until_signal`` returns False)."""
        return (self.node.log.failed,)


async def _release(server: grpc.aio.Server) -> None:
    """Stop a server that may never have started, its port with it: grpc.aio
    lets go of a bound port only once the server has started, so one that has
    not is started (no service is registered yet, or all are: either way no
    call gets far in the instant) and stopped at once."""
    with contextlib.suppress(Exception):  # it had started (or cannot): stopping is enough
        await server.start()
    await server.stop(None)
