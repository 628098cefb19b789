"""How ``pq`` reports a failure: one line, ``error: CODE: message``, and an
exit code.

CODE is the gRPC status name (``NOT_FOUND``, ``UNAVAILABLE``...); a check
made before any call (a flag out of range, flags that contradict each
other) says ``INVALID_ARGUMENT`` and exits 2, a call that failed exits 1.
A field a server names (``jobs[0].priority``, ``config.default_lease_ms``)
is shown as the flag that sets it (``--priority``, ``--lease-ms``); a
refused connection says which endpoint was tried and what to check.
"""

from __future__ import annotations

import re

from pqueue.errors import (
    AlreadyExistsError,
    InvalidArgumentError,
    NotTakenError,
    PQueueError,
    RemoteError,
    UnavailableError,
)
from pqueue.wire.logs import describe

EXIT_FAILED = 1
EXIT_USAGE = 2


class UsageError(ValueError):
    """A command's own check refused its command line before any call:
    ``flag`` (as typed) and why."""

    def __init__(self, flag: str, reason: str) -> None:
        super().__init__(f"{flag}: {reason}")
        self.flag = flag
        self.reason = reason


#: A queue config field -> the flag of ``pq queue create`` / ``update`` that sets it.
CONFIG_FLAGS = {
    "max_attempts": "--max-attempts",
    "default_lease_ms": "--lease-ms",
    "max_lease_total_ms": "--max-lease-total-ms",
    "backoff_base_ms": "--backoff-base-ms",
    "backoff_max_ms": "--backoff-max-ms",
    "aging_interval_ms": "--aging-interval-ms",
    "max_payload_bytes": "--max-payload-bytes",
    "dedup_window_ms": "--dedup-window-ms",
    "min_priority": "--min-priority",
    "max_priority": "--max-priority",
    "delete_when_idle": "--delete-when-idle",
    "shares": "--share",
    "max_result_bytes": "--max-result-bytes",
    "completed_retention_ms": "--completed-retention-ms",
    "completed_max": "--completed-max",
    "max_dispatch_per_s": "--max-dispatch-per-s",
    "max_inflight": "--max-inflight",
    "job_ttl_ms": "--job-ttl-ms",
    "dead_retention_ms": "--dead-retention-ms",
}

#: A job's field (``job.X``, ``jobs[N].X``) -> the flag of ``pq enqueue``.
JOB_FLAGS = {
    "payload": "PAYLOAD",
    "priority": "--priority",
    "delay_ms": "--delay-ms",
    "not_before_ms": "--not-before",
    "idempotency_key": "--idempotency-key",
    "group": "--group",
    "expires_at_ms": "--expires-at",
}

#: A request's own field -> the argument or flag of the command that sets it.
REQUEST_FLAGS = {
    "queue": "QUEUE",
    "job_id": "JOB_ID",
    "lease_id": "LEASE_ID",
    "leases": "JOB_ID:LEASE_ID",
    "max_jobs": "--max",
    "lease_ms": "--lease-ms",
    "wait_ms": "--wait-ms",
    "consumer_id": "--consumer-id",
    "reason": "--reason",
    "delay_ms": "--delay-ms",
    "result": "--result",
    "page_token": "--page-token",
    "limit": "--limit",
    "schedule.name": "NAME",
    "schedule.cron": "--cron",
    "schedule.timezone": "--timezone",
    "schedule.job.payload": "--payload",
    "schedule.job.priority": "--priority",
    "schedule.job.group": "--group",
}

_JOB_FIELD = re.compile(r"^(?:job|jobs\[\d+\])\.(\w+)$")
_CONFIG_FIELD = re.compile(r"^config\.(\w+)")


