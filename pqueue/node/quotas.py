"""Per-tenant quotas: an enqueue rate, and limits the state machine enforces.

Read from a TOML file given to every node (``pq node --tenants FILE``)::

    [defaults]                  # every tenant not named below
    enqueue_per_s = 1000        # jobs per second, sustained
    enqueue_burst = 2000        # jobs at once (the bucket's size)
    max_inflight_leases = 10000 # leased at once, over all its queues
    max_queue_depth = 1000000   # ready + delayed + leased, in any one queue
    max_payload_bytes = 1048576 # per job
    max_queues = 1000           # queues it holds (enqueues create them)
    max_command_bytes = 4194304 # bytes one call may put in the log
    log_bytes_per_s = 8388608   # bytes per second it may put in the log, sustained
    log_bytes_burst = 33554432  # bytes at once (default: a second's worth, at least one command)

    [tenants.acme]
    enqueue_per_s = 50

The rates (jobs, and bytes put in the log by any command) are token
buckets kept on the leader, which takes every write, so they hold for the
cluster (a new leader starts with full buckets). ``max_command_bytes`` is
checked there too, on the encoded command, before it is proposed. The
other limits are stamped on each enqueue and lease command the leader
proposes (``TenantLimits``), so every replica decides the same way against
the same numbers. Zero or absent: no limit.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from pqueue.core import limits
from pqueue.errors import InvalidArgumentError, ResourceExhaustedError
from pqueue.v1 import log_pb2 as logpb
from pqueue.wire.logs import describe

#: The shortest wait a refusal asks for.
MIN_PUSHBACK_S = 0.1


@dataclass(frozen=True)
class Quota:
    """One tenant's limits (0: none)."""

    enqueue_per_s: float = 0.0
    enqueue_burst: float = 0.0
    max_inflight_leases: int = 0
    max_queue_depth: int = 0
    max_payload_bytes: int = 0
    max_queues: int = 0
    max_command_bytes: int = 0
    log_bytes_per_s: float = 0.0
    log_bytes_burst: float = 0.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not 0 <= value < 2**63:  # nan and infinities fail this too
                raise ValueError(f"{f.name} must be a number from 0 to 2**63, got {value}")
        if 0 < self.enqueue_burst < 1:
            raise ValueError("enqueue_burst below 1 would refuse every enqueue")
        if 0 < self.log_bytes_burst < 1024:
            raise ValueError("log_bytes_burst below 1024 would refuse every command")

    @property
    def burst(self) -> float:
        """The bucket's size: the burst given, else one second's worth (at least 1 job)."""
        return self.enqueue_burst or max(self.enqueue_per_s, 1.0)

    @property
    def bytes_burst(self) -> float:
        """The log-bytes bucket's size: the burst given, else one second's worth
        (at least one command of ``max_command_bytes``, or of the client limit)."""
        largest = self.max_command_bytes or limits.MAX_MESSAGE_BYTES
        return self.log_bytes_burst or max(self.log_bytes_per_s, float(largest))

    def stamp(self) -> logpb.TenantLimits:
        return logpb.TenantLimits(
            max_queue_depth=self.max_queue_depth,
            max_inflight_leases=self.max_inflight_leases,
            max_payload_bytes=self.max_payload_bytes,
            max_queues=self.max_queues,
        )


def _quota(table: Any, where: str) -> Quota:
    if not isinstance(table, dict):
        raise ValueError(f"{where} must be a table")
    known = {f.name for f in fields(Quota)}
    unknown = set(table) - known
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)} (known: {sorted(known)})")
    try:
        values: dict[str, Any] = {k: float(v) if k in _RATES else int(v) for k, v in table.items()}
        return Quota(**values)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: {describe(exc)}") from exc


_RATES = frozenset(("enqueue_per_s", "enqueue_burst", "log_bytes_per_s", "log_bytes_burst"))


@dataclass
class _Bucket:
    tokens: float
    at_s: float


