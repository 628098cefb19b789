"""The balancer process: the proxy, its own health, reflection, status and metrics."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from balancer.backends import Backends
from balancer.config import BalancerConfig
from balancer.errors import ListenError
from balancer.metrics import BalancerMetrics
from balancer.proxy import ProxyHandler
from pqueue.v1 import balancer_pb2 as bpb
from pqueue.v1 import balancer_pb2_grpc as bpbg
from pqueue.v1 import queue_pb2 as pb
from pqueue.wire.admission import Admission
from pqueue.wire.channels import MAX_CONCURRENT_STREAMS, server_options
from pqueue.wire.logs import describe
from pqueue.wire.metrics_http import MetricsServer
from pqueue.wire.observe import Observer, never_a_hop, served_methods
from pqueue.wire.serving import Serving, log_failure
from pqueue.wire.sizes import MAX_MESSAGE_BYTES
from pqueue.wire.tls import add_port

logger = logging.getLogger(__name__)

PROXIED_SERVICES = tuple(s.full_name for s in pb.DESCRIPTOR.services_by_name.values())
BALANCER_SERVICE = bpb.DESCRIPTOR.services_by_name["Balancer"].full_name


class StatusService(bpbg.BalancerServicer):
    """``Balancer.Status``: the backends as this balancer sees them."""

    def __init__(self, backends: Backends, proxy: ProxyHandler) -> None:
        self.backends = backends
        self.proxy = proxy

    async def Status(
        self, request: bpb.BalancerStatusRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> bpb.BalancerStatusResponse:
        pool = self.backends.pool
        now = self.backends.clock_s()
        leader = pool.leader() or ""
        rows = []
        for address, b in pool.backends.items():
            r = b.report
            health = {True: "serving", False: "not_serving", None: "unknown"}[b.health_serving]
            rows.append(
                bpb.BackendStatus(
                    address=address,
                    node_id=r.node_id if r else 0,
                    ejected=b.ejected,
                    leader=address == leader,
                    health=health,
                    weight=b.weight,
                    cpu_utilization=r.cpu_utilization if r else 0.0,
                    backlog=b.backlog,
                    load=b.load,
                    reads=b.picks,
                    leader_calls=b.leader_calls,
                    ejections=b.ejections,
                    report_age_ms=-1
                    if b.reported_at_s is None
                    else round((now - b.reported_at_s) * 1000),
                    last_error=b.last_error,
                    ready_jobs=r.ready_jobs if r else 0,
                    consecutive_failures=b.failures,
                )
            )
        return bpb.BalancerStatusResponse(
            backends=rows, retries=self.proxy.retries, leader_address=leader
        )


class BalancerServer(Serving):
    """A balancer in front of ``config.backends``. ``async with`` or ``start``/``stop``."""

    def __init__(self, config: BalancerConfig, metrics: BalancerMetrics | None = None) -> None:
        config.validate()
        self.config = config
        self.metrics = metrics or BalancerMetrics()
        self.backends = Backends(config, self.metrics)
        self.proxy = ProxyHandler(self.backends)
        self.health = HealthServicer()
        self._server: grpc.aio.Server | None = None
        self._http: MetricsServer | None = None
        self._health_task: asyncio.Task[None] | None = None
        self.port = 0
        self.metrics_port = 0

    @property
    def address(self) -> str:
        """``host:port`` actually bound."""
        return f"{self.config.listen.rsplit(':', 1)[0]}:{self.port}"

    @property
    def metrics_address(self) -> str:
        """``host:port`` of ``/metrics``; empty when not served."""
        if self.config.metrics_listen is None:
            return ""
        return self._http.address if self._http is not None else ""

    async def start(self) -> None:
        """Bind, start probing, serve."""
        observer = Observer(
            "balancer",
            lambda: self.address,
            self.metrics.grpc,
            served_methods(pb.DESCRIPTOR, bpb.DESCRIPTOR),
            hops=never_a_hop,  # the first hop: a client's forwarded address is only claimed
        )
        server = grpc.aio.server(
            # Admission caps each method's request before the proxy reads it.
            interceptors=(observer, Admission()),
            options=server_options(MAX_MESSAGE_BYTES, MAX_CONCURRENT_STREAMS),
        )
        try:
            await self._start(server)
        except BaseException:
            await self._close(server)
            raise
        self._server = server
        self._health_task = asyncio.create_task(self._health_loop(), name="pq-balancer-health")
        self._health_task.add_done_callback(log_failure)
        logger.info(
            "balancer serving on %s in front of %s", self.address, ", ".join(self.config.backends)
        )

    async def _start(self, server: grpc.aio.Server) -> None:
        try:
            self.port = add_port(server, self.config.listen, self.config.tls)
        except RuntimeError as exc:
            raise ListenError(f"cannot listen on {self.config.listen}: {describe(exc)}") from exc
        if self.config.metrics_listen is not None:
            self._http = MetricsServer(
                self.metrics.registry, self.config.metrics_listen, self.config.metrics_token
            )
            try:
                await self._http.start()
            except OSError as exc:
                self._http = None
                raise ListenError(str(exc)) from exc
            self.metrics_port = self._http.port
        bpbg.add_BalancerServicer_to_server(StatusService(self.backends, self.proxy), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        server.add_generic_rpc_handlers((self.proxy,))
        health_name = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
        reflection.enable_server_reflection(
            (*PROXIED_SERVICES, BALANCER_SERVICE, health_name, reflection.SERVICE_NAME), server
        )
        await self._set_health(serving=False)  # until a backend is up
        await self.backends.start()
        await server.start()

    async def _set_health(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", *PROXIED_SERVICES, BALANCER_SERVICE):
            await self.health.set(name, status)

    async def _health_loop(self) -> None:
        """SERVING while some backend is up: a balancer with none is not ready.
        Watched, not polled: it wakes on each change of the pool."""
        serving = False
        while True:
            updated = self.backends.next_update()
            if self.backends.usable() != serving:
                serving = not serving
                logger.info("balancer %s", "serving" if serving else "has no backend up")
                await self._set_health(serving)
            await updated.wait()

    async def _close(self, server: grpc.aio.Server) -> None:
        self.proxy.streams.close()  # consumers reconnect elsewhere now, not after the grace
        await server.stop(self.config.grace_s)
        await self.proxy.stop()
        await self.backends.stop()
        if self._http is not None:
            await self._http.stop()

    async def stop(self) -> None:
        """Report NOT_SERVING, let calls in flight finish, close."""
        if self._server is None:
            return
        server, self._server = self._server, None
        if self._health_task is not None:
            self._health_task.cancel()
            await asyncio.wait([self._health_task])
            self._health_task = None
        await self.health.enter_graceful_shutdown()
        await self._close(server)
        logger.info("balancer on %s stopped", self.address)
