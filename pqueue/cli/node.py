"""``pq node``: run a queue node."""

from __future__ import annotations

import argparse
import ipaddress
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pqueue.cli.args import (
    add_gc_young,
    int_in,
    metrics_token,
    parse_bytes,
    parse_node_id,
    parse_peer_ports,
    parse_peers,
)
from pqueue.cli.failure import exit_code, failure_line
from pqueue.errors import PQueueError
from pqueue.wire.logs import LOG_FORMATS, describe
from pqueue.wire.roles import DEFAULT_LEEWAY_S, PEER, node_subject
from pqueue.wire.tls import Tls
from pqueue.wire.tokens import TokenFile, current_token

if TYPE_CHECKING:
    from pqueue.node.auth import Verifier
    from pqueue.node.runner import NodeOptions


def _cluster_id(text: str) -> str:
    from pqueue.node.identity import validate_cluster_id

    try:
        return validate_cluster_id(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _budget_mb(text: str) -> int:
    try:
        mb = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number of MiB: {text!r}") from None
    if mb < 0:
        raise argparse.ArgumentTypeError("must be 0 (no budget) or more")
    return mb


#: The most ``--open-entries`` (well inside a leader's in-flight window of 64 slots).
MAX_OPEN_ENTRIES = 16


def _mix_wait_ms(text: str) -> float:
    from pqueue.node.mixing import MAX_MIX_WAIT_MS  # parsing any `pq` command loads no server

    try:
        ms = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of milliseconds: {text!r}") from None
    if not 0 <= ms <= MAX_MIX_WAIT_MS:
        raise argparse.ArgumentTypeError(f"must be between 0 (never) and {MAX_MIX_WAIT_MS:g}")
    return ms


def _byte_count(text: str) -> int:
    try:
        return parse_bytes(text)
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
    from pqueue.node.auth import RevokedTokens, Verifier
    from pqueue.node.quotas import Quotas
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
            metrics_token=metrics_token(args.metrics_token_file),
            metrics_queue_labels=args.metrics_queue_labels,
            memory_budget_bytes=args.memory_budget_mb << 20,
        ),
        peers=args.peers,
        peer_ports=_peer_ports(args.peer_ports, args.peers, args.node_id),
        cluster_id=args.cluster_id,
        accept_member_change=args.accept_member_change,
        store=args.store,
        pg_schema=args.pg_schema,
        snapshot_log_bytes=args.snapshot_log_bytes,
        log_level=args.log_level,
        log_format=args.log_format,
        snapshot_every_entries=args.snapshot_every_entries,
        mix_wait_ms=args.mix_wait_ms,
        open_entries=args.open_entries,
        gc_young=args.gc_young,
    )


def _peer_ports(
    given: int | dict[int, int] | None, peers: dict[int, str] | None, node_id: int
) -> dict[int, int] | None:
    """Each node's TCP peer port, from ``--peer-ports`` (one port: every node's)."""
    if given is None:
        return None
    if not peers:
        raise ValueError("--peer-ports needs --peers: a node alone has no peers to talk to")
    ports = dict.fromkeys(peers, given) if isinstance(given, int) else given
    if unknown := sorted(set(ports) - set(peers)):
        raise ValueError(f"--peer-ports names nodes that --peers does not: {unknown}")
    if node_id not in ports:
        raise ValueError(f"--peer-ports names no port for this node ({node_id}) to listen on")
    return ports


def _check_peer_token(verifier: Verifier, token: str, node_id: int) -> None:
    """Refuse to start with a peer token the peers would refuse."""
    try:
        principal = verifier.verify(token)
    except PQueueError as exc:
        raise ValueError(f"the peer token is not valid: {describe(exc)}") from exc
    if PEER not in principal.roles or principal.node_id != node_id:
        raise ValueError(
            f"the peer token must have the peer role and name this node ({node_subject(node_id)}); "
            f"it names {principal.subject or 'nobody'!r} with {sorted(principal.roles)}: "
            f"pq token issue --tenant cluster --node-id {node_id} ..."
        )


