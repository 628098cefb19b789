"""The client commands' parsers (``pq enqueue``, ``pq lease``, ``pq queue
create``...): every option with one line of help; the commands themselves are
in ``pqueue.cli.client``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from pqueue.cli.args import (
    adder,
    count_arg,
    id_arg,
    int_in,
    ms_arg,
    parse_node_id,
    parse_time_ms,
    priority_arg,
)
from pqueue.cli.client import (
    LIST_COLUMNS,
    UPDATE_FLAGS,
    cmd_ack,
    cmd_cluster_status,
    cmd_dead_delete,
    cmd_dead_list,
    cmd_dead_redrive,
    cmd_enqueue,
    cmd_extend,
    cmd_job,
    cmd_jobs_list,
    cmd_lease,
    cmd_nack,
    cmd_queue_create,
    cmd_queue_delete,
    cmd_queue_pause,
    cmd_queue_purge,
    cmd_queue_resume,
    cmd_queue_show,
    cmd_queue_update,
    cmd_queues,
    cmd_schedule_add,
    cmd_schedule_list,
    cmd_schedule_pause,
    cmd_schedule_remove,
    cmd_schedule_resume,
    cmd_start_node,
    cmd_stats,
    cmd_stop_node,
    cmd_watch,
    prepare_enqueue,
    share_arg,
    state_arg,
)

QUEUE = "the queue's name"

#: What ``pq queue create`` leaves to the node, by config field (its help
#: shows it). The node's own values are in ``pqueue.core.limits``, which a
#: client does not load; a unit test holds the two equal.
CREATE_DEFAULTS = {
    "max_attempts": 5,
    "default_lease_ms": 30_000,
    "max_lease_total_ms": 12 * 3600 * 1000,
    "backoff_base_ms": 1_000,
    "backoff_max_ms": 600_000,
    "max_payload_bytes": 1 << 20,
    "dedup_window_ms": 300_000,
    "max_result_bytes": 64 << 10,
    "completed_retention_ms": 3600 * 1000,
    "completed_max": 10_000,
}
#: Jobs in one EnqueueBatch call (``limits.MAX_BATCH_JOBS``).
MAX_BATCH_JOBS = 1000


def _queue(sp: argparse.ArgumentParser, optional: bool = False) -> None:
    if optional:
        sp.add_argument("queue", nargs="?", metavar="QUEUE", help="only this queue (default: all)")
    else:
        sp.add_argument("queue", metavar="QUEUE", help=QUEUE)


def _job_and_lease(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("job_id", type=id_arg, metavar="JOB_ID", help="the job's id")
    sp.add_argument(
        "lease_id", type=id_arg, metavar="LEASE_ID", help="the lease's id, as pq lease printed it"
    )


def _metavar(field: str) -> str:
    """``MS``, ``BYTES``, ``PER_S`` or ``N``: what a config flag takes."""
    for suffix, metavar in (("_ms", "MS"), ("_bytes", "BYTES"), ("_per_s", "PER_S")):
        if field.endswith(suffix):
            return metavar
    return "N"


def _config_flags(sp: argparse.ArgumentParser, create: bool) -> None:
    """The queue config flags (``--max-attempts``...); ``create`` shows the
    node's defaults, ``update`` changes only the flags given."""
    for flags, name, kind, text in UPDATE_FLAGS:
        if create and name in CREATE_DEFAULTS:
            text = f"{text} (default: {CREATE_DEFAULTS[name]})"
        sp.add_argument(
            *flags, dest=name, type=kind, default=None, metavar=_metavar(name), help=text
        )
    sp.add_argument(
        "--delete-when-idle",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="delete the queue once it holds no job" + (" (default: no)" if create else ""),
    )
    sp.add_argument(
        "--share",
        type=share_arg,
        action="append",
        default=[],
        metavar="TENANT[=WEIGHT]",
        help="let TENANT enqueue here too, leasing by WEIGHT (default 1); repeat per tenant"
        + ("" if create else "; the list given replaces the queue's"),
    )


def _cluster(sub: Any) -> None:
    add = adder(sub)
    cluster = sub.add_parser("cluster", help="cluster status; stop or start a dev-cluster node")
    csub = cluster.add_subparsers(dest="action", required=True, metavar="ACTION")
    add("status", cmd_cluster_status, "every node's role, ballot, indexes and lag", csub)
    for name, fn in (("stop-node", cmd_stop_node), ("start-node", cmd_start_node)):
        sp = add(name, fn, f"{name.split('-')[0]} node N of the `make cluster` dev cluster", csub)
        sp.add_argument("node", type=parse_node_id, metavar="N", help="the node: 1, 2... or n1")
        sp.add_argument(
            "--dir", type=Path, default=Path(".cluster"), help="the dev cluster's directory"
        )


