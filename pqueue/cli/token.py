"""``pq token issue``: sign bearer tokens (operators)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from pqueue.cli.args import parse_duration_s, parse_node_id
from pqueue.cli.failure import UsageError, exit_code, failure_line
from pqueue.errors import PQueueError
from pqueue.wire.roles import PEER, ROLES, node_subject
from pqueue.wire.tokens import read_key


def _refused(exc: Exception) -> int:
    """Print ``exc``'s failure line; its exit code."""
    print(failure_line(exc), file=sys.stderr)
    return exit_code(exc)


def issue_token(args: argparse.Namespace) -> int:
    from pqueue.node.auth import issue  # signs with the JWT library: only when run

    roles, subject = list(args.role or ()), args.subject
    if args.node_id is not None:  # a node's peer token: it speaks for that node only
        if subject and subject != node_subject(args.node_id):
            return _refused(
                UsageError("--subject", "--node-id sets the subject; give no --subject")
            )
        roles, subject = sorted({*roles, PEER}), node_subject(args.node_id)
    elif PEER in roles:
        return _refused(UsageError("--role", "a peer token names its node: give --node-id N"))
    if not roles:
        return _refused(UsageError("--role", "give --role (or --node-id for a node's peer token)"))
    try:
        token = issue(
            read_key(args.key_file),
            args.tenant,
            roles,
            parse_duration_s(args.ttl),
            subject=subject,
            audience=args.audience,
            issuer=args.issuer,
            token_id=args.token_id,
        )
    except (OSError, ValueError, PQueueError) as exc:
        return _refused(exc)
    print(json.dumps({"token": token}) if args.output == "json" else token)
    return 0


def register(sub: Any) -> None:
    """The ``token`` subparsers."""
    tok = sub.add_parser("token", help="issue bearer tokens (operators)")
    tsub = tok.add_subparsers(dest="action", required=True, metavar="ACTION")
    issue = tsub.add_parser(
        "issue", help="print a signed token", description="Print a signed bearer token (a JWT)."
    )
    issue.add_argument("--tenant", required=True, help="the tenant it acts for")
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
    issue.add_argument(
        "--audience", default=None, help="its aud claim (the nodes' --auth-audience)"
    )
    issue.add_argument("--issuer", default=None, help="its iss claim (the nodes' --auth-issuer)")
    issue.add_argument(
        "--node-id",
        type=parse_node_id,
        default=None,
        help="a node's peer token: role peer, subject node:N (it may speak for node N only)",
    )
    issue.add_argument(
        "--token-id", default=None, help="its jti, to revoke it by (default: a random one)"
    )

    issue.set_defaults(run=issue_token)