def register(sub: Any) -> None:
    """The ``node`` subparser."""
    node = sub.add_parser("node", help="run a node", description="Run a queue node.")
    node.add_argument(
        "--data-dir", type=Path, required=True, help="the node's directory (its SQLite store)"
    )
    node.add_argument("--listen", default="127.0.0.1:7701", help="HOST:PORT (port 0: any)")
    node.add_argument("--node-id", type=parse_node_id, default=1, help="1, 2, ... (or n1, n2, ...)")
    node.add_argument(
        "--peers",
        type=parse_peers,
        default=None,
        help="every node of the cluster, this one too: 1=HOST:PORT,2=HOST:PORT,... "
        "(without it the node runs alone; a member of a cluster always needs it)",
    )
    node.add_argument(
        "--peer-ports",
        type=parse_peer_ports,
        default=None,
        metavar="PORT|ID=PORT,...",
        help="consensus messages over plain TCP (or TLS) instead of gRPC streams: each node "
        "takes peers' connections on its port (at its --listen host), and is dialled at the "
        "host of its --peers address (one PORT: the same on every node). Cheaper and faster; "
        "a peer not named, or not listening, is reached over gRPC",
    )
    _identity_args(node)
    node.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    node.add_argument(
        "--log-format", choices=LOG_FORMATS, default="text", help="text, or json for log shippers"
    )
    node.add_argument(
        "--metrics-listen", default=None, help="HOST:PORT to serve Prometheus /metrics on"
    )
    _auth_and_tls_args(node)
    node.add_argument("--grace-s", type=float, default=5.0, help="drain time on SIGTERM")
    node.add_argument(
        "--memory-budget-mb",
        type=_budget_mb,
        default=0,
        metavar="N",
        help="refuse Enqueue and EnqueueBatch with RESOURCE_EXHAUSTED while the node's RSS "
        "is at or above N MiB (read once a second; leases, acks and reads still work, and "
        "free memory); 0, the default: no budget",
    )
    node.add_argument(
        "--snapshot-every-entries",
        type=int,
        default=10_000,
        help="snapshot the state and compact the log every N entries (default 10,000)",
    )
    node.add_argument(
        "--open-entries",
        type=int_in(1, MAX_OPEN_ENTRIES),
        default=1,
        metavar="N",
        help="group commit: log entries the leader keeps proposed and not yet chosen "
        "before new commands wait to go together in the next (default 1; more overlaps "
        "one entry's fsyncs with the next's, for slow disks; at most "
        f"{MAX_OPEN_ENTRIES})",
    )
    node.add_argument(
        "--mix-wait-ms",
        type=_mix_wait_ms,
        default=2.0,
        metavar="MS",
        help="while the log is idle, hold an entry of producers' commands alone (or "
        "consumers' alone) up to MS for the other side's, when the entry before held "
        "them: one entry a round instead of two (default 2; 0: never)",
    )
    add_gc_young(node)
    node.add_argument(
        "--store",
        default=None,
        help="sqlite:PATH or postgresql://USER@HOST:PORT/DB (default: sqlite:DATA_DIR)",
    )
    node.add_argument(
        "--pg-schema", default=None, help="the node's PostgreSQL schema (default: pq_nNODE_ID)"
    )
    node.add_argument(
        "--snapshot-log-bytes",
        type=_byte_count,
        default=32 << 20,
        help="snapshot (and compact the log) once this many bytes of entries were applied "
        "since the last snapshot, or a quarter of the last snapshot's size if more "
        "(default 32MiB; see also --snapshot-every-entries)",
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

    node.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run a node until SIGTERM."""
    from pqueue.node.runner import run_node

    try:
        options = _node_options(args)
    except ValueError as exc:
        print(failure_line(exc), file=sys.stderr)
        return exit_code(exc)
    return run_node(options)
