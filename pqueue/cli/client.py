"""``pq`` client commands: enqueue, lease, ack, nack, extend, job, jobs,
stats, queues, queue (create, show, update, pause, resume, delete, purge),
dead, schedule, watch, cluster status. They import the SDK only."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from pqueue.cli import render
from pqueue.cli.args import (
    INT32,
    UINT32,
    Outcome,
    count_arg,
    id_arg,
    int_in,
    ms_arg,
)
from pqueue.cli.failure import UsageError, exit_code, failure_line
from pqueue.client import DEFAULT_ENDPOINT, Client
from pqueue.errors import PQueueError
from pqueue.v1 import queue_pb2 as pb
from pqueue.wire.logs import describe
from pqueue.wire.tls import Tls

LEASE_COLUMNS = ("job_id", "lease_id", "priority", "attempt", "group", "payload")
JOB_COLUMNS = ("job_id", "state", "priority", "attempts", "group", "payload", "errors")


def prepare_enqueue(a: argparse.Namespace) -> None:
    """Read ``pq enqueue``'s input (stdin, ``--file``) before the event loop
    runs, so Ctrl-C while it waits for input stops at once; the jobs of
    ``--file`` are checked here, before anything is sent."""
    if a.file is not None:
        if a.payload is not None:
            raise UsageError("--file", "give PAYLOAD or --file, not both")
        if a.idempotency_key:
            raise UsageError(
                "--idempotency-key",
                "one key for every line of --file would make each job after the first "
                'a duplicate; give each line its own "idempotency_key"',
            )
        from pqueue.cli.produce import load_specs

        a.specs = load_specs(a.file, spec_options(a))
        return
    if a.payload is None:
        raise UsageError("PAYLOAD", "give the payload ('-' reads stdin), or --file")
    a.payload_bytes = sys.stdin.buffer.read() if a.payload == "-" else a.payload.encode()


async def cmd_enqueue(c: Client, a: argparse.Namespace) -> tuple[Any, Sequence[str] | None]:
    if a.file is not None:
        from pqueue.cli.produce import enqueue_file

        return await enqueue_file(c, a)
    r = await c.enqueue(a.queue, a.payload_bytes, **spec_options(a))
    return {"job_id": r.job_id, "duplicate": r.duplicate}, None


def spec_options(a: argparse.Namespace) -> dict[str, Any]:
    """``pq enqueue``'s job flags as ``job_spec`` keyword arguments."""
    if a.ttl_ms is not None and a.ttl_ms <= 0:
        raise UsageError("--ttl-ms", "must be positive")
    expiries = [a.expires_at or 0, a.ttl_ms and int(time.time() * 1000) + a.ttl_ms]
    return {
        "priority": a.priority,
        "delay_ms": a.delay_ms,
        "not_before_ms": a.not_before or 0,
        "idempotency_key": a.idempotency_key,
        "group": a.group,
        "expires_at_ms": min((t for t in expiries if t), default=0),
    }


async def cmd_lease(c: Client, a: argparse.Namespace) -> tuple[Any, Sequence[str] | None]:
    jobs = await c.lease(
        a.queue, max_jobs=a.max, lease_ms=a.lease_ms, wait_ms=a.wait_ms, consumer_id=a.consumer_id
    )
    return [render.leased_job_row(j) for j in jobs], LEASE_COLUMNS


def lease_pairs(words: Sequence[str]) -> list[tuple[int, int]]:
    """``JOB_ID LEASE_ID`` (one job), or ``JOB_ID:LEASE_ID ...`` (any number)."""
    if len(words) == 2 and not any(":" in w for w in words):
        return [(_id(words[0], "JOB_ID"), _id(words[1], "LEASE_ID"))]
    pairs = []
    for word in words:
        job, sep, lease = word.partition(":")
        if not sep:
            raise UsageError("JOB_ID:LEASE_ID", f"{word!r}: expected JOB_ID:LEASE_ID")
        pairs.append((_id(job, "JOB_ID"), _id(lease, "LEASE_ID")))
    return pairs


