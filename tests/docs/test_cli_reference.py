"""docs/operations.md's table of ``pq`` commands lists exactly the commands
the real parser has: a new command cannot go undocumented, nor a removed one
stay in the table."""

from __future__ import annotations

import argparse
import re

from pqueue.cli import build_parser
from tests.docs.markdown import DOCS, section


def parser_commands(parser: argparse.ArgumentParser, prefix: str = "pq") -> set[str]:
    """Every leaf command of ``parser``: ``pq enqueue``, ``pq queue create``, ..."""
    out: set[str] = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out |= parser_commands(sub, f"{prefix} {name}") or {f"{prefix} {name}"}
    return out


def documented_commands() -> set[str]:
    text = section(DOCS / "operations.md", "Operating a cluster")
    return set(re.findall(r"^\| `(pq [a-z -]+)` \|", text, re.M))


def test_the_cli_reference_lists_every_command_of_the_parser() -> None:
    real = parser_commands(build_parser())
    assert {"pq enqueue", "pq queue create", "pq token issue", "pq node"} <= real
    documented = documented_commands()
    assert not real - documented, f"not in docs/operations.md: {sorted(real - documented)}"
    assert not documented - real, f"no such command: {sorted(documented - real)}"