def _produce_and_consume(sub: Any) -> None:
    add = adder(sub)
    sp = add(
        "enqueue",
        cmd_enqueue,
        "enqueue a job (PAYLOAD '-' reads stdin), or one per JSON line of --file",
    )
    _queue(sp)
    sp.add_argument("payload", nargs="?", metavar="PAYLOAD", help="the job's bytes ('-': stdin)")
    sp.add_argument("--priority", type=priority_arg, default=0, help="lower is served first")
    sp.add_argument("--delay-ms", type=ms_arg, default=0, help="ready this long after enqueue")
    sp.add_argument(
        "--not-before",
        type=parse_time_ms,
        default=None,
        metavar="TIME",
        help="not ready before TIME: ISO-8601 (2026-11-30T15:04:05Z) or Unix ms",
    )
    sp.add_argument(
        "--idempotency-key", default="", help="a repeat within the dedup window is no new job"
    )
    sp.add_argument("--group", default="", help="ordering key: FIFO, one in flight")
    sp.add_argument(
        "--expires-at",
        type=parse_time_ms,
        default=None,
        metavar="TIME",
        help="dead (reason 'expired') if not leased by TIME: ISO-8601 or Unix ms",
    )
    sp.add_argument(
        "--ttl-ms",
        type=int,
        default=None,
        help="dead (reason 'expired') if not leased within this long (from now, this clock)",
    )
    sp.add_argument(
        "--file",
        metavar="F",
        default=None,
        help="one job per JSON line of F ('-': stdin): a payload, or "
        '{"payload": ..., "priority": ...}; the flags above are the defaults',
    )
    sp.set_defaults(prepare=prepare_enqueue)
    sp.add_argument(
        "--batch-size",
        type=int_in(1, MAX_BATCH_JOBS),
        default=500,
        help="--file: jobs per EnqueueBatch call",
    )

    sp = add("lease", cmd_lease, "lease ready jobs")
    _queue(sp)
    sp.add_argument("--max", type=count_arg, default=1, help="jobs to lease, at most 1000")
    sp.add_argument(
        "--lease-ms", type=ms_arg, default=0, help="lease length (0: the queue's default)"
    )
    sp.add_argument(
        "--wait-ms", type=ms_arg, default=0, help="long poll up to this long (at most 60000)"
    )
    sp.add_argument("--consumer-id", default="pq-cli", help="recorded on the job")

    sp = add(
        "ack",
        cmd_ack,
        "complete leased jobs: JOB_ID LEASE_ID, or JOB_ID:LEASE_ID ... (several: all or none)",
    )
    _queue(sp)
    sp.add_argument(
        "leases",
        nargs="+",
        metavar="JOB_ID:LEASE_ID",
        help="the leases pq lease printed: JOB_ID LEASE_ID, or JOB_ID:LEASE_ID pairs",
    )
    sp.add_argument("--result", default="", help="kept on the COMPLETED record ('-' reads stdin)")

    sp = add("nack", cmd_nack, "give a leased job back for a retry")
    _queue(sp)
    _job_and_lease(sp)
    sp.add_argument(
        "--delay-ms", type=ms_arg, default=None, help="retry after this long (default: backoff)"
    )
    sp.add_argument("--reason", default="", help="kept in the job's error history")
    sp.add_argument(
        "--release",
        action="store_true",
        help="not an attempt: the job never goes dead for it, and no error is recorded",
    )

    sp = add("extend", cmd_extend, "extend a lease")
    _queue(sp)
    _job_and_lease(sp)
    sp.add_argument(
        "--lease-ms", type=ms_arg, default=0, help="from now on (0: the queue's default lease)"
    )


def _jobs(sub: Any) -> None:
    add = adder(sub)
    sp = add(
        "job",
        cmd_job,
        "show one job, or act on it: pq job [show|complete|cancel|requeue|reprioritize] "
        "QUEUE JOB_ID",
    )
    sp.add_argument(
        "words",
        nargs="+",
        metavar="[ACTION] QUEUE JOB_ID",
        help="show (default), complete, cancel, requeue or reprioritize",
    )
    sp.add_argument("--note", default=None, help="complete, cancel: kept as the job's reason")
    sp.add_argument("--result", default=None, help="complete: the job's result ('-': stdin)")
    sp.add_argument("--delay-ms", type=ms_arg, default=None, help="requeue: ready after this long")
    sp.add_argument(
        "--priority", type=priority_arg, default=None, help="reprioritize: the new priority"
    )
    sp.add_argument(
        "--ready-at-ms",
        type=parse_time_ms,
        default=None,
        help="reprioritize: the new ready time (Unix ms or ISO-8601)",
    )

    sp = add("watch", cmd_watch, "follow queues' events live (Ctrl-C stops)")
    sp.add_argument("queues", nargs="*", metavar="QUEUE", help="the queues to follow")
    sp.add_argument("--all", action="store_true", help="every queue you may see")
    sp.add_argument("--job", nargs=2, metavar=("QUEUE", "ID"), help="one job's events")
    sp.add_argument(
        "--from-index", type=int, default=None, help="replay events of entries after this index"
    )
    sp.add_argument(
        "--stats-s", type=float, default=0, help="each queue's counts this often (at least 1)"
    )

    jobs = sub.add_parser("jobs", help="browse a queue's jobs")
    jsub = jobs.add_subparsers(dest="action", required=True, metavar="ACTION")
    sp = add(
        "list",
        cmd_jobs_list,
        "a queue's jobs in one state, in the order they would be served "
        "(dead, completed, cancelled: newest first), a page at a time",
        jsub,
    )
    _queue(sp)
    sp.add_argument("--state", type=state_arg, required=True, help=", ".join(LIST_COLUMNS))
    sp.add_argument("--min-priority", type=priority_arg, default=None, help="only from this")
    sp.add_argument("--max-priority", type=priority_arg, default=None, help="only up to this")
    sp.add_argument("--group", default="", help="only this group's jobs")
    sp.add_argument("--tenant", default="", help="only jobs this tenant produced")
    sp.add_argument(
        "--limit", type=count_arg, default=0, help="jobs per page (default 100, at most 1000)"
    )
    sp.add_argument("--page-token", default="", help="the page after the one that printed it")
    sp.add_argument("--all", action="store_true", help="every page")

    sp = add("stats", cmd_stats, "queue counts")
    _queue(sp, optional=True)
    add("queues", cmd_queues, "list queues")


