"""The ``pq`` parser itself: global options anywhere, help on every option,
``--version``, refused command lines in the ``error: CODE: message`` form."""

from __future__ import annotations

import argparse
import contextlib
import io
import re
from pathlib import Path

import pytest

from pqueue.cli import _commands, build_parser, main


def _all_parsers(parser: argparse.ArgumentParser) -> list[tuple[str, argparse.ArgumentParser]]:
    out = [(parser.prog, parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                out.extend(_all_parsers(child))
    return out


def test_every_option_and_argument_has_help() -> None:
    missing = [
        f"{prog} {action.option_strings[0] if action.option_strings else action.dest}"
        for prog, parser in _all_parsers(build_parser())
        for action in parser._actions
        if not isinstance(action, argparse._SubParsersAction)
        and action.help != argparse.SUPPRESS
        and not (action.help or "").strip()
    ]
    assert missing == []


def test_help_shows_defaults() -> None:
    parser = build_parser()
    [enqueue] = [p for p in _commands(parser) if p.prog == "pq enqueue"]
    text = enqueue.format_help()
    assert re.search(r"--priority \S+\s+lower is served first \(default: 0\)", text)
    assert "--endpoint HOST:PORT" in text  # the global options, after the command too
    assert "(default: table)" in text


@pytest.mark.parametrize(
    "argv",
    [
        ["-o", "json", "--timeout-s", "3", "cluster", "status"],
        ["cluster", "status", "-o", "json", "--timeout-s", "3"],
        ["--output", "table", "cluster", "status", "--output", "json", "--timeout-s", "3"],
    ],
)
def test_global_options_before_or_after_the_command(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    assert (args.output, args.timeout_s) == ("json", 3.0)


def test_an_option_given_before_only_keeps_its_value() -> None:
    args = build_parser().parse_args(["--endpoint", "h:1", "stats"])
    assert (args.endpoint, args.output) == ("h:1", "table")


def test_a_program_s_own_option_wins_after_its_command(tmp_path: object) -> None:
    # pq worker --timeout-s is the job's time limit, the global one the call deadline.
    args = build_parser().parse_args(
        ["--timeout-s", "4", "worker", "--queue", "q", "--exec", "true", "--timeout-s", "9"]
    )
    assert (args.timeout_s, args.job_timeout_s) == (4.0, 9.0)


@pytest.mark.parametrize(
    "program", [["node", "--data-dir", "d"], ["balancer", "run", "--backends", "h:1"]]
)
def test_a_program_s_own_option_given_before_its_command_is_not_dropped(
    program: list[str],
) -> None:
    """``pq --tls-cert C node`` is the node's certificate, not silently none
    (a node run without the TLS it was given); after the command still wins."""
    parse = build_parser().parse_args
    args = parse(["--tls-cert", "c.pem", "--tls-key", "k.pem", *program])
    assert (args.tls_cert, args.tls_key, args.tls_ca) == (Path("c.pem"), Path("k.pem"), None)
    args = parse(["--tls-cert", "c.pem", *program, "--tls-cert", "own.pem"])
    assert args.tls_cert == Path("own.pem")
    assert parse(program).tls_cert is None


def _run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = int(exc.code or 0)
    return code, out.getvalue(), err.getvalue()


def test_version() -> None:
    code, out, _ = _run(["--version"])
    assert code == 0
    assert re.fullmatch(r"pq \d+\.\d+\.\d+\S*\n", out)


def test_a_refused_command_line_is_invalid_argument_exit_2() -> None:
    code, _, err = _run(["enqueue", "q", "x", "--priority", "2147483648"])
    assert code == 2
    assert err.splitlines()[-1] == (
        "error: INVALID_ARGUMENT: argument --priority: "
        "must be from -2147483648 to 2147483647, not 2147483648"
    )
    code, _, err = _run(["node", "--data-dir", "unused", "--mix-wait-ms", "1001"])
    assert code == 2
    assert err.splitlines()[-1] == (
        "error: INVALID_ARGUMENT: argument --mix-wait-ms: must be between 0 (never) and 1000"
    )
    code, _, err = _run(["node", "--data-dir", "unused", "--open-entries", "0"])
    assert code == 2
    assert err.splitlines()[-1] == (
        "error: INVALID_ARGUMENT: argument --open-entries: must be from 1 to 16, not 0"
    )
    for argv in (["node", "--data-dir", "unused"], ["balancer", "run", "--backends", "h:1"]):
        code, _, err = _run([*argv, "--gc-young", "0"])
        assert code == 2
        assert err.splitlines()[-1] == (
            "error: INVALID_ARGUMENT: argument --gc-young: must be from 100 to 10000000, not 0"
        )
    code, _, err = _run(["job", "q", "-1"])
    assert (code, err) == (2, "error: INVALID_ARGUMENT: JOB_ID: must be 1 or more, not -1\n")


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        (["token", "issue", "--tenant", "t"], "error: INVALID_ARGUMENT: --role: give --role"),
        (
            ["token", "issue", "--tenant", "t", "--role", "peer"],
            "error: INVALID_ARGUMENT: --role: a peer token names its node",
        ),
        (
            ["token", "issue", "--tenant", "t", "--node-id", "1", "--subject", "x"],
            "error: INVALID_ARGUMENT: --subject: ",
        ),
        (
            ["token", "issue", "--tenant", "t", "--role", "admin", "--ttl", "soon"],
            "error: INVALID_ARGUMENT: ",
        ),
        (["node", "--data-dir", "{tmp}", "--tls-ca", "{tmp}/ca.pem"], "error: INVALID_ARGUMENT: "),
    ],
)
def test_a_program_s_own_check_is_invalid_argument_exit_2(
    argv: list[str], line: str, tmp_path: Path
) -> None:
    """What says INVALID_ARGUMENT was refused before anything ran: exit 2,
    like every other refused command line (1 is for a call that failed)."""
    key = tmp_path / "key"
    key.write_bytes(b"k" * 32)
    if argv[0] == "token":
        argv = [*argv, "--key-file", str(key)]
    code, out, err = _run([a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert (code, out, err.count("\n")) == (2, "", 1), err
    assert err.startswith(line), err


def test_the_defaults_pq_queue_create_shows_are_the_node_s() -> None:
    from pqueue.cli import commands
    from pqueue.core import limits
    from pqueue.v1 import queue_pb2 as pb

    effective = limits.effective_config(pb.QueueConfig())
    assert {name: getattr(effective, name) for name in commands.CREATE_DEFAULTS} == (
        commands.CREATE_DEFAULTS
    )
    assert commands.MAX_BATCH_JOBS == limits.MAX_BATCH_JOBS


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_enqueue_file_progress_is_a_bar_on_a_terminal_and_lines_elsewhere() -> None:
    from pqueue.cli.produce import Progress

    tty = _Terminal()
    bar = Progress(4, tty)
    bar.show(2)
    bar.show(4)
    bar.close()
    assert tty.getvalue() == (f"\r[{'#' * 15}{'.' * 15}] enqueued 2/4\r[{'#' * 30}] enqueued 4/4\n")
    plain = io.StringIO()
    lines = Progress(4, plain)
    lines.show(2)
    lines.show(4)
    lines.close()
    assert plain.getvalue() == "enqueued 2/4\nenqueued 4/4\n"


def test_json_lines_read_as_jobs() -> None:
    from pqueue.cli.failure import UsageError
    from pqueue.cli.produce import read_specs

    text = io.StringIO(
        '{"to": "a"}\n'
        "\n"
        '{"payload": {"k": 1}, "priority": 3, "not_before": "2100-01-01T00:00:00Z"}\n'
        '{"payload": "plain", "group": "g"}\n'
    )
    specs = read_specs(text, "f", {"priority": 7})
    assert [n for n, _ in specs] == [1, 3, 4]
    first, second, third = (s for _, s in specs)
    assert (first.payload, first.priority) == (b'{"to": "a"}', 7)
    assert (second.payload, second.priority, second.not_before_ms) == (
        b'{"k": 1}',
        3,
        4102444800000,
    )
    assert (third.payload, third.group) == (b"plain", "g")
    with pytest.raises(UsageError, match=r"^f line 2: priority: must be from"):
        read_specs(io.StringIO('"ok"\n{"payload": 1, "priority": 2147483648}\n'), "f", {})


def test_one_idempotency_key_for_a_whole_file_is_refused(tmp_path: Path) -> None:
    """Each line's defaults are the flags: one key for every line would make
    every job after the first a duplicate of it."""
    path = tmp_path / "jobs.jsonl"
    path.write_text('"a"\n"b"\n')
    argv = ["--endpoint", "127.0.0.1:1", "enqueue", "q", "--file", str(path)]
    code, out, err = _run([*argv, "--idempotency-key", "k"])
    assert (code, out) == (2, "")
    assert err == (
        "error: INVALID_ARGUMENT: --idempotency-key: one key for every line of --file "
        "would make each job after the first a duplicate; give each line its own "
        '"idempotency_key"\n'
    )
