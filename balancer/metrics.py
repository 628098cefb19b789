"""The balancer's Prometheus metrics, on a registry of its own (one per balancer)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from pqueue.wire.observe import GrpcMetrics
from pqueue.wire.process_metrics import ProcessCollector

#: Operations per ``Submit``: one lone call up to the 1000 a ``Submit`` takes.
SUBMIT_OPS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000)


class BalancerMetrics:
    """Per-backend weight, picks, ejections and retries; coalescing; streams;
    calls; the process."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.weight = Gauge(
            "pq_balancer_backend_weight",
            "Weight reads are picked by (0: ejected).",
            ["backend"],
            registry=r,
        )
        self.up = Gauge(
            "pq_balancer_backend_up", "1 if the backend is not ejected.", ["backend"], registry=r
        )
        self.leader = Gauge(
            "pq_balancer_backend_leader", "1 for the backend writes go to.", ["backend"], registry=r
        )
        self.load = Gauge(
            "pq_balancer_backend_load_ratio",
            "max(CPU, backlog share) from the backend's last report, 0..1.",
            ["backend"],
            registry=r,
        )
        self.picks = Counter(
            "pq_balancer_picks_total",
            "Calls sent to a backend, by route (read: by weight; leader: writes and leases).",
            ["backend", "route"],
            registry=r,
        )
        self.ejections = Counter(
            "pq_balancer_ejections_total", "Times a backend was ejected.", ["backend"], registry=r
        )
        self.retries = Counter(
            "pq_balancer_retries_total",
            "Calls sent again (each resend), by why "
            "(not_leader, not_taken, unreachable, leader_moved).",
            ["backend", "reason"],
            registry=r,
        )
        self.probe_failures = Counter(
            "pq_balancer_probe_failures_total", "Load probes that failed.", ["backend"], registry=r
        )
        self.coalesced = Counter(
            "pq_balancer_coalesced_calls_total",
            "Single calls (Enqueue, Ack, Nack, ExtendLease) sent to the leader inside a Submit.",
            registry=r,
        )
        self.submit_ops = Histogram(
            "pq_balancer_submit_operations",
            "Calls per Submit the balancer sent for them.",
            registry=r,
            buckets=SUBMIT_OPS_BUCKETS,
        )
        self.fallbacks = Counter(
            "pq_balancer_coalesce_fallbacks_total",
            "Submits whose calls were sent alone instead, by why (unimplemented: the node is "
            "older; refused: the Submit was refused whole, say a call did not parse).",
            ["reason"],
            registry=r,
        )
        self.streams_open = Gauge(
            "pq_balancer_streams_open",
            "Streams (Consume, SubmitStream) carried to the leader now.",
            registry=r,
        )
        self.streams = Counter(
            "pq_balancer_streams_total",
            "Streams (Consume, SubmitStream) ended, by how"
            " (ok, client_left, leader_moved, a status code).",
            ["end"],
            registry=r,
        )
        self.grpc = GrpcMetrics(r)  # calls by method and code, and their latency
        r.register(ProcessCollector())
