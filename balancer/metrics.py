"""The balancer's Prometheus metrics, on a registry of its own (one per balancer)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class BalancerMetrics:
    """Per-backend weight, picks, ejections and retries; per-method calls."""

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
            "Calls sent a second time, by why (not_leader, not_taken, unreachable).",
            ["backend", "reason"],
            registry=r,
        )
        self.probe_failures = Counter(
            "pq_balancer_probe_failures_total", "Load probes that failed.", ["backend"], registry=r
        )
        self.calls = Counter(
            "pq_balancer_calls_total",
            "Calls proxied, by method and final status code.",
            ["method", "code"],
            registry=r,
        )
        self.latency = Histogram(
            "pq_balancer_call_seconds",
            "Time from a call's arrival to its answer, by method.",
            ["method"],
            registry=r,
            buckets=(
                0.0005,
                0.001,
                0.0025,
                0.005,
                0.01,
                0.025,
                0.05,
                0.1,
                0.25,
                0.5,
                1,
                2.5,
                5,
                10,
                30,
                60,
            ),
        )