def _id(text: str, name: str) -> int:
    try:
        return id_arg(text)
    except argparse.ArgumentTypeError as exc:
        raise UsageError(name, str(exc)) from None


async def cmd_ack(c: Client, a: argparse.Namespace) -> tuple[Any, Sequence[str] | None]:
    leases = lease_pairs(a.leases)
    result = _text_or_stdin(a.result)
    if len(leases) == 1:
        [(job_id, lease_id)] = leases
        await c.ack(a.queue, job_id, lease_id, result=result)
        return {"job_id": job_id, "acked": True}, None
    # Several: all or none (one stale lease refuses the call, ABORTED).
    await c.ack_many(a.queue, [(job_id, lease_id, result) for job_id, lease_id in leases])
    return [{"job_id": job_id, "acked": True} for job_id, _ in leases], ("job_id", "acked")


def _text_or_stdin(value: str) -> bytes:
    """A result given on the command line ('-': read stdin)."""
    return sys.stdin.buffer.read() if value == "-" else value.encode()


async def cmd_nack(c: Client, a: argparse.Namespace) -> tuple[Any, Sequence[str] | None]:
    r = await c.nack(
        a.queue, a.job_id, a.lease_id, delay_ms=a.delay_ms, reason=a.reason, release=a.release
    )
    row = {
        "job_id": a.job_id,
        "state": render.state_name(r.state),
        "ready_at_ms": r.ready_at_ms,
        "attempts": r.attempts,
    }
    return row, None


async def cmd_extend(c: Client, a: argparse.Namespace) -> tuple[Any, Sequence[str] | None]:
    r = await c.extend(a.queue, a.job_id, a.lease_id, a.lease_ms)
    return {
        "job_id": a.job_id,
        "lease_expires_at_ms": r.lease_expires_at_ms,
        "capped": r.capped,
    }, None


#: ``pq job ACTION QUEUE JOB_ID``: the actions, and the options each takes.
JOB_ACTIONS = {
    "show": (),
    "complete": ("note", "result"),
    "cancel": ("note",),
    "requeue": ("delay_ms",),
    "reprioritize": ("priority", "ready_at_ms"),
}


async def cmd_job(c: Client, a: argparse.Namespace) -> tuple[Any, Sequence[str] | None]:
    action, queue, job_id = _job_words(a.words)
    given = [
        o
        for o in ("note", "result", "delay_ms", "priority", "ready_at_ms")
        if getattr(a, o) is not None
    ]
    stray = [o for o in given if o not in JOB_ACTIONS[action]]
    if stray:
        flag = "--" + stray[0].replace("_", "-")
        raise UsageError(flag, f"does not go with `pq job {action}`")
    if action == "show":
        job = await c.get_job(queue, job_id)
    elif action == "complete":
        job = await c.complete_job(
            queue, job_id, note=a.note or "", result=_text_or_stdin(a.result or "")
        )
    elif action == "cancel":
        job = await c.cancel_job(queue, job_id, note=a.note or "")
    elif action == "requeue":
        job = await c.requeue_job(queue, job_id, delay_ms=a.delay_ms or 0)
    else:
        if a.priority is None and a.ready_at_ms is None:
            raise UsageError("pq job reprioritize", "give --priority, --ready-at-ms or both")
        job = await c.reprioritize_job(
            queue, job_id, priority=a.priority, ready_at_ms=a.ready_at_ms
        )
    row = render.job_row(job)
    return row, render.job_columns(row)


def _job_words(words: Sequence[str]) -> tuple[str, str, int]:
    """(action, queue, job id) from ``[ACTION] QUEUE JOB_ID``."""
    if len(words) == 3 and words[0] in JOB_ACTIONS:
        action, queue, job_id = words
    elif len(words) == 2:
        action, (queue, job_id) = "show", words
    else:
        raise UsageError(
            "pq job", "usage: pq job [show|complete|cancel|requeue|reprioritize] QUEUE JOB_ID"
        )
    try:
        return action, queue, id_arg(job_id)
    except argparse.ArgumentTypeError as exc:
        raise UsageError("JOB_ID", str(exc)) from None


