"""Upgrade safety: what a replica must understand to apply the log.

Pure (no IO, clock or network). One table, ``FIELD_FEATURES``, names every
log field added since the first log format (``V1_FIELDS``) and the *feature*
a replica needs to apply it. Three rules keep a rolling upgrade from
diverging:

1. **Announce.** Each node supports a set of features (``SUPPORTED`` in this
   release) and announces it to every peer, in the ``pq-features`` header of
   the peer stream it opens (``pqueue.node.peers``). A node whose stream carries no
   header predates announcements, and a member not heard from since this
   process started may too: both are taken to support ``LEGACY`` only (what
   every release that can be a member understands), so any feature added
   from now on waits for every member's announcement.
2. **Gate.** The leader proposes a command only if every member supports
   every feature it needs (``required``); otherwise the call is refused with
   FAILED_PRECONDITION naming the feature and the nodes lacking it
   (``QueueNode.propose``). A cluster of one supports what it has.
3. **Stop.** The leader stamps each entry with the features it needs
   (``LogEntry.required_features``), less those the log before it already
   needs: a replica lacking one of the features left out stopped at the
   first entry that needed it. A replica that meets an entry needing a
   feature it does not support, or holding fields or a command kind it cannot
   decode (a newer writer), stops before applying it (``check_entry``): the
   log fails, the node reports NOT_SERVING and says to upgrade it. It applies
   neither that entry nor any after it, and stops the same way on every
   restart until it is upgraded. Diverging silently is never an option.
   Snapshots carry the union of their entries' features
   (``Snapshot.required_features``) and are refused the same way
   (``check_restored``, ``check_snapshot``).

A new command kind or field goes into ``FIELD_FEATURES`` with a new feature
name added to ``SUPPORTED``; ``tests/unit/test_features.py`` fails until it
does.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable
from collections.abc import Set as AbstractSet
from typing import NamedTuple, cast

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from pqueue.errors import UpgradeRequiredError
from pqueue.v1 import log_pb2 as logpb
from pqueue.v1 import queue_pb2 as pb

#: Metadata key of the peer stream header that announces a node's features.
FEATURES_KEY = "pq-features"

#: Per-tenant limits stamped on commands (``Command.limits``).
TENANT_LIMITS = "tenant_limits"
#: The caller stamped on enqueues (``Command.caller``) and the producing
#: tenant kept on jobs and idempotency keys.
CALLER = "caller"
#: Queues shared between tenants with weights (``QueueConfig.shares``) and the
#: fair-leasing state kept for them.
SHARES = "shares"
#: The deliveries counter kept in snapshots (``QueueStats.leased_total``).
LEASED_TOTAL = "leased_total"

#: Waiting jobs in the compact form in snapshots (``Snapshot.packed``). Only
#: snapshots carry it, and no log entry needs it: a release before it refuses
#: such a snapshot as holding unknown fields and asks to be upgraded.
PACKED_JOBS = "packed_jobs"

#: The life of a job after its delivery and the controls around it: acked
#: jobs kept as COMPLETED records (with results), operator actions on one
#: job, queue updates, pause, dispatch limits, expiry, retention and cron
#: schedules. Besides its own fields, it changes what a plain ack does (the
#: job is kept as a record), so the machine applies that only once an entry
#: has needed it: the leader proposes ``Tick(lifecycle=True)`` once every
#: member announces it (``QueueMachine.lifecycle``).
LIFECYCLE = "lifecycle"

#: Every feature this release can apply.
SUPPORTED: frozenset[str] = frozenset(
    {TENANT_LIMITS, CALLER, SHARES, LEASED_TOTAL, PACKED_JOBS, LIFECYCLE}
)

#: What a member is taken to support until it announces otherwise: a node
#: whose stream carries no header (it predates announcements) or that has not
#: been heard from since this process started. Every release that can be a
#: member understands these (the log carried them before announcements
#: existed), so a member that is down does not make them unusable. A feature
#: added from now on is *not* listed here: until every member announces it,
#: the leader does not use it. (Development builds older than per-tenant
#: quotas and shares cannot join a mixed cluster safely: they announce
#: nothing and understand less than this. Bring them to the last release
#: before announcements first.)
LEGACY: frozenset[str] = frozenset({TENANT_LIMITS, CALLER, SHARES, LEASED_TOTAL})

#: What each feature lets the leader do, as a refusal names it.
USES: dict[str, str] = {
    TENANT_LIMITS: "per-tenant limits (quotas)",
    CALLER: "calls stamped with the caller's tenant (auth on)",
    SHARES: "queue shares",
    LEASED_TOTAL: "the deliveries counter",
    PACKED_JOBS: "snapshots with jobs in the compact form",
    LIFECYCLE: "job records, job actions, queue controls, expiry and schedules",
}

_V1 = {
    "AckRequest": "leases queue",
    "Command": "ack create_queue delete_dead delete_queue enqueue extend lease nack purge "
    "redrive tick",
    "CreateQueueRequest": "config queue",
    "DedupRecord": "expires_at_ms job_id key",
    "DeleteDeadRequest": "job_ids queue",
    "DeleteQueueRequest": "queue",
    "EnqueueBatchRequest": "jobs queue",
    "ExtendLeaseRequest": "job_id lease_id lease_ms queue",
    "JobError": "at_ms attempt reason",
    "JobLease": "job_id lease_id",
    "JobRecord": "attempts consumer_id enqueued_at_ms errors group idempotency_key job_id "
    "lease_expires_at_ms lease_id leased_at_ms payload priority ready_at_ms state",
    "JobSpec": "delay_ms group idempotency_key not_before_ms payload priority",
    "LeaseRequest": "consumer_id lease_ms max_jobs queue wait_ms",
    "LogEntry": "commands index time_ms",
    "NackRequest": "delay_ms job_id lease_id queue reason release",
    "PurgeQueueRequest": "queue",
    "QueueConfig": "aging_interval_ms backoff_base_ms backoff_max_ms dedup_window_ms "
    "default_lease_ms delete_when_idle max_attempts max_lease_total_ms max_payload_bytes "
    "max_priority min_priority",
    "QueueSnapshot": "config counters dedup jobs name",
    "QueueStats": "acked_total dead dead_total delayed enqueued_total expired_total leased "
    "nacked_total oldest_ready_age_ms queue ready",
    "RedriveRequest": "job_ids queue",
    "Snapshot": "index next_job_id next_lease_id queues time_ms",
}

#: The fields of the first log format (entries, commands, snapshots): every
#: replica understands them.
V1_FIELDS: frozenset[str] = frozenset(
    f"pqueue.v1.{message}.{name}" for message, names in _V1.items() for name in names.split()
)


def _lifecycle_fields() -> tuple[str, ...]:
    """Every field the lifecycle feature added to the log: the new command
    kinds and every field of their messages, and the fields it added to
    messages the log already carried."""
    added = {
        "Command": "update_queue pause_queue resume_queue complete_job cancel_job requeue_job "
        "reprioritize_job put_schedule delete_schedule pause_schedule schedule_tick",
        "Tick": "lifecycle",
        "JobSpec": "expires_at_ms",
        "JobLease": "result",
        "JobRecord": "finished_at_ms result reason expires_at_ms",
        "QueueSnapshot": "paused dispatch_tokens dispatch_at_ms schedules",
        "QueueStats": "completed cancelled paused completed_total cancelled_total "
        "ttl_expired_total",
        "QueueConfig": "max_result_bytes completed_retention_ms completed_max "
        "max_dispatch_per_s max_inflight job_ttl_ms dead_retention_ms",
    }
    names = [f"pqueue.v1.{m}.{f}" for m, fs in added.items() for f in fs.split()]
    for message in (
        "UpdateQueueRequest",
        "PauseQueueRequest",
        "ResumeQueueRequest",
        "CompleteJobRequest",
        "CancelJobRequest",
        "RequeueJobRequest",
        "ReprioritizeJobRequest",
        "PutScheduleRequest",
        "DeleteScheduleRequest",
        "PauseScheduleRequest",
        "ScheduleTick",
        "Schedule",
    ):
        desc = (
            logpb.DESCRIPTOR.message_types_by_name.get(message)
            or pb.DESCRIPTOR.message_types_by_name[message]
        )
        names += [f.full_name for f in desc.fields]
    return tuple(names)


_LIFECYCLE_FIELDS = _lifecycle_fields()

#: Each field added since v1 -> the feature a replica needs to apply it.
FIELD_FEATURES: dict[str, str] = {
    "pqueue.v1.Command.limits": TENANT_LIMITS,
    "pqueue.v1.TenantLimits.max_queue_depth": TENANT_LIMITS,
    "pqueue.v1.TenantLimits.max_inflight_leases": TENANT_LIMITS,
    "pqueue.v1.TenantLimits.max_payload_bytes": TENANT_LIMITS,
    "pqueue.v1.TenantLimits.max_queues": TENANT_LIMITS,
    "pqueue.v1.Command.caller": CALLER,
    "pqueue.v1.Caller.tenant": CALLER,
    "pqueue.v1.Caller.admin": CALLER,
    "pqueue.v1.JobRecord.tenant": CALLER,
    "pqueue.v1.DedupRecord.tenant": CALLER,
    "pqueue.v1.QueueConfig.shares": SHARES,
    "pqueue.v1.TenantShare.tenant": SHARES,
    "pqueue.v1.TenantShare.weight": SHARES,
    "pqueue.v1.QueueSnapshot.vclock": SHARES,
    "pqueue.v1.QueueSnapshot.lanes": SHARES,
    "pqueue.v1.LaneRecord.tenant": SHARES,
    "pqueue.v1.LaneRecord.vtime": SHARES,
    "pqueue.v1.QueueStats.leased_total": LEASED_TOTAL,
    "pqueue.v1.Snapshot.packed": PACKED_JOBS,
    "pqueue.v1.PackedJobs.queue": PACKED_JOBS,
    "pqueue.v1.PackedJobs.records": PACKED_JOBS,
    **{name: LIFECYCLE for name in _LIFECYCLE_FIELDS},
}

#: Fields added since v1 that an older replica may ignore without diverging.
IGNORABLE_FIELDS: frozenset[str] = frozenset(
    {
        # Read by replicas that check features; one that predates them applies
        # only what it understands anyway (the leader gated on its announcement).
        "pqueue.v1.LogEntry.required_features",
        "pqueue.v1.Snapshot.required_features",
    }
)

_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")
#: An announcement is cut at this many names (a header is untrusted input).
MAX_ANNOUNCED = 256


def lacking(
    needed: Collection[str], members: Iterable[int], announced: dict[int, frozenset[str]]
) -> tuple[str, tuple[int, ...]] | None:
    """The first needed feature some members lack, and those members; None
    if every member supports everything needed. ``announced`` holds each
    member's announcement (this node's own set included); a member missing
    from it is taken to support ``LEGACY`` only."""
    members = sorted(members)
    for feature in sorted(needed):
        nodes = tuple(n for n in members if feature not in announced.get(n, LEGACY))
        if nodes:
            return feature, nodes
    return None


def unavailable(feature: str, nodes: tuple[int, ...], announced: dict[int, frozenset[str]]) -> str:
    """Why the leader refuses a call needing ``feature`` (an operator reads it)."""
    who = "; ".join(
        f"node {n} has "
        + (f"not announced {feature!r}" if n in announced else "not been heard from")
        for n in nodes
    )
    use = USES.get(feature, f"feature {feature!r}")
    return (
        f"{use} need(s) every node on a release that supports {feature!r}; {who}. "
        "Finish the rolling upgrade (every node on the new release), then retry"
    )


def announce(supported: Collection[str]) -> str:
    """The header value that announces ``supported``."""
    return ",".join(sorted(supported))


def parse_announcement(value: str | None) -> frozenset[str]:
    """The features a peer's header announces; no header: ``LEGACY``.

    Names that are not feature names are ignored (a newer peer may know
    features this release has no name for; they matter to nobody here).
    """
    if value is None:
        return LEGACY
    names = value.split(",", MAX_ANNOUNCED)[:MAX_ANNOUNCED]
    return frozenset(n for n in (s.strip() for s in names) if _NAME.fullmatch(n))


# Per message type: its gated fields (-> their feature), the message fields
# worth descending into (those whose type can reach a gated field), and every
# feature a message of the type can need at any depth. Built once per type,
# keyed by the descriptors themselves (one object per type and field: no name
# is made per call).
class _Plan(NamedTuple):
    gated: dict[FieldDescriptor, str]
    descend: dict[FieldDescriptor, _Plan]
    reach: frozenset[str]


_plans: dict[Descriptor, _Plan] = {}
_NOTHING = _Plan({}, {}, frozenset())


def _plan(desc: Descriptor) -> _Plan:
    plan = _plans.get(desc)
    if plan is None:
        _plans[desc] = _NOTHING  # a cycle ends here
        gated = {
            f: FIELD_FEATURES[f.full_name] for f in desc.fields if f.full_name in FIELD_FEATURES
        }
        inner = {f: _plan(f.message_type) for f in desc.fields if f.message_type is not None}
        descend = {f: p for f, p in inner.items() if p.reach}
        reach = frozenset(gated.values()).union(*(p.reach for p in inner.values()))
        plan = _plans[desc] = _Plan(gated, descend, reach)
    return plan


def required(message: Message, known: AbstractSet[str] = frozenset()) -> set[str]:
    """The features a replica needs to apply ``message`` (a command or
    entry), less those in ``known``."""
    out: set[str] = set()
    _collect(message, _plan(cast(Descriptor, message.DESCRIPTOR)), out, known)
    return out


def _collect(message: Message, plan: _Plan, out: set[str], known: AbstractSet[str]) -> None:
    if plan.reach <= known:
        return  # nothing it could hold needs a feature not known already
    gated, descend = plan.gated, plan.descend
    for field, value in message.ListFields():
        feature = gated.get(field)
        if feature is not None and feature not in known:
            out.add(feature)
        inner = descend.get(field)
        if inner is not None and not inner.reach <= known:
            for item in value if field.is_repeated else (value,):
                _collect(item, inner, out, known)


def required_by(
    commands: Iterable[logpb.Command], known: AbstractSet[str] = frozenset()
) -> list[str]:
    """What an entry holding ``commands`` needs, sorted (the leader stamps
    it), less the features in ``known``: those the log already needs before
    the entry (rule 3 holds without them: a replica lacking one stopped at
    an earlier entry, or refused the snapshot holding it, and never reaches
    this one)."""
    out: set[str] = set()
    plan = _plan(logpb.Command.DESCRIPTOR)
    for command in commands:
        _collect(command, plan, out, known)
    return sorted(out)


def _dropped(message: Message) -> bool:
    """Drop ``message``'s unknown fields, at any depth; whether it had any."""
    size = message.ByteSize()
    message.DiscardUnknownFields()
    return message.ByteSize() != size


