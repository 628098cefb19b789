"""What a balancer is told: where it listens, its backends, its probe rules."""

from __future__ import annotations

from dataclasses import dataclass, field

from balancer.pool import PoolConfig
from pqueue.wire.loop import GC_YOUNG, GC_YOUNG_MIN
from pqueue.wire.tls import Tls
from pqueue.wire.tokens import TokenSource


@dataclass(frozen=True)
class BalancerConfig:
    """A balancer's settings (times in seconds)."""

    backends: tuple[str, ...]
    listen: str = "127.0.0.1:0"
    #: ``HOST:PORT`` for ``/metrics`` (port 0: any); None serves no metrics.
    metrics_listen: str | None = None
    #: The cyclic collector's youngest threshold (``pqueue.wire.loop.GC_YOUNG``).
    gc_young: int = GC_YOUNG
    #: How often each node's load is probed.
    probe_interval_s: float = 1.0
    #: A probe that takes longer fails.
    probe_timeout_s: float = 0.8
    #: How often to probe while no leader is known (an election is running).
    fast_probe_interval_s: float = 0.1
    #: How long a call may wait for a leader (or, for a read, any node) to be
    #: known, within its deadline.
    leader_wait_s: float = 5.0
    #: A leader call unanswered this long makes every node be probed fast
    #: (``fast_probe_interval_s``) for ``suspect_probe_s``: has another node
    #: taken over (a frozen leader)? If one has, calls still waiting on the
    #: old leader are abandoned (and sent to the new one when they may be).
    leader_stall_s: float = 0.25
    suspect_probe_s: float = 3.0
    #: How long in-flight calls may finish on stop.
    grace_s: float = 5.0
    #: Seeds the picker's random start; None: a fresh one per balancer.
    seed: int | None = None
    pool: PoolConfig = field(default_factory=PoolConfig)
    #: TLS for the balancer's own port (clients); with a CA, clients need certificates.
    tls: Tls | None = None
    #: TLS towards the nodes: their CA, and this balancer's certificate for mutual TLS.
    backend_tls: Tls | None = None
    #: The bearer token load probes carry, when the nodes require tokens: a
    #: string, or a ``TokenFile`` re-read when it changes (rotation).
    probe_token: TokenSource | None = None
    #: This balancer's own token (role ``balancer``; a string, or a ``TokenFile``
    #: re-read when it changes), sent to the nodes as ``pq-forwarder-token`` so
    #: that they believe the client address it passes on; probes carry it too
    #: when no ``probe_token`` is given. None: nodes with auth on log the
    #: balancer's address as the client's, and the forwarded one as claimed.
    balancer_token: TokenSource | None = None
    #: Bearer token a ``/metrics`` scrape must carry; None: none needed.
    metrics_token: str | None = None
    #: Send single-job writes (Enqueue, Ack, Nack, ExtendLease) of the same
    #: caller to the leader together, in ``Submit`` calls (``balancer.coalesce``).
    coalesce: bool = True
    #: ``Submit`` calls one group (leader and caller) has in flight at once;
    #: calls arriving meanwhile ride the next.
    coalesce_in_flight: int = 1
    #: ``Consume`` streams carried at once; more are refused (RESOURCE_EXHAUSTED).
    max_streams: int = 4096

    def validate(self) -> None:
        """Raise ``ValueError`` on a setting that cannot work."""
        if not self.backends:
            raise ValueError("a balancer needs at least one backend")
        if self.gc_young < GC_YOUNG_MIN:
            raise ValueError(f"gc_young must be {GC_YOUNG_MIN} or more, not {self.gc_young}")
        for address in (*self.backends, self.listen, self.metrics_listen or "h:0"):
            if ":" not in address:
                raise ValueError(f"address {address!r} needs a port (HOST:PORT)")
        if self.probe_interval_s <= 0 or self.probe_timeout_s <= 0:
            raise ValueError("probe_interval_s and probe_timeout_s must be positive")
        if self.pool.report_expiry_s <= self.probe_interval_s + self.probe_timeout_s:
            raise ValueError(
                "report_expiry_s must exceed probe_interval_s + probe_timeout_s, or every "
                "node would expire between two probes"
            )
        if self.leader_stall_s <= 0 or self.suspect_probe_s <= 0:
            raise ValueError("leader_stall_s and suspect_probe_s must be positive")
        if self.fast_probe_interval_s <= 0 or self.leader_wait_s < 0 or self.grace_s < 0:
            raise ValueError("intervals and waits must be positive")
        if self.coalesce_in_flight < 1 or self.max_streams < 1:
            raise ValueError("coalesce_in_flight and max_streams must be at least 1")
        self.pool.validate()