def _queues(sub: Any) -> None:
    add = adder(sub)
    queue = sub.add_parser(
        "queue", help="create, show, update, pause, resume, delete or purge a queue"
    )
    qsub = queue.add_subparsers(dest="action", required=True, metavar="ACTION")
    sp = add("create", cmd_queue_create, "create a queue (same config again: no change)", qsub)
    _queue(sp)
    _config_flags(sp, create=True)
    for name, fn, text in (
        ("delete", cmd_queue_delete, "delete a queue and its jobs"),
        ("purge", cmd_queue_purge, "remove ready and delayed jobs"),
        ("show", cmd_queue_show, "a queue's config and stats"),
    ):
        _queue(add(name, fn, text, qsub))
    sp = add("update", cmd_queue_update, "change the config fields given (only those)", qsub)
    _queue(sp)
    _config_flags(sp, create=False)
    sp.add_argument("--no-shares", action="store_true", help="share the queue with nobody")
    _queue(add("pause", cmd_queue_pause, "lease nothing (enqueues go on)", qsub))
    _queue(add("resume", cmd_queue_resume, "lease from a paused queue again", qsub))

    dead = sub.add_parser("dead", help="list, redrive or delete dead jobs")
    dsub = dead.add_subparsers(dest="action", required=True, metavar="ACTION")
    sp = add("list", cmd_dead_list, "list dead jobs", dsub)
    _queue(sp)
    sp.add_argument("--limit", type=count_arg, default=0, help="jobs at most (0: the server's)")
    sp.add_argument("--after", type=int, default=0, help="page after this job id")
    for name, fn, text in (
        ("redrive", cmd_dead_redrive, "make dead jobs ready again (all, or the ids given)"),
        ("delete", cmd_dead_delete, "delete dead jobs (all, or the ids given)"),
    ):
        sp = add(name, fn, text, dsub)
        _queue(sp)
        sp.add_argument(
            "job_ids", type=id_arg, nargs="*", metavar="JOB_ID", help="these (default: all)"
        )


def _schedules(sub: Any) -> None:
    add = adder(sub)
    schedule = sub.add_parser("schedule", help="cron schedules: add, list, remove, pause, resume")
    ssub = schedule.add_subparsers(dest="action", required=True, metavar="ACTION")
    sp = add("add", cmd_schedule_add, "create or replace a cron schedule", ssub)
    _queue(sp)
    sp.add_argument("name", metavar="NAME", help="the schedule's name in its queue")
    sp.add_argument(
        "--cron",
        required=True,
        help='"*/5 * * * *" (minute hour day month weekday), six fields with seconds first, '
        "or @hourly, @daily...",
    )
    sp.add_argument("--payload", required=True, help="each tick's job ('-' reads stdin)")
    sp.add_argument("--priority", type=priority_arg, default=0, help="lower is served first")
    sp.add_argument("--group", default="", help="ordering key: FIFO, one in flight")
    sp.add_argument("--timezone", default="", help="IANA zone the fields are read in (UTC)")
    sp.add_argument(
        "--missed",
        choices=("once", "all", "skip"),
        default="once",
        help="ticks missed during an outage: one job, one each (at most 100), or none",
    )
    sp.add_argument("--paused", action="store_true", help="create it paused")
    sp = add("list", cmd_schedule_list, "list schedules (of one queue, or all)", ssub)
    _queue(sp, optional=True)
    for name, fn, text in (
        ("remove", cmd_schedule_remove, "delete a schedule (its jobs stay)"),
        ("pause", cmd_schedule_pause, "stop a schedule's ticks"),
        ("resume", cmd_schedule_resume, "tick again from now on"),
    ):
        sp = add(name, fn, text, ssub)
        _queue(sp)
        sp.add_argument("name", metavar="NAME", help="the schedule's name")


def register(sub: Any) -> None:
    """The client commands' subparsers."""
    _cluster(sub)
    _produce_and_consume(sub)
    _jobs(sub)
    _queues(sub)
    _schedules(sub)