def flag_of(field: str) -> str:
    """The flag that sets a request field a server named (the field itself
    when no flag does)."""
    if field in REQUEST_FLAGS:
        return REQUEST_FLAGS[field]
    job = _JOB_FIELD.match(field)
    if job and job.group(1) in JOB_FLAGS:
        return JOB_FLAGS[job.group(1)]
    config = _CONFIG_FIELD.match(field)
    if config and config.group(1) in CONFIG_FLAGS:
        return CONFIG_FLAGS[config.group(1)] + field[config.end() :]
    return field


def _config_fields_as_flags(text: str, bare: bool = True) -> str:
    """Config field names in ``text`` (``max_attempts is 5, asked 3``,
    ``must not exceed config.max_priority``) as flags. ``bare``: a name
    without ``config.`` too, else only one with an underscore (a plain word
    of a reason, ``shares``, stays a word)."""
    names = "|".join(sorted(CONFIG_FLAGS, key=len, reverse=True))

    def flag(m: re.Match[str]) -> str:
        name = m.group(2)
        return CONFIG_FLAGS[name] if m.group(1) or bare or "_" in name else m.group(0)

    return re.sub(rf"\b(config\.)?({names})\b", flag, text)


#: What an ALREADY_EXISTS says before the differing fields (the queue's name,
#: which may look like a field, stays as it is).
_DIFFERENCES = "different config: "


def _refused(message: str) -> bool:
    """Whether an UNAVAILABLE says nothing listens at the address."""
    lowered = message.lower()
    return "connection refused" in lowered or "failed to connect to all addresses" in lowered


def connection_hint(endpoint: str, default_endpoint: str) -> str:
    """What a refused connection prints after ``error: UNAVAILABLE:``."""
    if endpoint == default_endpoint:
        return f"no cluster at {endpoint} — is 'make cluster' running?"
    return f"no cluster at {endpoint} (connection refused) — is --endpoint (PQ_ENDPOINT) right?"


def failure_line(exc: BaseException, endpoint: str = "", default_endpoint: str = "") -> str:
    """``error: CODE: message`` for ``exc``."""
    if isinstance(exc, UsageError):
        return f"error: INVALID_ARGUMENT: {exc.flag}: {exc.reason}"
    if isinstance(exc, InvalidArgumentError):
        reason = _config_fields_as_flags(exc.reason, bare=False)
        return f"error: INVALID_ARGUMENT: {flag_of(exc.field)}: {reason}"
    if isinstance(exc, ValueError | TypeError):  # a client-side check, or protobuf's
        return f"error: INVALID_ARGUMENT: {describe(exc)}"
    if isinstance(exc, PQueueError):
        from pqueue.wire.status import code_of

        code = exc.code if isinstance(exc, RemoteError) else code_of(exc).name
        message = describe(exc)
        if isinstance(exc, AlreadyExistsError):
            head, sep, differences = message.partition(_DIFFERENCES)
            message = head + sep + _config_fields_as_flags(differences) if sep else message
        if (
            isinstance(exc, UnavailableError)
            and not isinstance(exc, NotTakenError)
            and endpoint
            and _refused(message)
        ):
            message = connection_hint(endpoint, default_endpoint)
        notes = "".join(f" ({note})" for note in getattr(exc, "__notes__", ()))
        return f"error: {code}: {message}{notes}"
    if isinstance(exc, FileNotFoundError):
        return f"error: NOT_FOUND: {describe(exc)}"
    if isinstance(exc, PermissionError):
        return f"error: PERMISSION_DENIED: {describe(exc)}"
    if isinstance(exc, OSError):
        return f"error: FAILED_PRECONDITION: {describe(exc)}"
    return f"error: INTERNAL: {describe(exc)} (PQ_DEBUG=1 shows where)"


def exit_code(exc: BaseException) -> int:
    """2 when the command line was refused before any call (a ``ValueError``
    of the CLI's own checks), else 1."""
    if isinstance(exc, ValueError | TypeError) and not isinstance(exc, PQueueError):
        return EXIT_USAGE
    return EXIT_FAILED
