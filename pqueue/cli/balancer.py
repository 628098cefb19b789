"""``pq balancer run`` and ``pq balancer status``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from pqueue.cli.args import (
    Outcome,
    add_gc_young,
    adder,
    metrics_token,
    parse_addresses,
    tls_of,
)
from pqueue.cli.failure import exit_code, failure_line
from pqueue.client import Client
from pqueue.wire.logs import LOG_FORMATS
from pqueue.wire.tokens import TokenFile


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


def register(sub: Any) -> None:
    """The ``balancer`` subparsers."""
    add = adder(sub)
    bal = sub.add_parser("balancer", help="run a balancer, or show one's backends")
    bsub = bal.add_subparsers(dest="action", required=True, metavar="ACTION")
    run = bsub.add_parser("run", help="run a balancer", description="Run a balancer.")
    run.set_defaults(run=run_balancer)
    run.add_argument("--listen", default="127.0.0.1:7700", help="HOST:PORT (port 0: any)")
    run.add_argument(
        "--backends", required=True, type=parse_addresses, help="the nodes: HOST:PORT,HOST:PORT,..."
    )
    run.add_argument("--metrics-listen", default=None, help="HOST:PORT for /metrics")
    run.add_argument(
        "--metrics-token-file",
        type=Path,
        default=None,
        help="/metrics answers only scrapes with 'Authorization: Bearer <this file's text>'",
    )
    run.add_argument(
        "--probe-interval-s", type=float, default=1.0, help="how often each node is probed"
    )
    add_gc_young(run)
    run.add_argument("--tls-cert", type=Path, default=None, help="PEM certificate for clients")
    run.add_argument("--tls-key", type=Path, default=None, help="PEM key of --tls-cert")
    run.add_argument("--tls-ca", type=Path, default=None, help="require client certificates")
    run.add_argument("--backend-tls-ca", type=Path, default=None, help="the nodes' CA (TLS)")
    run.add_argument("--backend-tls-cert", type=Path, default=None, help="for mutual TLS")
    run.add_argument("--backend-tls-key", type=Path, default=None, help="for mutual TLS")
    run.add_argument(
        "--probe-token-file",
        type=Path,
        default=None,
        help="bearer token for load probes, when the nodes require one (role: any); "
        "re-read when it changes",
    )
    run.add_argument(
        "--balancer-token-file",
        type=Path,
        default=None,
        help="this balancer's token (role balancer), so nodes believe the client IPs it passes "
        "on; re-read when it changes",
    )
    run.add_argument(
        "--coalesce",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="send the single enqueues, acks, nacks and extensions (and Submits) of clients "
        "with the same credentials to the leader together, in Submit calls (default: on); "
        "--no-coalesce sends each call alone",
    )
    run.add_argument(
        "--coalesce-in-flight",
        type=int,
        default=1,
        metavar="N",
        help="Submit calls one caller's group may have in flight at the leader at once; "
        "calls arriving meanwhile ride the next (default: 1)",
    )
    run.add_argument(
        "--max-streams",
        type=int,
        default=4096,
        metavar="N",
        help="Consume streams carried at once; more are refused, RESOURCE_EXHAUSTED "
        "(default: 4096)",
    )
    run.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    run.add_argument(
        "--log-format", choices=LOG_FORMATS, default="text", help="text, or json for log shippers"
    )
    add(
        "status", cmd_balancer_status, "each backend's health, weight, CPU, backlog and picks", bsub
    )


def run_balancer(args: argparse.Namespace) -> int:
    """Run a balancer until SIGTERM."""
    from balancer.config import BalancerConfig
    from balancer.pool import PoolConfig
    from balancer.runner import run_balancer as serve

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
            tls=tls_of(args.tls_cert, args.tls_key, args.tls_ca, server=True),
            backend_tls=tls_of(
                args.backend_tls_cert, args.backend_tls_key, args.backend_tls_ca, server=False
            ),
            probe_token=TokenFile(args.probe_token_file)
            if args.probe_token_file is not None
            else None,
            balancer_token=TokenFile(args.balancer_token_file)
            if args.balancer_token_file is not None
            else None,
            metrics_token=metrics_token(args.metrics_token_file),
            coalesce=args.coalesce,
            coalesce_in_flight=args.coalesce_in_flight,
            max_streams=args.max_streams,
            gc_young=args.gc_young,
        )
    except (OSError, ValueError) as exc:
        print(failure_line(exc), file=sys.stderr)
        return exit_code(exc)
    return serve(config, args.log_level, args.log_format)