#: ``pq jobs list`` columns by state: what tells one job from the next there.
_WAITING = ("job_id", "priority", "ready_at_ms", "attempts", "group", "tenant", "payload")
LIST_COLUMNS = {
    "ready": _WAITING,
    "delayed": _WAITING,
    "leased": (
        "job_id",
        "priority",
        "lease_expires_at_ms",
        "attempts",
        "consumer_id",
        "group",
        "payload",
    ),
    "dead": ("job_id", "priority", "finished_at_ms", "attempts", "reason", "errors", "payload"),
    "completed": ("job_id", "priority", "finished_at_ms", "attempts", "result", "payload"),
    "cancelled": ("job_id", "priority", "finished_at_ms", "attempts", "reason", "payload"),
}


async def cmd_jobs_list(c: Client, a: argparse.Namespace) -> tuple[Any, Sequence[str] | None]:
    filters: dict[str, Any] = {
        "min_priority": a.min_priority,
        "max_priority": a.max_priority,
        "group": a.group,
        "tenant": a.tenant,
    }
    token = ""
    if a.all:
        jobs = [j async for j in c.iter_jobs(a.queue, a.state, page_size=a.limit, **filters)]
    else:
        page = await c.list_jobs(
            a.queue, a.state, page_token=a.page_token, limit=a.limit, **filters
        )
        jobs, token = list(page.jobs), page.next_page_token
    rows = [render.job_row(j) for j in jobs]
    if a.output == "json":
        return {"jobs": rows, "next_page_token": token}, None
    if token:
        print(f"more: --page-token {token}", file=sys.stderr)
    return rows, LIST_COLUMNS[a.state]


def state_arg(text: str) -> str:
    """A job state's name, for ``pq jobs list --state``."""
    name = text.strip().lower().removeprefix("job_state_")
    if name not in LIST_COLUMNS:
        raise argparse.ArgumentTypeError(f"{text!r}: one of {', '.join(LIST_COLUMNS)}")
    return name


#: ``pq stats``: what a glance needs (``-o json`` has every field).
STATS_COLUMNS = (
    "queue",
    "ready",
    "delayed",
    "leased",
    "dead",
    "completed",
    "cancelled",
    "paused",
    "oldest_ready_age_ms",
)


async def cmd_stats(c: Client, a: argparse.Namespace) -> tuple[Any, Sequence[str] | None]:
    rows = [render.stats_row(s) for s in await c.stats(a.queue or "")]
    return rows, STATS_COLUMNS


async def cmd_queues(c: Client, a: argparse.Namespace) -> tuple[Any, Sequence[str] | None]:
    rows = []
    for q in await c.list_queues():
        row = render.stats_row(q.stats)
        row["max_attempts"] = q.config.max_attempts
        row["aging_interval_ms"] = q.config.aging_interval_ms
        row["shares"] = ",".join(f"{s.tenant}={s.weight}" for s in q.config.shares)
        rows.append(row)
    return rows, (
        "queue",
        "ready",
        "delayed",
        "leased",
        "dead",
        "completed",
        "paused",
        "max_attempts",
        "aging_interval_ms",
        "shares",
    )