def check_entry(entry: logpb.LogEntry, supported: Collection[str]) -> int:
    """Raise ``UpgradeRequiredError`` if this release cannot apply ``entry``;
    else the number of its commands whose request carried a client's unknown
    fields (dropped here).

    It cannot when the entry needs a feature outside ``supported``, or holds
    a kind of command or a field the *writer* put there that this release
    does not know (a newer writer's, whose meaning applying the rest would
    silently drop): on the entry, on a command, or on what a leader stamps
    on it (``limits``, ``caller``).

    Unknown fields *inside a command's request* are a client's: releases
    before admission refused them stored them as sent (a newer client's
    field, or the issue's padding attack), and every replica applied those
    commands without them. They are dropped, as every replica did, and the
    entry applies: refusing it would stop every upgraded node at a command
    the old ones applied long ago, on every restart, for good. A newer
    writer's own fields in a request are never left to this: each is in
    ``FIELD_FEATURES``, so the first entry that needs its feature names it
    (the check above), and a replica lacking it stops there.
    """
    missing = sorted(set(entry.required_features) - set(supported))
    if missing:
        raise UpgradeRequiredError(
            entry.index,
            missing,
            f"log entry {entry.index} needs feature(s) {', '.join(map(repr, missing))}, "
            "which this node's release does not support",
        )
    kinds = [i for i, cmd in enumerate(entry.commands) if cmd.WhichOneof("kind") is None]
    if kinds:
        raise UpgradeRequiredError(
            entry.index,
            ["unknown"],
            f"log entry {entry.index} holds command(s) {kinds} of a kind this node's "
            "release does not know",
        )
    # The common case at C speed: nothing unknown anywhere in the entry (one
    # encoding before, one after dropping). Else, from the bytes as they
    # came: which commands' requests held a client's fields, and whether
    # anything else did (the entry keeps everything dropped, either way).
    data = entry.SerializeToString()
    entry.DiscardUnknownFields()
    if entry.ByteSize() == len(data):
        return 0
    original = logpb.LogEntry.FromString(data)
    clients = 0
    for cmd in original.commands:
        kind = cmd.WhichOneof("kind")
        assert kind is not None
        clients += _dropped(getattr(cmd, kind))
    if _dropped(original):
        raise UpgradeRequiredError(
            entry.index,
            ["unknown"],
            f"log entry {entry.index} holds fields this node's release does not know",
        )
    return clients


def check_restored(index: int, needed: Collection[str], supported: Collection[str]) -> None:
    """Raise ``UpgradeRequiredError`` if a snapshot's state needs a feature
    outside ``supported`` (its entries used one this release cannot apply)."""
    missing = sorted(set(needed) - set(supported))
    if missing:
        raise UpgradeRequiredError(
            index,
            missing,
            f"the snapshot at entry {index} needs feature(s) "
            f"{', '.join(map(repr, missing))}, which this node's release does not support",
        )


def check_snapshot(snapshot: Message) -> None:
    """Raise ``UpgradeRequiredError`` if a snapshot holds fields this release
    does not know (written by a newer release: restoring it would drop them).

    A queue's ``config`` is the client's ``CreateQueue`` config as it was
    sent, and releases before admission kept a client's unknown fields in it
    (every replica ignored them): those are dropped, not refused."""
    for queue in getattr(snapshot, "queues", ()):
        _dropped(queue.config)
    if _dropped(snapshot):
        index = getattr(snapshot, "index", 0)
        raise UpgradeRequiredError(
            index, ["unknown"], f"the snapshot at {index} holds fields this release does not know"
        )
