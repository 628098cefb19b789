"""Every ``pq`` command in README.md and docs/*.md parses with the real CLI
parser (as tests/deploy checks the manifests' commands), and every ``make``
target they name exists: the docs cannot drift from the CLI unnoticed."""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex

import pytest

from pqueue.cli import build_parser
from tests.docs.markdown import (
    ROOT,
    Invocation,
    has_placeholder,
    invocations,
    markdown_files,
)

MAKEFILE = ROOT / "Makefile"
PLACEHOLDER_MARKER = "pq: placeholders"


def parse(parser: argparse.ArgumentParser, args: list[str]) -> str | None:
    """None if ``pq ARGS`` parses (nothing runs), else what argparse said."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            parser.parse_args(args)
    except SystemExit as exc:
        if exc.code == 0:  # --help, --version: parsed
            return None
        return err.getvalue().strip().splitlines()[-1]
    return None


def every_pq() -> list[Invocation]:
    return [i for path in markdown_files() for i in invocations(path, "pq")]


def test_the_docs_show_pq_commands_at_all() -> None:
    """The extraction finds the commands it should (a test that finds none passes nothing)."""
    found = every_pq()
    files = {i.command.block.path.name for i in found}
    assert len(found) > 60
    assert {"README.md", "semantics.md", "operations.md", "security.md"} <= files
    texts = {shlex.join(i.args) for i in found}
    assert "lease emails --max 2" in texts  # the tour
    assert any(t.startswith("token issue --tenant cluster --node-id") for t in texts)  # for ...; do
    assert any(t.startswith("enqueue acme/render") for t in texts)  # PQ_TOKEN=... pq


def test_every_pq_command_in_the_docs_parses() -> None:
    parser = build_parser()
    failures: list[str] = []
    for inv in every_pq():
        where = inv.command.where()
        if has_placeholder(inv.args):
            if inv.command.block.marker != PLACEHOLDER_MARKER:
                failures.append(
                    f"{where}: pq {shlex.join(inv.args)}: a placeholder in a block not marked "
                    f"<!-- {PLACEHOLDER_MARKER} -->"
                )
            continue
        if (error := parse(parser, inv.args)) is not None:
            failures.append(f"{where}: pq {shlex.join(inv.args)}: {error}")
    assert not failures, "\n".join(failures)


def test_a_bad_command_would_be_caught() -> None:
    """The parse check itself: a typo'd flag and a missing argument fail."""
    parser = build_parser()
    assert parse(parser, ["lease", "emails", "--max", "2"]) is None
    assert parse(parser, ["lease", "emails", "--maxx", "2"]) is not None
    assert parse(parser, ["nack", "emails", "2"]) is not None
    assert has_placeholder(["node", "...", "--tls-ca", "ca.pem"])
    assert has_placeholder(["--tls-ca", "ca.pem", "[--tls-cert", "me.pem]", "stats"])
    assert not has_placeholder(["node", "--peers", "1=…,2=…"])  # a value: parsed as it is


def makefile_targets() -> set[str]:
    return set(re.findall(r"^([A-Za-z0-9_.-]+):(?!=)", MAKEFILE.read_text(), re.M))


def test_every_make_target_the_docs_name_exists() -> None:
    targets = makefile_targets()
    assert {"cluster", "test"} <= targets
    failures: list[str] = []
    seen = 0
    for path in markdown_files():
        for inv in invocations(path, "make"):
            seen += 1
            for arg in inv.args:
                if not arg.startswith("-") and "=" not in arg and arg not in targets:
                    failures.append(f"{inv.command.where()}: make {arg}: no such target")
        # `make x` in the text, e.g. "run `make bench-scale`".
        for n, line in enumerate(path.read_text().split("\n"), start=1):
            for code in re.findall(r"`make ([^`]*)`", line):
                seen += 1
                for arg in shlex.split(code):
                    if not arg.startswith("-") and "=" not in arg and arg not in targets:
                        failures.append(f"{path.relative_to(ROOT)}:{n}: make {arg}: no such target")
    assert seen > 10
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("target", ["cluster", "test", "bench-scale"])
def test_the_make_targets_are_read_from_the_makefile(target: str) -> None:
    assert target in makefile_targets()


def test_every_placeholder_marker_marks_a_placeholder() -> None:
    """A marker on a block with nothing left out would hide nothing: stale, so it fails."""
    marked: dict[str, bool] = {}
    for inv in every_pq():
        block = inv.command.block
        if block.marker == PLACEHOLDER_MARKER:
            key = block.where()
            marked[key] = marked.get(key, False) or has_placeholder(inv.args)
    assert marked, "no block is marked: drop this test or the marker"
    assert all(marked.values()), [k for k, v in marked.items() if not v]
