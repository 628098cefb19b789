"""Queue config defaults and the stateless validation of request fields.

Pure: used by the servicer (before a command is proposed) and by the state
machine (which re-checks everything that depends on state).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import TypeVar

from pqueue.errors import InvalidArgumentError
from pqueue.v1 import queue_pb2 as pb

# The contract's sizes live in the kernel (the balancer and the SDK need them
# too); the core validates against the same numbers.
from pqueue.wire.sizes import MAX_BATCH_JOBS as MAX_BATCH_JOBS
from pqueue.wire.sizes import MAX_MESSAGE_BYTES as MAX_MESSAGE_BYTES
from pqueue.wire.sizes import MAX_PAYLOAD_BYTES_LIMIT as MAX_PAYLOAD_BYTES_LIMIT
from pqueue.wire.sizes import MAX_PEER_MESSAGE_BYTES as MAX_PEER_MESSAGE_BYTES
from pqueue.wire.sizes import MAX_REASON_CHARS as MAX_REASON_CHARS
from pqueue.wire.sizes import MAX_RESULT_BYTES_LIMIT as MAX_RESULT_BYTES_LIMIT

DEFAULT_MAX_ATTEMPTS = 5
DEFAULT_LEASE_MS = 30_000
DEFAULT_MAX_LEASE_TOTAL_MS = 12 * 3600 * 1000
DEFAULT_BACKOFF_BASE_MS = 1_000
DEFAULT_BACKOFF_MAX_MS = 600_000
DEFAULT_MAX_PAYLOAD_BYTES = 1 << 20
DEFAULT_DEDUP_WINDOW_MS = 300_000
DEFAULT_MAX_RESULT_BYTES = 64 << 10
DEFAULT_COMPLETED_RETENTION_MS = 3600 * 1000
DEFAULT_COMPLETED_MAX = 10_000

#: Hard ceilings no queue config can raise.
MAX_ATTEMPTS_LIMIT = 1000
MAX_DURATION_MS = 7 * 24 * 3600 * 1000
#: Retention periods (completed records, dead jobs) and job TTLs.
MAX_RETENTION_MS = 90 * 24 * 3600 * 1000
MAX_COMPLETED_LIMIT = 1_000_000
#: max_dispatch_per_s is kept in thousandths (deterministic integer math).
MAX_DISPATCH_PER_S = 1_000_000.0
MAX_LEASE_JOBS = 1000
MAX_WAIT_MS = 60_000
MAX_LIST_LIMIT = 1000
DEFAULT_LIST_LIMIT = 100
MAX_NAME_CHARS = 128
#: Queues a cluster holds (each is a dozen metric series, labelled by its name).
MAX_QUEUES = 10_000
MAX_KEY_CHARS = 256
#: Tenants a queue can list in ``shares``, and the largest weight of one.
MAX_SHARES = 64
MAX_WEIGHT = 1000
#: A dead job keeps this many of its most recent errors.
MAX_ERROR_HISTORY = 32
#: Group commit stops adding commands to an entry past this size (an entry
#: always holds at least one command, which fits in MAX_MESSAGE_BYTES).
MAX_ENTRY_BYTES = 16 << 20
#: A lease response stops adding jobs past this many payload bytes (it always
#: carries at least one), so it never outgrows MAX_MESSAGE_BYTES.
MAX_LEASE_RESPONSE_BYTES = 16 << 20


def take_batch(pending: list[T], size_of: Callable[[T], int], max_items: int) -> int:
    """How many of ``pending`` fit one log entry: at least one, at most
    ``max_items``, and no more once MAX_ENTRY_BYTES is reached."""
    total = 0
    for n, item in enumerate(pending[:max_items], start=1):
        total += size_of(item)
        if total >= MAX_ENTRY_BYTES:
            return n
    return min(len(pending), max_items)


T = TypeVar("T")

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:\-]*$")


def check_queue_name(name: str, field: str = "queue") -> None:
    """Queue names: 1..128 characters of letters, digits and ``._:-``, optionally
    after a tenant's name and a slash (``acme/emails``: tenant ``acme``'s queue)."""
    tenant, slash, rest = name.partition("/")
    if slash:
        check_tenant(tenant, field)
        name = rest
    if not name:
        raise InvalidArgumentError(field, "must not be empty")
    if len(name) > MAX_NAME_CHARS:
        raise InvalidArgumentError(field, f"longer than {MAX_NAME_CHARS} characters")
    if not _NAME_RE.fullmatch(name):
        raise InvalidArgumentError(
            field, "use letters, digits and . _ : - (starting with a letter or digit)"
        )


def tenant_of(queue: str) -> str:
    """The tenant a stored queue name belongs to ("" for a name without one)."""
    tenant, slash, _ = queue.partition("/")
    return tenant if slash else ""


def check_tenant(tenant: str, field: str = "tenant") -> None:
    """Tenant names follow the queue-name rules (a tenant prefixes its queues' names)."""
    if not tenant:
        raise InvalidArgumentError(field, "the tenant must not be empty")
    if len(tenant) > MAX_NAME_CHARS or not _NAME_RE.fullmatch(tenant):
        raise InvalidArgumentError(
            field,
            "a tenant is 1..128 letters, digits and . _ : - (starting with one of the first two)",
        )


def check_text(value: str, field: str, max_chars: int = MAX_KEY_CHARS) -> None:
    """Free-text fields (keys, groups, consumer ids, reasons) are bounded."""
    if len(value) > max_chars:
        raise InvalidArgumentError(field, f"longer than {max_chars} characters")


def check_duration(value: int, field: str, upper_ms: int = MAX_DURATION_MS) -> None:
    """Durations are non-negative and bounded."""
    if value < 0:
        raise InvalidArgumentError(field, "must not be negative")
    if value > upper_ms:
        raise InvalidArgumentError(field, f"must be at most {upper_ms} ms")


def effective_config(config: pb.QueueConfig, lifecycle: bool = True) -> pb.QueueConfig:
    """The config with every zero field replaced by its default; validated.
    Without ``lifecycle`` (a machine before the switch, ``features.LIFECYCLE``)
    the fields that feature added are left as sent, as a release before it
    left them."""
    out = pb.QueueConfig()
    out.CopyFrom(config)
    out.max_attempts = out.max_attempts or DEFAULT_MAX_ATTEMPTS
    out.default_lease_ms = out.default_lease_ms or DEFAULT_LEASE_MS
    out.max_lease_total_ms = out.max_lease_total_ms or DEFAULT_MAX_LEASE_TOTAL_MS
    out.backoff_base_ms = out.backoff_base_ms or DEFAULT_BACKOFF_BASE_MS
    out.backoff_max_ms = out.backoff_max_ms or DEFAULT_BACKOFF_MAX_MS
    out.max_payload_bytes = out.max_payload_bytes or DEFAULT_MAX_PAYLOAD_BYTES
    out.dedup_window_ms = out.dedup_window_ms or DEFAULT_DEDUP_WINDOW_MS
    shares = sorted(out.shares, key=lambda share: share.tenant)
    del out.shares[:]
    out.shares.extend(pb.TenantShare(tenant=s.tenant, weight=s.weight or 1) for s in shares)
    if lifecycle:
        out.max_result_bytes = out.max_result_bytes or DEFAULT_MAX_RESULT_BYTES
        out.completed_retention_ms = out.completed_retention_ms or DEFAULT_COMPLETED_RETENTION_MS
        if not out.HasField("completed_max"):
            out.completed_max = DEFAULT_COMPLETED_MAX
        validate_lifecycle_config(out)
    validate_config(out)
    return out


def validate_lifecycle_config(c: pb.QueueConfig) -> None:
    """The fields the lifecycle feature added (see ``validate_config``)."""
    if c.max_result_bytes > MAX_RESULT_BYTES_LIMIT:
        raise InvalidArgumentError(
            "config.max_result_bytes", f"must be at most {MAX_RESULT_BYTES_LIMIT}"
        )
    for name in ("completed_retention_ms", "job_ttl_ms", "dead_retention_ms"):
        check_duration(getattr(c, name), f"config.{name}", MAX_RETENTION_MS)
    if c.completed_max > MAX_COMPLETED_LIMIT:
        raise InvalidArgumentError("config.completed_max", f"must be at most {MAX_COMPLETED_LIMIT}")
    rate = c.max_dispatch_per_s
    if not 0 <= rate <= MAX_DISPATCH_PER_S:  # NaN fails too
        raise InvalidArgumentError(
            "config.max_dispatch_per_s", f"must lie within 0 and {MAX_DISPATCH_PER_S:g}"
        )
    if 0 < rate < 0.001:
        raise InvalidArgumentError("config.max_dispatch_per_s", "must be 0 or at least 0.001")


def dispatch_milli(config: pb.QueueConfig) -> int:
    """max_dispatch_per_s in thousandths of a lease per second (0: no limit):
    the integer every replica computes alike from the same double."""
    return round(config.max_dispatch_per_s * 1000)


def validate_config(c: pb.QueueConfig) -> None:
    """Raise InvalidArgumentError naming the first bad field of a filled config."""
    if c.max_attempts > MAX_ATTEMPTS_LIMIT:
        raise InvalidArgumentError("config.max_attempts", f"must be at most {MAX_ATTEMPTS_LIMIT}")
    for name in (
        "default_lease_ms",
        "max_lease_total_ms",
        "backoff_base_ms",
        "backoff_max_ms",
        "aging_interval_ms",
        "dedup_window_ms",
    ):
        check_duration(getattr(c, name), f"config.{name}")
    if c.default_lease_ms > c.max_lease_total_ms:
        raise InvalidArgumentError(
            "config.default_lease_ms", "must not exceed config.max_lease_total_ms"
        )
    if c.backoff_base_ms > c.backoff_max_ms:
        raise InvalidArgumentError("config.backoff_base_ms", "must not exceed backoff_max_ms")
    if c.max_payload_bytes > MAX_PAYLOAD_BYTES_LIMIT:
        raise InvalidArgumentError(
            "config.max_payload_bytes", f"must be at most {MAX_PAYLOAD_BYTES_LIMIT}"
        )
    if (
        c.HasField("min_priority")
        and c.HasField("max_priority")
        and c.min_priority > c.max_priority
    ):
        raise InvalidArgumentError("config.min_priority", "must not exceed config.max_priority")
    _check_shares(c.shares)
    if c.shares and c.delete_when_idle:
        raise InvalidArgumentError(
            "config.delete_when_idle", "a shared queue is kept: its shares would go with it"
        )


def _check_shares(shares: Sequence[pb.TenantShare]) -> None:
    if len(shares) > MAX_SHARES:
        raise InvalidArgumentError("config.shares", f"at most {MAX_SHARES} tenants")
    seen: set[str] = set()
    for i, share in enumerate(shares):
        check_tenant(share.tenant, f"config.shares[{i}].tenant")
        if share.tenant in seen:
            raise InvalidArgumentError(f"config.shares[{i}].tenant", "listed twice")
        seen.add(share.tenant)
        if share.weight > MAX_WEIGHT:
            raise InvalidArgumentError(f"config.shares[{i}].weight", f"at most {MAX_WEIGHT}")


def check_job_spec(spec: pb.JobSpec, field: str) -> None:
    """Stateless checks of one job; queue-dependent bounds are checked in apply."""
    if len(spec.payload) > MAX_PAYLOAD_BYTES_LIMIT:
        raise InvalidArgumentError(
            f"{field}.payload", f"{len(spec.payload)} bytes exceeds {MAX_PAYLOAD_BYTES_LIMIT}"
        )
    # Each field's name is formatted only for its error (this runs for every
    # job of every enqueue, on every replica).
    if not 0 <= spec.delay_ms <= MAX_DURATION_MS:
        check_duration(spec.delay_ms, f"{field}.delay_ms")
    if spec.not_before_ms < 0:
        raise InvalidArgumentError(f"{field}.not_before_ms", "must not be negative")
    if spec.expires_at_ms < 0:
        raise InvalidArgumentError(f"{field}.expires_at_ms", "must not be negative")
    if len(spec.idempotency_key) > MAX_KEY_CHARS:
        check_text(spec.idempotency_key, f"{field}.idempotency_key")
    if len(spec.group) > MAX_KEY_CHARS:
        check_text(spec.group, f"{field}.group")