def share_arg(text: str) -> pb.TenantShare:
    """``TENANT`` or ``TENANT=WEIGHT``, for ``pq queue create --share``."""
    tenant, eq, weight = text.partition("=")
    try:
        return pb.TenantShare(tenant=tenant, weight=int(weight) if eq else 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not TENANT or TENANT=WEIGHT") from None


async def cmd_queue_create(c: Client, a: argparse.Namespace) -> tuple[Any, Sequence[str] | None]:
    config = pb.QueueConfig(shares=a.share, delete_when_idle=bool(a.delete_when_idle))
    for _, name, _, _ in UPDATE_FLAGS:
        value = getattr(a, name)
        if value is not None and value != CLEAR:
            setattr(config, name, value)
    r = await c.create_queue(a.queue, config)
    return {"queue": a.queue, "created": r.created}, None


async def cmd_queue_delete(c: Client, a: argparse.Namespace) -> tuple[Any, Sequence[str] | None]:
    return {"queue": a.queue, "deleted_jobs": await c.delete_queue(a.queue)}, None


async def cmd_queue_purge(c: Client, a: argparse.Namespace) -> tuple[Any, Sequence[str] | None]:
    return {"queue": a.queue, "purged": await c.purge(a.queue)}, None


#: What ``--min-priority`` and friends take to leave the optional field unset.
CLEAR = "none"


def int_or_clear(low: int, high: int) -> Callable[[str], int | str]:
    """An argparse type: an integer from ``low`` to ``high``, or ``none``
    (leave the optional field unset: its default)."""
    number = int_in(low, high)

    def parse(text: str) -> int | str:
        return CLEAR if text.lower() == CLEAR else number(text)

    return parse


#: ``pq queue create`` and ``update`` flags: (flag names, QueueConfig field,
#: type, help). ``update`` sends only the flags given (its update mask).
UPDATE_FLAGS: tuple[tuple[tuple[str, ...], str, Any, str], ...] = (
    (("--max-attempts",), "max_attempts", count_arg, "deliveries before a job is dead"),
    (("--lease-ms", "--default-lease-ms"), "default_lease_ms", ms_arg, "a lease's length"),
    (
        ("--max-lease-total-ms",),
        "max_lease_total_ms",
        ms_arg,
        "cap on a lease through all its extensions",
    ),
    (("--backoff-base-ms",), "backoff_base_ms", ms_arg, "a nack's retry delay, doubled per try"),
    (("--backoff-max-ms",), "backoff_max_ms", ms_arg, "the longest retry delay"),
    (("--aging-interval-ms",), "aging_interval_ms", ms_arg, "0: strict priority"),
    (("--max-payload-bytes",), "max_payload_bytes", count_arg, "largest payload"),
    (("--dedup-window-ms",), "dedup_window_ms", ms_arg, "how long idempotency keys last"),
    (
        ("--min-priority",),
        "min_priority",
        int_or_clear(*INT32),
        "lowest priority allowed (none: any)",
    ),
    (
        ("--max-priority",),
        "max_priority",
        int_or_clear(*INT32),
        "highest priority allowed (none: any)",
    ),
    (("--max-result-bytes",), "max_result_bytes", count_arg, "largest ack result"),
    (
        ("--completed-retention-ms",),
        "completed_retention_ms",
        ms_arg,
        "how long completed records stay",
    ),
    (
        ("--completed-max",),
        "completed_max",
        int_or_clear(*UINT32),
        "completed records kept (0: none)",
    ),
    (("--max-dispatch-per-s",), "max_dispatch_per_s", float, "leases per second (0: no limit)"),
    (("--max-inflight",), "max_inflight", count_arg, "jobs leased at once (0: no limit)"),
    (("--job-ttl-ms",), "job_ttl_ms", ms_arg, "unleased jobs expire after this (0: never)"),
    (("--dead-retention-ms",), "dead_retention_ms", ms_arg, "dead jobs deleted after (0: kept)"),
)


async def cmd_queue_show(c: Client, a: argparse.Namespace) -> tuple[Any, Sequence[str] | None]:
    info = await c.get_queue(a.queue)
    config = render.fields_of(info.config)
    stats = render.fields_of(info.stats)
    del stats["queue"]
    if a.output == "json":
        return {"queue": info.queue, "config": config, "stats": stats}, None
    rows = {"queue": info.queue, "paused": stats.pop("paused"), **stats, **config}
    return render.field_rows(rows), ("field", "value")


async def cmd_queue_update(c: Client, a: argparse.Namespace) -> tuple[Any, Sequence[str] | None]:
    fields: dict[str, Any] = {}
    for _, name, _, _ in UPDATE_FLAGS:
        value = getattr(a, name)
        if value is not None:
            fields[name] = None if value == CLEAR else value
    if a.delete_when_idle is not None:
        fields["delete_when_idle"] = a.delete_when_idle
    if a.share and a.no_shares:
        raise UsageError("--share", "--share and --no-shares contradict each other")
    if a.share or a.no_shares:
        fields["shares"] = a.share
    if not fields:
        raise UsageError(
            "pq queue update", "nothing to update: give at least one flag (see pq queue update -h)"
        )
    r = await c.update_queue(a.queue, **fields)
    config = render.fields_of(r.config)
    if a.output == "json":
        return {"queue": a.queue, "updated": sorted(fields), "config": config}, None
    return render.field_rows({"queue": a.queue, **config}), ("field", "value")


async def cmd_queue_pause(c: Client, a: argparse.Namespace) -> tuple[Any, Sequence[str] | None]:
    return {"queue": a.queue, "paused": True, "changed": await c.pause_queue(a.queue)}, None


async def cmd_queue_resume(c: Client, a: argparse.Namespace) -> tuple[Any, Sequence[str] | None]:
    return {"queue": a.queue, "paused": False, "changed": await c.resume_queue(a.queue)}, None


async def cmd_dead_list(c: Client, a: argparse.Namespace) -> tuple[Any, Sequence[str] | None]:
    r = await c.list_dead(a.queue, limit=a.limit, after_job_id=a.after)
    return [render.job_row(j) for j in r.jobs], JOB_COLUMNS


async def cmd_dead_redrive(c: Client, a: argparse.Namespace) -> tuple[Any, Sequence[str] | None]:
    return {"queue": a.queue, "redriven": await c.redrive(a.queue, a.job_ids)}, None


async def cmd_dead_delete(c: Client, a: argparse.Namespace) -> tuple[Any, Sequence[str] | None]:
    return {"queue": a.queue, "deleted": await c.delete_dead(a.queue, a.job_ids)}, None


SCHEDULE_COLUMNS = ("queue", "name", "cron", "timezone", "missed", "paused", "next_tick")


def _schedule_out(s: pb.Schedule, a: argparse.Namespace) -> dict[str, Any]:
    """Times as ISO-8601 in a table, epoch ms (and ``_ms`` names) in JSON."""
    row = render.schedule_row(s, iso=a.output != "json")
    if a.output == "json":
        for key in ("last_tick", "next_tick", "created_at"):
            row[f"{key}_ms"] = row.pop(key)
    return row


async def cmd_schedule_add(c: Client, a: argparse.Namespace) -> Outcome:
    payload = sys.stdin.buffer.read() if a.payload == "-" else a.payload.encode()
    r = await c.put_schedule(
        a.queue,
        a.name,
        a.cron,
        payload,
        priority=a.priority,
        group=a.group,
        timezone=a.timezone,
        missed=a.missed,
        paused=a.paused,
    )
    return {"created": r.created, **_schedule_out(r.schedule, a)}, ("created", *SCHEDULE_COLUMNS)


async def cmd_schedule_list(c: Client, a: argparse.Namespace) -> Outcome:
    rows = [_schedule_out(s, a) for s in await c.list_schedules(a.queue or "")]
    return rows, (*SCHEDULE_COLUMNS, "last_tick", "priority", "payload")


async def cmd_schedule_remove(c: Client, a: argparse.Namespace) -> Outcome:
    await c.delete_schedule(a.queue, a.name)
    return {"queue": a.queue, "name": a.name, "deleted": True}, None


async def cmd_schedule_pause(c: Client, a: argparse.Namespace) -> Outcome:
    s = await c.pause_schedule(a.queue, a.name)
    return _schedule_out(s, a), SCHEDULE_COLUMNS


async def cmd_schedule_resume(c: Client, a: argparse.Namespace) -> Outcome:
    s = await c.resume_schedule(a.queue, a.name)
    return _schedule_out(s, a), SCHEDULE_COLUMNS


def watch_row(event: pb.WatchEvent) -> dict[str, Any]:
    """One watch event as a flat row (``pq watch``)."""
    row: dict[str, Any] = {
        "log_index": event.log_index,
        "time": render.iso_ms(event.time_ms),
        "queue": event.queue,
        "kind": pb.WatchEvent.Kind.Name(event.kind).lower(),
    }
    if event.job_id:
        row.update(
            job_id=event.job_id,
            state=render.state_name(event.state),
            attempt=event.attempt,
            priority=event.priority,
        )
    if event.kind == pb.WatchEvent.COMPLETED:
        row["result_bytes"] = event.result_bytes
    if event.reason:
        row["reason"] = event.reason
    if event.HasField("stats"):
        row["stats"] = render.stats_row(event.stats)
    return row


def watch_line(row: dict[str, Any]) -> str:
    """A row as one line for people: time, index, queue, kind, then the rest."""
    head = f"{row['time']}  #{row['log_index']}  {row['queue']}  {row['kind'].upper()}"
    stats = row.get("stats")
    if stats is not None:
        keys = ("ready", "delayed", "leased", "dead", "completed")
        return head + "  " + " ".join(f"{k}={stats.get(k, 0)}" for k in keys)
    rest = " ".join(
        f"{k}={v}" for k, v in row.items() if k not in ("time", "log_index", "queue", "kind")
    )
    return f"{head}  {rest}".rstrip()


async def cmd_watch(c: Client, a: argparse.Namespace) -> Outcome:
    queues, job_id = list(a.queues), 0
    if a.job is not None:
        queues.append(a.job[0])
        try:
            job_id = int(a.job[1])
        except ValueError:
            raise UsageError("--job QUEUE ID", f"{a.job[1]!r} is not a job id") from None
    if bool(queues) == a.all:
        raise UsageError("pq watch", "name queues, or --all, or --job QUEUE ID")
    events = c.watch(
        queues,
        all_queues=a.all,
        job_id=job_id,
        from_index=a.from_index,
        stats_interval_ms=int(a.stats_s * 1000),
    )
    async for event in events:
        row = watch_row(event)
        line = json.dumps(row) if a.output == "json" else watch_line(row)
        print(line, flush=True)
    return None, None


async def cmd_cluster_status(c: Client, a: argparse.Namespace) -> Outcome:
    from pqueue.cli.devcluster import cluster_status  # psutil: only when asked

    rows = await cluster_status(c.endpoint, a.timeout_s, **client_options(a))  # --token, TLS
    return rows, ("node", "address", "role", "ballot", "leader", "commit", "applied", "lag")


async def cmd_stop_node(c: Client, a: argparse.Namespace) -> Outcome:
    from pqueue.cli.devcluster import stop_node

    return {"node": f"n{a.node}", "result": stop_node(a.dir, a.node)}, None


async def cmd_start_node(c: Client, a: argparse.Namespace) -> Outcome:
    from pqueue.cli.devcluster import start_node

    return {"node": f"n{a.node}", "result": start_node(a.dir, a.node)}, None


def client_options(args: argparse.Namespace) -> dict[str, Any]:
    """``Client`` keyword arguments from the global options (token, TLS)."""
    token = args.token
    if args.token_file is not None:
        try:
            token = args.token_file.read_text().strip()
        except OSError as exc:
            raise UsageError("--token-file", describe(exc)) from None
    tls = None
    if args.tls_ca is not None or args.tls_cert is not None:
        try:
            tls = Tls.from_files(args.tls_cert, args.tls_key, args.tls_ca)
        except OSError as exc:
            raise UsageError("--tls-ca/--tls-cert/--tls-key", describe(exc)) from None
    return {"token": token or None, "tls": tls}


async def run_client(args: argparse.Namespace) -> int:
    """Run a client command: its output on stdout, or one ``error:`` line on stderr."""
    try:
        options = client_options(args)
        # One command, a call or a few: a second channel, to the leader a
        # balancer names (look-aside), would cost more than it saves.
        async with Client(
            args.endpoint, timeout_s=args.timeout_s, look_aside=False, **options
        ) as client:
            data, columns = await args.func(client, args)
    except Exception as exc:  # one line, even for a bug (PQ_DEBUG=1: its traceback)
        if os.environ.get("PQ_DEBUG") and not isinstance(exc, PQueueError | ValueError):
            traceback.print_exc()
        line = failure_line(exc, args.endpoint, DEFAULT_ENDPOINT)
        print(line, file=sys.stderr)
        return exit_code(exc)
    if data is not None:  # None: the command printed as it went (pq watch)
        print(render.emit(data, args.output, columns))
    return 0
