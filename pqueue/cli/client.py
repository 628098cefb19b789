"""``pq`` client commands: enqueue, lease, ack, nack, extend, job, jobs,
stats, queues, queue, dead, cluster status. They import the SDK only."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pqueue.cli import render
from pqueue.cli.args import Outcome, adder, parse_node_id
from pqueue.client import Client
from pqueue.errors import PQueueError, RemoteError
from pqueue.v1 import queue_pb2 as pb
from pqueue.wire.logs import describe
from pqueue.wire.status import code_of
from pqueue.wire.tls import Tls

LEASE_COLUMNS = ("job_id", "lease_id", "priority", "attempt", "group", "payload")
JOB_COLUMNS = ("job_id", "state", "priority", "attempts", "group", "payload", "errors")


async def cmd_enqueue(c: Client, a: argparse.Namespace) -> tuple[Any, Sequence[str] | None]:
    payload = sys.stdin.buffer.read() if a.payload == "-" else a.payload.encode()
    r = await c.enqueue(
        a.queue,
        payload,
        priority=a.priority,
        delay_ms=a.delay_ms,
        idempotency_key=a.idempotency_key,
        group=a.group,
    )
    return {"job_id": r.job_id, "duplicate": r.duplicate}, None


async def cmd_lease(c: Client, a: argparse.Namespace) -> tuple[Any, Sequence[str] | None]:
    jobs = await c.lease(
        a.queue, max_jobs=a.max, lease_ms=a.lease_ms, wait_ms=a.wait_ms, consumer_id=a.consumer_id
    )
    return [render.leased_job_row(j) for j in jobs], LEASE_COLUMNS


async def cmd_ack(c: Client, a: argparse.Namespace) -> tuple[Any, Sequence[str] | None]:
    await c.ack(a.queue, a.job_id, a.lease_id)
    return {"job_id": a.job_id, "acked": True}, None


async def cmd_nack(c: Client, a: argparse.Namespace) -> tuple[Any, Sequence[str] | None]:
    r = await c.nack(a.queue, a.job_id, a.lease_id, delay_ms=a.delay_ms, reason=a.reason)
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


async def cmd_job(c: Client, a: argparse.Namespace) -> tuple[Any, Sequence[str] | None]:
    row = render.job_row(await c.get_job(a.queue, a.job_id))
    return row, render.job_columns(row)


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


async def cmd_stats(c: Client, a: argparse.Namespace) -> tuple[Any, Sequence[str] | None]:
    rows = [render.stats_row(s) for s in await c.stats(a.queue or "")]
    return rows, ("queue", "ready", "delayed", "leased", "dead", "oldest_ready_age_ms")


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
    config = pb.QueueConfig(
        max_attempts=a.max_attempts,
        default_lease_ms=a.lease_ms,
        aging_interval_ms=a.aging_interval_ms,
        dedup_window_ms=a.dedup_window_ms,
        max_payload_bytes=a.max_payload_bytes,
        shares=a.share,
    )
    if a.min_priority is not None:
        config.min_priority = a.min_priority
    if a.max_priority is not None:
        config.max_priority = a.max_priority
    r = await c.create_queue(a.queue, config)
    return {"queue": a.queue, "created": r.created}, None


async def cmd_queue_delete(c: Client, a: argparse.Namespace) -> tuple[Any, Sequence[str] | None]:
    return {"queue": a.queue, "deleted_jobs": await c.delete_queue(a.queue)}, None


async def cmd_queue_purge(c: Client, a: argparse.Namespace) -> tuple[Any, Sequence[str] | None]:
    return {"queue": a.queue, "purged": await c.purge(a.queue)}, None


async def cmd_dead_list(c: Client, a: argparse.Namespace) -> tuple[Any, Sequence[str] | None]:
    r = await c.list_dead(a.queue, limit=a.limit, after_job_id=a.after)
    return [render.job_row(j) for j in r.jobs], JOB_COLUMNS


async def cmd_dead_redrive(c: Client, a: argparse.Namespace) -> tuple[Any, Sequence[str] | None]:
    return {"queue": a.queue, "redriven": await c.redrive(a.queue, a.job_ids)}, None


async def cmd_dead_delete(c: Client, a: argparse.Namespace) -> tuple[Any, Sequence[str] | None]:
    return {"queue": a.queue, "deleted": await c.delete_dead(a.queue, a.job_ids)}, None


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
        token = args.token_file.read_text().strip()
    tls = None
    if args.tls_ca is not None or args.tls_cert is not None:
        tls = Tls.from_files(args.tls_cert, args.tls_key, args.tls_ca)
    return {"token": token or None, "tls": tls}


def register(sub: Any) -> None:
    """The client commands' subparsers."""
    add = adder(sub)

    cluster = sub.add_parser("cluster", help="cluster status; stop or start a dev-cluster node")
    csub = cluster.add_subparsers(dest="action", required=True, metavar="ACTION")
    add("status", cmd_cluster_status, "every node's role, ballot, indexes and lag", csub)
    for name, fn in (("stop-node", cmd_stop_node), ("start-node", cmd_start_node)):
        sp = add(name, fn, f"{name.split('-')[0]} node N of the `make cluster` dev cluster", csub)
        sp.add_argument("node", type=parse_node_id)
        sp.add_argument("--dir", type=Path, default=Path(".cluster"))

    sp = add("enqueue", cmd_enqueue, "enqueue a job (PAYLOAD '-' reads stdin)")
    sp.add_argument("queue")
    sp.add_argument("payload")
    sp.add_argument("--priority", type=int, default=0, help="lower is served first")
    sp.add_argument("--delay-ms", type=int, default=0)
    sp.add_argument("--idempotency-key", default="")
    sp.add_argument("--group", default="", help="ordering key: FIFO, one in flight")

    sp = add("lease", cmd_lease, "lease ready jobs")
    sp.add_argument("queue")
    sp.add_argument("--max", type=int, default=1)
    sp.add_argument("--lease-ms", type=int, default=0)
    sp.add_argument("--wait-ms", type=int, default=0, help="long poll up to this long")
    sp.add_argument("--consumer-id", default="pq-cli")

    for name, fn, text in (
        ("ack", cmd_ack, "complete a leased job"),
        ("nack", cmd_nack, "give a leased job back"),
        ("extend", cmd_extend, "extend a lease"),
    ):
        sp = add(name, fn, text)
        sp.add_argument("queue")
        sp.add_argument("job_id", type=int)
        sp.add_argument("lease_id", type=int)
        if name == "nack":
            sp.add_argument("--delay-ms", type=int, default=None, help="default: backoff")
            sp.add_argument("--reason", default="")
        if name == "extend":
            sp.add_argument("--lease-ms", type=int, default=0)

    sp = add("job", cmd_job, "show one job")
    sp.add_argument("queue")
    sp.add_argument("job_id", type=int)

    jobs = sub.add_parser("jobs", help="browse a queue's jobs")
    jsub = jobs.add_subparsers(dest="action", required=True, metavar="ACTION")
    sp = add(
        "list",
        cmd_jobs_list,
        "a queue's jobs in one state, in the order they would be served "
        "(dead, completed, cancelled: newest first), a page at a time",
        jsub,
    )
    sp.add_argument("queue")
    sp.add_argument("--state", type=state_arg, required=True, help=", ".join(LIST_COLUMNS))
    sp.add_argument("--min-priority", type=int, default=None)
    sp.add_argument("--max-priority", type=int, default=None)
    sp.add_argument("--group", default="", help="only this group's jobs")
    sp.add_argument("--tenant", default="", help="only jobs this tenant produced")
    sp.add_argument(
        "--limit", type=int, default=0, help="jobs per page (default 100, at most 1000)"
    )
    sp.add_argument("--page-token", default="", help="the page after the one that printed it")
    sp.add_argument("--all", action="store_true", help="every page")

    sp = add("stats", cmd_stats, "queue counts")
    sp.add_argument("queue", nargs="?")
    add("queues", cmd_queues, "list queues")

    queue = sub.add_parser("queue", help="create, delete or purge a queue")
    qsub = queue.add_subparsers(dest="action", required=True, metavar="ACTION")
    sp = add("create", cmd_queue_create, "create a queue", qsub)
    sp.add_argument("queue")
    sp.add_argument("--max-attempts", type=int, default=0)
    sp.add_argument("--lease-ms", type=int, default=0)
    sp.add_argument("--aging-interval-ms", type=int, default=0)
    sp.add_argument("--dedup-window-ms", type=int, default=0)
    sp.add_argument("--max-payload-bytes", type=int, default=0)
    sp.add_argument("--min-priority", type=int, default=None)
    sp.add_argument("--max-priority", type=int, default=None)
    sp.add_argument(
        "--share",
        type=share_arg,
        action="append",
        default=[],
        metavar="TENANT[=WEIGHT]",
        help="let TENANT enqueue here too, leasing by WEIGHT (default 1); repeat per tenant. "
        "List the owner to set its own weight",
    )
    add("delete", cmd_queue_delete, "delete a queue and its jobs", qsub).add_argument("queue")
    add("purge", cmd_queue_purge, "remove ready and delayed jobs", qsub).add_argument("queue")

    dead = sub.add_parser("dead", help="list, redrive or delete dead jobs")
    dsub = dead.add_subparsers(dest="action", required=True, metavar="ACTION")
    sp = add("list", cmd_dead_list, "list dead jobs", dsub)
    sp.add_argument("queue")
    sp.add_argument("--limit", type=int, default=0)
    sp.add_argument("--after", type=int, default=0, help="page after this job id")
    for name, fn, text in (
        ("redrive", cmd_dead_redrive, "make dead jobs ready again (all, or the ids given)"),
        ("delete", cmd_dead_delete, "delete dead jobs (all, or the ids given)"),
    ):
        sp = add(name, fn, text, dsub)
        sp.add_argument("queue")
        sp.add_argument("job_ids", type=int, nargs="*")


async def run_client(args: argparse.Namespace) -> int:
    try:
        options = client_options(args)
    except (OSError, ValueError) as exc:
        print(f"error: {describe(exc)}", file=sys.stderr)
        return 1
    async with Client(args.endpoint, timeout_s=args.timeout_s, **options) as client:
        try:
            data, columns = await args.func(client, args)
        except ValueError as exc:
            print(f"error: {describe(exc)}", file=sys.stderr)
            return 1
        except PQueueError as exc:
            code = exc.code if isinstance(exc, RemoteError) else code_of(exc).name
            print(f"error: {code}: {describe(exc)}", file=sys.stderr)
            return 1
    print(render.emit(data, args.output, columns))
    return 0
