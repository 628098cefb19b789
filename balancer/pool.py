"""The backends a balancer knows: their probes, weights, ejection and the leader.

Pure: time comes in as ``now_s`` and randomness as a ``Random``, so
every rule here is unit-tested without a clock, a socket or a sleep.

The weight formula (docs/balancer.md states the same)::

    backlog  = in_flight_calls + pending_proposals + apply_lag_entries
    load     = max(cpu_utilization, backlog / (backlog + BACKLOG_HALF))
    weight   = round(MAX_WEIGHT * LOAD_FLOOR / max(LOAD_FLOOR, load))

so an idle node weighs 100, a node at half load 20 and a saturated one 10:
a node never starves entirely while it answers, but a busy one gets a
tenth of an idle one's reads. A node is **ejected** (weight 0) when its
health says NOT_SERVING, when ``eject_after_failures`` probes in a row
fail, or when its last report is older than ``report_expiry_s``. When it
passes a probe again it **ramps up**: its weight is scaled by the time
since it came back over ``slow_start_s`` (at least ``SLOW_START_FLOOR``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from balancer.picker import Picker

if TYPE_CHECKING:
    from random import Random

MAX_WEIGHT = 100
LOAD_FLOOR = 0.1
#: Backlog at which a node counts as half loaded.
BACKLOG_HALF = 32
SLOW_START_FLOOR = 0.1


@dataclass(frozen=True)
class Report:
    """What one probe of one node said (a transport-free NodeStatus)."""

    node_id: int
    serving: bool
    is_leader: bool
    ballot_round: int
    leader_id: int
    cpu_utilization: float
    in_flight_calls: int
    pending_proposals: int
    apply_lag_entries: int
    applied_index: int
    ready_jobs: int


def load_of(report: Report, backlog: int) -> float:
    """A node's load, 0..1: the larger of its CPU use and its backlog share."""
    return max(report.cpu_utilization, backlog / (backlog + BACKLOG_HALF))


def weight_of(load: float) -> int:
    """``MAX_WEIGHT * LOAD_FLOOR / max(LOAD_FLOOR, load)``: 100 idle, 10 saturated."""
    return round(MAX_WEIGHT * LOAD_FLOOR / max(LOAD_FLOOR, load))


@dataclass
class Backend:
    """One node as the balancer sees it."""

    address: str
    report: Report | None = None
    reported_at_s: float | None = None
    health_serving: bool | None = None  # None: the health watch has not said
    failures: int = 0
    ejected: bool = True  # until its first good probe
    ejections: int = 0
    back_since_s: float | None = None
    weight: int = 0
    load: float = 0.0
    backlog: int = 0
    picks: int = 0  # reads sent here by weight
    leader_calls: int = 0  # writes and leases sent here as the leader
    last_error: str = ""
    #: Leadership claims of probes sent before this are stale.
    distrust_before_s: float | None = None


@dataclass(frozen=True)
class PoolConfig:
    """Probe and ejection rules (times in seconds)."""

    eject_after_failures: int = 3
    report_expiry_s: float = 3.0
    slow_start_s: float = 10.0

    def validate(self) -> None:
        """Raise ``ValueError`` on a nonsensical rule."""
        if self.eject_after_failures < 1:
            raise ValueError("eject_after_failures must be >= 1")
        if self.report_expiry_s <= 0 or self.slow_start_s < 0:
            raise ValueError("report_expiry_s must be > 0 and slow_start_s >= 0")


