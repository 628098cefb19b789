"""``pq``: run a node or a balancer, and talk to them from the shell.

The endpoint comes from ``--endpoint`` or ``PQ_ENDPOINT`` (default: the
balancer ``make cluster`` starts). Output is a table, or JSON with ``-o json``. Errors
print one line (``error: CODE: message``) to stderr and exit 1.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import logging
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pqueue.cli import render
from pqueue.cli.devcluster import cluster_status, run_dev_cluster, start_node, stop_node
from pqueue.client import DEFAULT_ENDPOINT, Client
from pqueue.errors import PQueueError, RemoteError
from pqueue.node.auth import (
    DEFAULT_LEEWAY_S,
    PEER,
    ROLES,
    RevokedTokens,
    TokenFile,
    Verifier,
    current_token,
    issue,
    node_subject,
    read_key,
)
from pqueue.node.quotas import Quotas
from pqueue.v1 import queue_pb2 as pb
from pqueue.wire.logs import LOG_FORMATS
from pqueue.wire.status import code_of
from pqueue.wire.tls import Tls

if TYPE_CHECKING:
    from pqueue.node.runner import NodeOptions

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
    rows = await cluster_status(c.endpoint, a.timeout_s, **client_options(a))  # --token, TLS
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


def _cluster_id(text: str) -> str:
    from pqueue.node.identity import validate_cluster_id

    try:
        return validate_cluster_id(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _identity_args(node: argparse.ArgumentParser) -> None:
    """Identity on disk: the data dir records node id, cluster and members at first start."""
    node.add_argument(
        "--cluster-id",
        type=_cluster_id,
        default=None,
        help="the cluster's name, the same on every node; the data dir records it at first "
        "start and refuses another (default: the recorded one, or 'pqueue')",
    )
    node.add_argument(
        "--accept-member-change",
        action="store_true",
        help="let --peers name another member set than the data dir recorded (stop every "
        "node first and give each the new set; without it such a start is refused)",
    )


def _auth_and_tls_args(node: argparse.ArgumentParser) -> None:
    node.add_argument(
        "--auth-key-file",
        type=Path,
        default=None,
        help="turn on auth: the HS256 secret, or the PEM public key (RS256, ES256)",
    )
    node.add_argument(
        "--peer-token-file",
        type=Path,
        default=None,
        help="with auth: this node's own peer token (pq token issue --node-id N), re-read",
    )
    node.add_argument("--auth-audience", default=None, help="tokens must name this audience")
    node.add_argument("--auth-issuer", default=None, help="tokens must name this issuer")
    # Token checks (issue 12): clock skew, lifetime, revocation.
    node.add_argument(
        "--auth-leeway-s",
        type=float,
        default=DEFAULT_LEEWAY_S,
        help=f"clock skew allowed on exp, nbf, iat (default {DEFAULT_LEEWAY_S:g})",
    )
    node.add_argument(
        "--auth-max-token-lifetime-s",
        type=float,
        default=None,
        help="refuse tokens that live longer (exp - iat), UNAUTHENTICATED (default: any)",
    )
    node.add_argument(
        "--revoked-tokens-file",
        type=Path,
        default=None,
        help="token ids (jti) refused, one a line; re-read when it changes",
    )
    node.add_argument(
        "--insecure-no-auth",
        action="store_true",
        help="serve without auth on a non-loopback address (anyone reaching it may do anything)",
    )
    node.add_argument(
        "--tenants",
        type=Path,
        default=None,
        help="TOML of per-tenant quotas: enqueue rate, leases, queue depth, payload size",
    )
    node.add_argument("--tls-cert", type=Path, default=None, help="PEM certificate (turns on TLS)")
    node.add_argument("--tls-key", type=Path, default=None, help="PEM key of --tls-cert")
    node.add_argument(
        "--tls-ca",
        type=Path,
        default=None,
        help="PEM CA: require certificates from it of peers, balancers and clients (mutual TLS)",
    )


def _listen_is_loopback(listen: str) -> bool:
    host = listen.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _node_options(args: argparse.Namespace) -> NodeOptions:
    from pqueue.node.runner import NodeOptions
    from pqueue.node.server import ServerConfig

    verifier = (
        Verifier.from_file(
            args.auth_key_file,
            args.auth_audience,
            args.auth_issuer,
            leeway_s=args.auth_leeway_s,
            max_lifetime_s=args.auth_max_token_lifetime_s,
            revoked=RevokedTokens(args.revoked_tokens_file)
            if args.revoked_tokens_file is not None
            else None,
        )
        if args.auth_key_file is not None
        else None
    )
    if verifier is None and not args.insecure_no_auth and not _listen_is_loopback(args.listen):
        raise ValueError(
            f"refusing to serve {args.listen} without auth: give --auth-key-file, "
            "or --insecure-no-auth if anyone who can reach it may do anything"
        )
    # Re-read when the file changes: a rotated token is used from the next connection.
    peer_token = TokenFile(args.peer_token_file) if args.peer_token_file else None
    if verifier is not None and len(args.peers or {}) > 1 and not current_token(peer_token):
        raise ValueError(
            "with auth on, nodes authenticate to each other: give --peer-token-file "
            f"(pq token issue --tenant cluster --node-id {args.node_id} ...)"
        )
    if verifier is not None and peer_token is not None:
        _check_peer_token(verifier, current_token(peer_token), args.node_id)
    tls = None
    if args.tls_cert is not None or args.tls_key is not None or args.tls_ca is not None:
        tls = Tls.from_files(args.tls_cert, args.tls_key, args.tls_ca)
    return NodeOptions(
        data_dir=args.data_dir,
        node_id=args.node_id,
        server=ServerConfig(
            listen=args.listen,
            grace_s=args.grace_s,
            metrics_listen=args.metrics_listen,
            tls=tls,
            verifier=verifier,
            quotas=Quotas.from_file(args.tenants) if args.tenants is not None else None,
            peer_token=peer_token,
            metrics_token=_metrics_token(args.metrics_token_file),
            metrics_queue_labels=args.metrics_queue_labels,
        ),
        peers=args.peers,
        cluster_id=args.cluster_id,
        accept_member_change=args.accept_member_change,
        store=args.store,
        pg_schema=args.pg_schema,
        log_level=args.log_level,
        log_format=args.log_format,
    )


def _check_peer_token(verifier: Verifier, token: str, node_id: int) -> None:
    """Refuse to start with a peer token the peers would refuse."""
    try:
        principal = verifier.verify(token)
    except PQueueError as exc:
        raise ValueError(f"the peer token is not valid: {exc}") from exc
    if PEER not in principal.roles or principal.node_id != node_id:
        raise ValueError(
            f"the peer token must have the peer role and name this node ({node_subject(node_id)}); "
            f"it names {principal.subject or 'nobody'!r} with {sorted(principal.roles)}: "
            f"pq token issue --tenant cluster --node-id {node_id} ..."
        )


def _metrics_token(path: Path | None) -> str | None:
    """The /metrics scrape token in ``path`` (None: no file given)."""
    if path is None:
        return None
    token = read_key(path).decode().strip()
    if not token:
        raise ValueError(f"{path} is empty: a metrics token file needs the token")
    return token


def _tls(cert: Path | None, key: Path | None, ca: Path | None, server: bool) -> Tls | None:
    """TLS from whichever flags were given (none: plaintext); refuses half a setup."""
    if cert is None and key is None and ca is None:
        return None
    if server and cert is None:
        raise ValueError("a TLS server needs --tls-cert and --tls-key")
    if not server and ca is None:
        raise ValueError("TLS to the nodes needs --backend-tls-ca (their CA)")
    return Tls.from_files(cert, key, ca)


def _duration_s(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    number, unit = (text[:-1], text[-1]) if text[-1:] in units else (text, "s")
    try:
        value = float(number) * units[unit]
    except ValueError as exc:
        raise ValueError(f"not a duration: {text!r} (3600, 90s, 30m, 24h, 7d)") from exc
    if value <= 0:
        raise ValueError("a duration must be positive")
    return value


def _issue_token(args: argparse.Namespace) -> int:
    roles, subject = list(args.role or ()), args.subject
    if args.node_id is not None:  # a node's peer token: it speaks for that node only
        if subject and subject != node_subject(args.node_id):
            print("error: --node-id sets the subject; give no --subject", file=sys.stderr)
            return 1
        roles, subject = sorted({*roles, PEER}), node_subject(args.node_id)
    elif PEER in roles:
        print("error: a peer token names its node: give --node-id N", file=sys.stderr)
        return 1
    if not roles:
        print("error: give --role (or --node-id for a node's peer token)", file=sys.stderr)
        return 1
    try:
        token = issue(
            read_key(args.key_file),
            args.tenant,
            roles,
            _duration_s(args.ttl),
            subject=subject,
            audience=args.audience,
            issuer=args.issuer,
            token_id=args.token_id,
        )
    except (OSError, ValueError, PQueueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({"token": token}) if args.output == "json" else token)
    return 0


def client_options(args: argparse.Namespace) -> dict[str, Any]:
    """``Client`` keyword arguments from the global options (token, TLS)."""
    token = args.token
    if args.token_file is not None:
        token = args.token_file.read_text().strip()
    tls = None
    if args.tls_ca is not None or args.tls_cert is not None:
        tls = Tls.from_files(args.tls_cert, args.tls_key, args.tls_ca)
    return {"token": token or None, "tls": tls}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pq", description="pqueue: a replicated priority queue")
    p.add_argument(
        "--endpoint",
        default=os.environ.get("PQ_ENDPOINT", DEFAULT_ENDPOINT),
        help="HOST:PORT of the balancer or a node (env PQ_ENDPOINT; default %(default)s)",
    )
    p.add_argument("-o", "--output", choices=("table", "json"), default="table")
    p.add_argument(
        "--token", default=os.environ.get("PQ_TOKEN"), help="bearer token (env PQ_TOKEN)"
    )
    p.add_argument("--token-file", type=Path, default=None, help="read the bearer token here")
    p.add_argument("--tls-ca", type=Path, default=None, help="CA of the server (turns on TLS)")
    p.add_argument("--tls-cert", type=Path, default=None, help="client certificate (mutual TLS)")
    p.add_argument("--tls-key", type=Path, default=None, help="client key (mutual TLS)")
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
        "(without it the node runs alone; a member of a cluster always needs it)",
    )
    _identity_args(node)
    node.add_argument("--log-level", default="INFO")
    node.add_argument(
        "--log-format", choices=LOG_FORMATS, default="text", help="text, or json for log shippers"
    )
    node.add_argument(
        "--metrics-listen", default=None, help="HOST:PORT to serve Prometheus /metrics on"
    )
    _auth_and_tls_args(node)
    node.add_argument("--grace-s", type=float, default=5.0, help="drain time on SIGTERM")
    node.add_argument(
        "--store",
        default=None,
        help="sqlite:PATH or postgresql://USER@HOST:PORT/DB (default: sqlite:DATA_DIR)",
    )
    node.add_argument(
        "--pg-schema", default=None, help="the node's PostgreSQL schema (default: pq_nNODE_ID)"
    )
    # /metrics exposure (issue 12): a scrape token, and what queue labels show.
    node.add_argument(
        "--metrics-token-file",
        type=Path,
        default=None,
        help="/metrics answers only scrapes with 'Authorization: Bearer <this file's text>'",
    )
    node.add_argument(
        "--metrics-queue-labels",
        choices=("queue", "tenant", "off"),
        default="queue",
        help="per-queue series labelled by queue name, summed per tenant, or one sum (off)",
    )

    bal = sub.add_parser("balancer", help="run a balancer, or show one's backends")
    bsub = bal.add_subparsers(dest="action", required=True, metavar="ACTION")
    run = bsub.add_parser("run", help="run a balancer", description="Run a balancer.")
    run.add_argument("--listen", default="127.0.0.1:7700", help="HOST:PORT (port 0: any)")
    run.add_argument(
        "--backends", required=True, type=_addresses, help="the nodes: HOST:PORT,HOST:PORT,..."
    )
    run.add_argument("--metrics-listen", default=None, help="HOST:PORT for /metrics")
    run.add_argument(
        "--metrics-token-file",
        type=Path,
        default=None,
        help="/metrics answers only scrapes with 'Authorization: Bearer <this file's text>'",
    )
    run.add_argument("--probe-interval-s", type=float, default=1.0)
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
    run.add_argument("--log-level", default="INFO")
    run.add_argument(
        "--log-format", choices=LOG_FORMATS, default="text", help="text, or json for log shippers"
    )
    add(
        "status", cmd_balancer_status, "each backend's health, weight, CPU, backlog and picks", bsub
    )

    tok = sub.add_parser("token", help="issue bearer tokens (operators)")
    tsub = tok.add_subparsers(dest="action", required=True, metavar="ACTION")
    issue = tsub.add_parser(
        "issue", help="print a signed token", description="Print a signed bearer token (a JWT)."
    )
    issue.add_argument("--tenant", required=True)
    issue.add_argument(
        "--role", action="append", default=None, choices=sorted(ROLES), help="repeat for more"
    )
    issue.add_argument(
        "--key-file",
        type=Path,
        required=True,
        help="the HS256 secret (32+ bytes), or a PEM private key (RSA: RS256, EC P-256: ES256)",
    )
    issue.add_argument("--ttl", default="24h", help="lifetime: 3600, 90s, 30m, 24h, 7d")
    issue.add_argument("--subject", default="", help="who it is for (logged)")
    issue.add_argument("--audience", default=None)
    issue.add_argument("--issuer", default=None)
    issue.add_argument(
        "--node-id",
        type=_node_id,
        default=None,
        help="a node's peer token: role peer, subject node:N (it may speak for node N only)",
    )
    issue.add_argument(
        "--token-id", default=None, help="its jti, to revoke it by (default: a random one)"
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
    return p


async def _run_client(args: argparse.Namespace) -> int:
    try:
        options = client_options(args)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    async with Client(args.endpoint, timeout_s=args.timeout_s, **options) as client:
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
        from pqueue.node.runner import run_node

        try:
            options = _node_options(args)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        return run_node(options)
    if args.command == "token":
        return _issue_token(args)
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
                tls=_tls(args.tls_cert, args.tls_key, args.tls_ca, server=True),
                backend_tls=_tls(
                    args.backend_tls_cert, args.backend_tls_key, args.backend_tls_ca, server=False
                ),
                probe_token=TokenFile(args.probe_token_file)
                if args.probe_token_file is not None
                else None,
                balancer_token=TokenFile(args.balancer_token_file)
                if args.balancer_token_file is not None
                else None,
                metrics_token=_metrics_token(args.metrics_token_file),
            )
        except (OSError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        return run_balancer(config, args.log_level, args.log_format)
    if args.command == "dev-cluster":
        return run_dev_cluster(args.dir, args.base_port, args.nodes, args.metrics_port, args.store)
    logging.basicConfig(level=logging.WARNING)
    return asyncio.run(_run_client(args))


if __name__ == "__main__":
    sys.exit(main())