@dataclass
class Quotas:
    """Every tenant's quota, and the leader's enqueue buckets."""

    defaults: Quota = field(default_factory=Quota)
    tenants: dict[str, Quota] = field(default_factory=dict)
    _buckets: dict[str, _Bucket] = field(default_factory=dict)
    _byte_buckets: dict[str, _Bucket] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> Quotas:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"not TOML: {describe(exc)}") from exc
        unknown = set(data) - {"defaults", "tenants"}
        if unknown:
            raise ValueError(f"unknown tables {sorted(unknown)} (known: defaults, tenants)")
        tenants = data.get("tenants", {})
        if not isinstance(tenants, dict):
            raise ValueError("tenants must be a table of tables")
        for name in tenants:
            try:
                limits.check_tenant(name)
            except InvalidArgumentError as exc:
                raise ValueError(f"tenant {name!r}: {describe(exc)}") from exc
        return cls(
            defaults=_quota(data.get("defaults", {}), "defaults"),
            tenants={name: _quota(t, f"tenants.{name}") for name, t in tenants.items()},
        )

    @classmethod
    def from_file(cls, path: Path) -> Quotas:
        try:
            return cls.parse(path.read_text())
        except OSError as exc:
            raise ValueError(f"cannot read the tenants file {path}: {describe(exc)}") from exc
        except ValueError as exc:
            raise ValueError(f"{path}: {describe(exc)}") from exc

    def of(self, tenant: str) -> Quota:
        return self.tenants.get(tenant, self.defaults)

    def take(self, tenant: str, jobs: int, now_s: float) -> None:
        """Spend ``jobs`` enqueue tokens, or raise RESOURCE_EXHAUSTED with the wait."""
        quota = self.of(tenant)
        if not quota.enqueue_per_s:
            return
        burst = quota.burst
        bucket = self._buckets.get(tenant)
        if bucket is None:
            bucket = self._buckets[tenant] = _Bucket(burst, now_s)
        bucket.tokens = min(burst, bucket.tokens + (now_s - bucket.at_s) * quota.enqueue_per_s)
        bucket.at_s = now_s
        if jobs > burst:
            raise ResourceExhaustedError(
                f"{jobs} jobs in one call exceed tenant {tenant!r}'s burst of {burst:g}; "
                "send smaller batches"
            )
        if bucket.tokens < jobs:
            # Not the time until the next token: every other caller of this
            # tenant wants it too, and each refusal costs the leader a call.
            wait_s = max((jobs - bucket.tokens) / quota.enqueue_per_s, MIN_PUSHBACK_S)
            raise ResourceExhaustedError(
                f"tenant {tenant!r} is over its enqueue rate of {quota.enqueue_per_s:g} jobs/s",
                retry_after_s=wait_s,
            )
        bucket.tokens -= jobs

    def take_bytes(self, tenant: str, size: int, now_s: float) -> None:
        """Charge ``size`` bytes a command would put in the log, or raise
        RESOURCE_EXHAUSTED: without a retry hint for a command over
        ``max_command_bytes`` (it fails the same way every time), with one
        while the tenant is over its bytes rate."""
        quota = self.of(tenant)
        if quota.max_command_bytes and size > quota.max_command_bytes:
            raise ResourceExhaustedError(
                f"this command is {size} bytes, over tenant {tenant!r}'s limit of "
                f"{quota.max_command_bytes} bytes per command; send smaller batches"
            )
        if not quota.log_bytes_per_s:
            return
        burst = quota.bytes_burst
        if size > burst:
            raise ResourceExhaustedError(
                f"this command is {size} bytes, over tenant {tenant!r}'s burst of "
                f"{burst:g} log bytes; send smaller batches"
            )
        bucket = self._byte_buckets.get(tenant)
        if bucket is None:
            bucket = self._byte_buckets[tenant] = _Bucket(burst, now_s)
        bucket.tokens = min(burst, bucket.tokens + (now_s - bucket.at_s) * quota.log_bytes_per_s)
        bucket.at_s = now_s
        if bucket.tokens < size:
            wait_s = max((size - bucket.tokens) / quota.log_bytes_per_s, MIN_PUSHBACK_S)
            raise ResourceExhaustedError(
                f"tenant {tenant!r} is over its rate of {quota.log_bytes_per_s:g} log bytes/s",
                retry_after_s=wait_s,
            )
        bucket.tokens -= size