@dataclass
class Pool:
    """Backends, their weights, the picker over them and the known leader."""

    addresses: list[str]
    rng: Random
    config: PoolConfig = field(default_factory=PoolConfig)

    def __post_init__(self) -> None:
        self.config.validate()
        if not self.addresses or len(set(self.addresses)) != len(self.addresses):
            raise ValueError(f"backends must be distinct and at least one: {self.addresses}")
        self.backends = {a: Backend(a) for a in self.addresses}
        self.picker = Picker(self.rng)
        #: From a not-leader answer: (node id it named, when).
        self._hint: tuple[int, float] | None = None
        self._now_s = 0.0  # the latest time an input brought
        #: (backend, ejected) for each change since the caller last looked.
        self.changes: list[tuple[str, bool]] = []

    # ------------------------------------------------------------ inputs

    def on_report(
        self, address: str, report: Report, now_s: float, sent_at_s: float | None = None
    ) -> None:
        """A probe sent at ``sent_at_s`` (default: now) answered."""
        b = self.backends[address]
        sent_at_s = now_s if sent_at_s is None else sent_at_s
        if b.distrust_before_s is not None:
            if sent_at_s < b.distrust_before_s:
                # Sent before the node failed a call or said it does not
                # lead: its claim to lead is stale.
                report = _replace_leader(report, report.leader_id)
            else:
                b.distrust_before_s = None
        b.report, b.reported_at_s, b.failures, b.last_error = report, now_s, 0, ""
        if self._hint and report.is_leader and report.node_id != self._hint[0]:
            self._hint = None  # a fresh claim outranks a hint
        self.refresh(now_s)

    def on_failure(self, address: str, error: str, now_s: float) -> None:
        """A probe failed (timeout, refused, bad answer)."""
        b = self.backends[address]
        b.failures += 1
        b.last_error = error
        self.refresh(now_s)

    def on_health(self, address: str, serving: bool | None, now_s: float) -> None:
        """The node's grpc.health.v1 status changed (None: the watch broke)."""
        self.backends[address].health_serving = serving
        self.refresh(now_s)

    def on_not_leader(self, address: str, leader_id: int, now_s: float) -> None:
        """A node said it does not lead (and named who does, if it knows)."""
        self._depose(address, now_s)
        self._hint = (leader_id, now_s) if leader_id else None

    def on_unreachable(self, address: str, now_s: float) -> None:
        """A call to it failed unanswered, or it took nothing: it may not lead now."""
        self._depose(address, now_s)
        b = self.backends[address]
        if self._hint and b.report and self._hint[0] == b.report.node_id:
            self._hint = None

    def _depose(self, address: str, now_s: float) -> None:
        b = self.backends[address]
        if b.report is not None and b.report.is_leader:
            b.report = _replace_leader(b.report, 0)
        b.distrust_before_s = now_s
        self._now_s = max(self._now_s, now_s)

    # ------------------------------------------------------------ derived

    def refresh(self, now_s: float) -> None:
        """Recompute ejection and weights (also on each probe tick)."""
        self._now_s = max(self._now_s, now_s)
        weights: dict[str, int] = {}
        for b in self.backends.values():
            up = (
                self._fresh(b, now_s)
                and b.failures < self.config.eject_after_failures
                and b.health_serving is not False
                and b.report is not None
                and b.report.serving
            )
            if not up and not b.ejected:
                b.ejected, b.back_since_s = True, None
                b.ejections += 1
                self.changes.append((b.address, True))
            elif up and b.ejected:
                # A node returning ramps up; one seen for the first time
                # (the balancer just started) starts at full weight.
                b.ejected, b.back_since_s = False, now_s if b.ejections else None
                self.changes.append((b.address, False))
            if b.ejected or b.report is None:
                b.weight = 0
                weights[b.address] = 0
                continue
            r = b.report
            # Not the lag behind other nodes' applied index: reports are
            # taken at different moments, so under load that is mostly noise.
            b.backlog = r.in_flight_calls + r.pending_proposals + r.apply_lag_entries
            b.load = load_of(r, b.backlog)
            b.weight = max(1, round(weight_of(b.load) * self._ramp(b, now_s)))
            weights[b.address] = b.weight
        self.picker.set_weights(weights)

    def _fresh(self, b: Backend, now_s: float) -> bool:
        return (
            b.reported_at_s is not None and now_s - b.reported_at_s <= self.config.report_expiry_s
        )

    def _ramp(self, b: Backend, now_s: float) -> float:
        if b.back_since_s is None or self.config.slow_start_s == 0:
            return 1.0
        return max(SLOW_START_FLOOR, min(1.0, (now_s - b.back_since_s) / self.config.slow_start_s))

    def pick(self, exclude: tuple[str, ...] = ()) -> str | None:
        """A backend for a read, by weight; None when every one is ejected."""
        address = self.picker.pick(exclude)
        if address is not None:
            self.backends[address].picks += 1
        return address

    def leader(self) -> str | None:
        """The backend that leads, as far as we know.

        Not-leader answers name the leader (a hint, trusted for
        ``report_expiry_s`` or until a fresh report claims otherwise);
        otherwise, of the reports claiming to lead (an old leader may not
        have heard yet), the highest ballot wins. A leader is dropped when it
        says it does not lead, fails a call, stops serving or its health
        stream breaks, not merely because a probe was slow: a slow leader
        is still the only one that can take a write.
        """
        if self._hint is not None and self._now_s - self._hint[1] <= self.config.report_expiry_s:
            for b in self.backends.values():
                if b.report is not None and b.report.node_id == self._hint[0] and _can_lead(b):
                    return b.address
        claims = [b for b in self.backends.values() if b.report and b.report.is_leader]
        claims = [b for b in claims if _can_lead(b)]
        if not claims:
            return None
        return max(claims, key=_ballot).address


def _can_lead(b: Backend) -> bool:
    return b.health_serving is not False and b.report is not None and b.report.serving


def _ballot(b: Backend) -> tuple[int, int]:
    return (b.report.ballot_round, b.report.node_id) if b.report else (0, 0)


def _replace_leader(report: Report, leader_id: int) -> Report:
    return replace(report, is_leader=False, leader_id=leader_id)
