"""``pq``: run a node or a balancer, and talk to them from the shell.

The endpoint comes from ``--endpoint`` or ``PQ_ENDPOINT`` (default: the
balancer ``make cluster`` starts). Output is a table, or JSON with ``-o json``. Errors
print one line (``error: CODE: message``) to stderr and exit 1.
Each program registers its own subparser: ``node``, ``balancer``, ``token``,
``devcluster``, ``worker``, ``web`` and the client commands (``client``).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from collections.abc import Sequence
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    """The ``pq`` parser; each program adds its own subparser (imported here, so
    importing one program, e.g. the client commands, loads no other)."""
    from pqueue.cli import balancer, client, devcluster, node, token, web, worker
    from pqueue.client import DEFAULT_ENDPOINT

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

    node.register(sub)
    balancer.register(sub)
    token.register(sub)
    devcluster.register(sub)
    client.register(sub)
    worker.register(sub)
    web.register(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pq`` console script."""
    args = build_parser().parse_args(argv)
    run = getattr(args, "run", None)
    if run is not None:
        result: int = run(args)
        return result
    logging.basicConfig(level=logging.WARNING)
    from pqueue.cli.client import run_client

    try:
        return asyncio.run(run_client(args))
    except KeyboardInterrupt:  # Ctrl-C (pq watch, a long poll): no traceback
        return 130
