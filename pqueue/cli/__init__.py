"""``pq``: run a node or a balancer, and talk to them from the shell.

The endpoint comes from ``--endpoint`` or ``PQ_ENDPOINT`` (default: the
balancer ``make cluster`` starts). Output is a table, or JSON with ``-o json``.
The global options (``--endpoint``, ``-o``, ``--token``...) go before or after
the command: ``pq -o json stats`` and ``pq stats -o json`` are the same (a
program's own option of the same name is the program's, before or after its
command, e.g. ``pq node --tls-cert`` is the node's certificate; given both
before and after, the one after wins).

Every failure prints one line to stderr, ``error: CODE: message`` (CODE is
the gRPC status name, e.g. ``NOT_FOUND``; checks made before any call say
``INVALID_ARGUMENT``). Exit codes (``EXIT_CODES``): 0 done; 1 the call
failed; 2 the command line was refused before anything was sent; 130
interrupted (Ctrl-C).

Each program registers its own subparser: ``node``, ``balancer``, ``token``,
``devcluster``, ``worker``, ``web`` and the client commands (``client``).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import pqueue.cli.grpc_env  # noqa: F401  (first: before anything imports grpc)
from pqueue.cli.args import HelpFormatter
from pqueue.cli.failure import EXIT_FAILED, EXIT_USAGE, exit_code, failure_line

#: What ``pq`` exits with, and when.
EXIT_OK = 0
EXIT_INTERRUPTED = 130
EXIT_CODES = (
    f"exit codes: {EXIT_OK} done, {EXIT_FAILED} the call failed (error: CODE: message), "
    f"{EXIT_USAGE} the command line was refused before anything was sent, "
    f"{EXIT_INTERRUPTED} interrupted (Ctrl-C)"
)


class Parser(argparse.ArgumentParser):
    """``pq``'s parsers: defaults in ``--help``, and a refused command line
    as ``error: INVALID_ARGUMENT: ...`` (exit 2) like every other failure."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"error: INVALID_ARGUMENT: {message}\n")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pqueue")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def _global_options(p: argparse._ActionsContainer, suppress: bool, skip: set[str]) -> None:
    """The options every command takes. ``suppress``: on a command's own
    parser, where an option left out must not overwrite the value given
    before the command (or its default); ``skip``: option strings the
    command has of its own."""
    from pqueue.client import DEFAULT_ENDPOINT

    endpoint = os.environ.get("PQ_ENDPOINT", DEFAULT_ENDPOINT)
    options: list[tuple[tuple[str, ...], dict[str, Any]]] = [
        (
            ("--endpoint",),
            {
                "default": endpoint,
                "metavar": "HOST:PORT",
                "help": "the balancer or a node (env PQ_ENDPOINT)",
            },
        ),
        (
            ("-o", "--output"),
            {"choices": ("table", "json"), "default": "table", "help": "output format"},
        ),
        (
            ("--token",),
            {"default": os.environ.get("PQ_TOKEN"), "help": "bearer token (env PQ_TOKEN)"},
        ),
        (
            ("--token-file",),
            {
                "type": Path,
                "default": None,
                "metavar": "PATH",
                "help": "read the bearer token here",
            },
        ),
        (
            ("--tls-ca",),
            {
                "type": Path,
                "default": None,
                "metavar": "PEM",
                "help": "the server's CA (turns on TLS)",
            },
        ),
        (
            ("--tls-cert",),
            {"type": Path, "default": None, "metavar": "PEM", "help": "client certificate (mTLS)"},
        ),
        (
            ("--tls-key",),
            {"type": Path, "default": None, "metavar": "PEM", "help": "client key (mutual TLS)"},
        ),
        (
            ("--timeout-s",),
            {
                "type": float,
                "default": 10.0,
                "metavar": "S",
                "help": "each call's deadline, in seconds",
            },
        ),
    ]
    for flags, kwargs in options:
        if skip & set(flags):
            continue
        if suppress:
            shown = kwargs["default"]
            shown = f"{shown:g}" if isinstance(shown, float) else shown
            if kwargs["help"] and shown is not None and flags[0] != "--token":
                kwargs["help"] += f" (default: {shown})"
            kwargs["default"] = argparse.SUPPRESS
        p.add_argument(*flags, **kwargs)


def _commands(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """Every parser of a command that takes no subcommand, below ``parser``."""
    out: list[argparse.ArgumentParser] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            seen: set[int] = set()
            for child in action.choices.values():
                if id(child) not in seen:
                    seen.add(id(child))
                    out.extend(_commands(child) or [child])
    return out


def build_parser() -> argparse.ArgumentParser:
    """The ``pq`` parser; each program adds its own subparser (imported here, so
    importing one program, e.g. the client commands, loads no other)."""
    from pqueue.cli import balancer, commands, devcluster, node, token, web, worker

    p = Parser(prog="pq", description="pqueue: a replicated priority queue", epilog=EXIT_CODES)
    p.add_argument("--version", action="version", version=f"pq {_version()}")
    _global_options(p, suppress=False, skip=set())
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    node.register(sub)
    balancer.register(sub)
    token.register(sub)
    devcluster.register(sub)
    commands.register(sub)
    worker.register(sub)
    web.register(sub)
    globals_ = {a.dest: a for a in p._actions if a.option_strings}
    for command in _commands(p):
        own = set(command._option_string_actions)
        for action in command._actions:
            if action.dest in globals_ and own & set(globals_[action.dest].option_strings):
                # The program's own option (``pq node --tls-cert``) given
                # before the command is the program's too, not dropped by
                # this parser's default (a node run without its TLS).
                action.default = argparse.SUPPRESS
        group = command.add_argument_group("global options (also before the command)")
        _global_options(group, suppress=True, skip=own)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pq`` console script."""
    try:
        return _main(argv)
    except KeyboardInterrupt:  # Ctrl-C anywhere (pq watch, a long poll, a worker)
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    run = getattr(args, "run", None)
    if run is not None:
        result: int = run(args)
        return result
    logging.basicConfig(level=logging.WARNING)
    from pqueue.cli.client import run_client

    prepare = getattr(args, "prepare", None)  # input read before the loop runs
    if prepare is not None:
        try:
            prepare(args)
        except (ValueError, OSError) as exc:
            print(failure_line(exc), file=sys.stderr)
            return exit_code(exc)
    return asyncio.run(run_client(args))
