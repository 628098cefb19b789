"""``pq``: run a node or a balancer, and talk to them from the shell.

The endpoint comes from ``--endpoint`` or ``PQ_ENDPOINT`` (default: the
balancer ``make cluster`` starts). Output is a table, or JSON with ``-o json``. Errors
print one line (``error: CODE: message``) to stderr and exit 1.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from pqueue import render
from pqueue.client import DEFAULT_ENDPOINT, Client
from pqueue.devcluster import cluster_status, run_dev_cluster, start_node, stop_node
from pqueue.errors import PQueueError, RemoteError
from pqueue.logs import LOG_FORMATS
from pqueue.status import code_of
from pqueue.v1 import queue_pb2 as pb

Outcome = tuple[Any, Sequence[str] | None]
Command = Callable[[Client, argparse.Namespace], Awaitable[Outcome]]

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
    return render.job_row(await c.get_job(a.queue, a.job_id)), None


async def cmd_stats(c: Client, a: argparse.Namespace) -> tuple[Any, Sequence[str] | None]:
    rows = [render.stats_row(s) for s in await c.stats(a.queue or "")]
    return rows, ("queue", "ready", "delayed", "leased", "dead", "oldest_ready_age_ms")


async def cmd_queues(c: Client, a: argparse.Namespace) -> tuple[Any, Sequence[str] | None]:
    rows = []
    for q in await c.list_queues():
        row = render.stats_row(q.stats)
        row["max_attempts"] = q.config.max_attempts
        row["aging_interval_ms"] = q.config.aging_interval_ms
        rows.append(row)
    return rows, (
        "queue",
        "ready",
        "delayed",
        "leased",
        "dead",
        "max_attempts",
        "aging_interval_ms",
    )


async def cmd_queue_create(c: Client, a: argparse.Namespace) -> tuple[Any, Sequence[str] | None]:
    config = pb.QueueConfig(
        max_attempts=a.max_attempts,
        default_lease_ms=a.lease_ms,
        aging_interval_ms=a.aging_interval_ms,
        dedup_window_ms=a.dedup_window_ms,
        max_payload_bytes=a.max_payload_bytes,
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
    rows = await cluster_status(c.endpoint, a.timeout_s)
    return rows, ("node", "address", "role", "ballot", "leader", "commit", "applied", "lag")


async def cmd_stop_node(c: Client, a: argparse.Namespace) -> Outcome:
    return {"node": f"n{a.node}", "result": stop_node(a.dir, a.node)}, None


async def cmd_start_node(c: Client, a: argparse.Namespace) -> Outcome:
    return {"node": f"n{a.node}", "result": start_node(a.dir, a.node)}, None


async def cmd_balancer_status(c: Client, a: argparse.Namespace) -> Outcome:
    status = await c.balancer_status()
    rows = [
        {
            "backend": b.address,
            "node": f"n{b.node_id}" if b.node_id else "?",
            "health": b.health,
            "state": "ejected" if b.ejected else ("leader" if b.leader else "up"),
            "weight": b.weight,
            "cpu": round(b.cpu_utilization, 2),
            "backlog": b.backlog,
            "load": round(b.load, 2),
            "reads": b.reads,
            "leader_calls": b.leader_calls,
            "ejections": b.ejections,
            "report_age_ms": b.report_age_ms,
            "last_error": b.last_error,
        }
        for b in status.backends
    ]
    if a.output == "json":
        return {"backends": rows, "retries": status.retries, "leader": status.leader_address}, None
    columns = ("backend", "node", "health", "state", "weight", "cpu", "backlog", "load", "reads")
    return rows, (*columns, "leader_calls", "ejections", "report_age_ms")


def _node_id(text: str) -> int:
    value = int(text.removeprefix("n"))
    if value < 1:
        raise argparse.ArgumentTypeError("node ids start at 1")
    return value


def _addresses(text: str) -> tuple[str, ...]:
    addresses = tuple(a.strip() for a in text.split(",") if a.strip())
    if not addresses or any(":" not in a for a in addresses):
        raise argparse.ArgumentTypeError("expected HOST:PORT,HOST:PORT,...")
    return addresses


def _peers(text: str) -> dict[int, str]:
    peers = {}
    for part in text.split(","):
        node, sep, address = part.partition("=")
        if not sep or ":" not in address:
            raise argparse.ArgumentTypeError(f"{part!r}: expected ID=HOST:PORT")
        peers[_node_id(node)] = address
    return peers


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pq", description="pqueue: a replicated priority queue")
    p.add_argument(
        "--endpoint",
        default=os.environ.get("PQ_ENDPOINT", DEFAULT_ENDPOINT),
        help="HOST:PORT of the balancer or a node (env PQ_ENDPOINT; default %(default)s)",
    )
    p.add_argument("-o", "--output", choices=("table", "json"), default="table")
    p.add_argument("--timeout-s", type=float, default=10.0, help="per-call deadline")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, fn: Command, help_: str, parent: Any = sub) -> argparse.ArgumentParser:
        sp: argparse.ArgumentParser = parent.add_parser(name, help=help_, description=help_)
        sp.set_defaults(func=fn)
        return sp

    node = sub.add_parser("node", help="run a node", description="Run a queue node.")
    node.add_argument("--data-dir", type=Path, required=True)
    node.add_argument("--listen", default="127.0.0.1:7701", help="HOST:PORT (port 0: any)")
    node.add_argument("--node-id", type=_node_id, default=1, help="1, 2, ... (or n1, n2, ...)")
    node.add_argument(
        "--peers",
        type=_peers,
        default=None,
        help="every node of the cluster, this one too: 1=HOST:PORT,2=HOST:PORT,... "
        "(without it the node runs alone)",
    )
    node.add_argument("--log-level", default="INFO")
    node.add_argument(
        "--log-format", choices=LOG_FORMATS, default="text", help="text, or json for log shippers"
    )
    node.add_argument(
        "--metrics-listen", default=None, help="HOST:PORT to serve Prometheus /metrics on"
    )
    node.add_argument("--grace-s", type=float, default=5.0, help="drain time on SIGTERM")
    node.add_argument(
        "--store",
        default=None,
        help="sqlite:PATH or postgresql://USER@HOST:PORT/DB (default: sqlite:DATA_DIR)",
    )
    node.add_argument(
        "--pg-schema", default=None, help="the node's PostgreSQL schema (default: pq_nNODE_ID)"
    )

    bal = sub.add_parser("balancer", help="run a balancer, or show one's backends")
    bsub = bal.add_subparsers(dest="action", required=True, metavar="ACTION")
    run = bsub.add_parser("run", help="run a balancer", description="Run a balancer.")
    run.add_argument("--listen", default="127.0.0.1:7700", help="HOST:PORT (port 0: any)")
    run.add_argument(
        "--backends", required=True, type=_addresses, help="the nodes: HOST:PORT,HOST:PORT,..."
    )
    run.add_argument("--metrics-listen", default=None, help="HOST:PORT for /metrics")
    run.add_argument("--probe-interval-s", type=float, default=1.0)
    run.add_argument("--log-level", default="INFO")
    run.add_argument(
        "--log-format", choices=LOG_FORMATS, default="text", help="text, or json for log shippers"
    )
    add(
        "status", cmd_balancer_status, "each backend's health, weight, CPU, backlog and picks", bsub
    )

    dev = sub.add_parser("dev-cluster", help="run a local cluster under DIR (make cluster)")
    dev.add_argument("--dir", type=Path, default=Path(".cluster"))
    dev.add_argument("--nodes", type=int, default=3)
    dev.add_argument(
        "--base-port",
        type=int,
        default=7700,
        help="the balancer listens on base, node N on base+N (0: any free ports)",
    )
    dev.add_argument(
        "--metrics-port",
        type=int,
        default=9700,
        help="/metrics of the balancer on this port, of node N on this port+N (0: any)",
    )
    dev.add_argument(
        "--store",
        default=None,
        help="postgresql://… to keep every node in PostgreSQL (schemas pq_n1, pq_n2, …); "
        "default: SQLite under DIR",
    )

    cluster = sub.add_parser("cluster", help="cluster status; stop or start a dev-cluster node")
    csub = cluster.add_subparsers(dest="action", required=True, metavar="ACTION")
    add("status", cmd_cluster_status, "every node's role, ballot, indexes and lag", csub)
    for name, fn in (("stop-node", cmd_stop_node), ("start-node", cmd_start_node)):
        sp = add(name, fn, f"{name.split('-')[0]} node N of the `make cluster` dev cluster", csub)
        sp.add_argument("node", type=_node_id)
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
    return p


async def _run_client(args: argparse.Namespace) -> int:
    async with Client(args.endpoint, timeout_s=args.timeout_s) as client:
        try:
            data, columns = await args.func(client, args)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        except PQueueError as exc:
            code = exc.code if isinstance(exc, RemoteError) else code_of(exc).name
            print(f"error: {code}: {exc.message}", file=sys.stderr)
            return 1
    print(render.emit(data, args.output, columns))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pq`` console script."""
    args = build_parser().parse_args(argv)
    if args.command == "node":
        from pqueue.runner import run_node

        return run_node(
            args.data_dir,
            args.listen,
            args.node_id,
            args.peers,
            args.log_level,
            args.grace_s,
            args.store,
            args.pg_schema,
            args.metrics_listen,
            args.log_format,
        )
    if args.command == "balancer" and args.action == "run":
        from balancer.config import BalancerConfig
        from balancer.pool import PoolConfig
        from balancer.runner import run_balancer

        try:
            interval = args.probe_interval_s
            config = BalancerConfig(
                backends=args.backends,
                listen=args.listen,
                metrics_listen=args.metrics_listen,
                probe_interval_s=interval,
                probe_timeout_s=min(0.8, interval),
                # A report expires after three intervals (3 s by default).
                pool=PoolConfig(report_expiry_s=3 * interval),
            )
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        return run_balancer(config, args.log_level, args.log_format)
    if args.command == "dev-cluster":
        return run_dev_cluster(args.dir, args.base_port, args.nodes, args.metrics_port, args.store)
    logging.basicConfig(level=logging.WARNING)
    return asyncio.run(_run_client(args))


if __name__ == "__main__":
    sys.exit(main())
