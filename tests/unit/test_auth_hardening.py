"""Token checks an operator tunes (leeway, lifetime, revocation, rotation),
and log lines no caller can forge (issue 12, item 9)."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import jwt
import pytest

from pqueue.cli import build_parser
from pqueue.cli.node import _node_options
from pqueue.errors import UnauthenticatedError
from pqueue.node.auth import (
    PEER,
    RevokedTokens,
    Verifier,
    issue,
    node_of_subject,
    node_subject,
)
from pqueue.wire.logs import JsonFormatter, TextFormatter, escape
from pqueue.wire.tokens import TokenFile

SECRET = b"s" * 32
PQ = (sys.executable, "-m", "pqueue.cli")


def aged(ttl_s: float, issued_ago_s: float, **kwargs: object) -> str:
    """A token issued ``issued_ago_s`` ago that lived ``ttl_s``."""
    return issue(SECRET, "acme", ["producer"], ttl_s, now_s=time.time() - issued_ago_s, **kwargs)  # type: ignore[arg-type]


def test_the_leeway_is_a_few_seconds_by_default_and_configurable() -> None:
    just_expired = aged(600, 603)  # expired 3 s ago: within the default 5 s
    long_expired = aged(600, 620)  # 20 s ago: the old 30 s leeway let it through
    Verifier(SECRET).verify(just_expired)
    with pytest.raises(UnauthenticatedError, match="expired"):
        Verifier(SECRET).verify(long_expired)
    with pytest.raises(UnauthenticatedError, match="expired"):
        Verifier(SECRET, leeway_s=0).verify(just_expired)
    Verifier(SECRET, leeway_s=60).verify(long_expired)
    # Issued in the future (a clock ahead): nbf / iat within the leeway pass.
    ahead = issue(SECRET, "acme", ["producer"], 600, now_s=time.time() + 3)
    Verifier(SECRET).verify(ahead)
    with pytest.raises(UnauthenticatedError):
        Verifier(SECRET, leeway_s=0).verify(ahead)
    with pytest.raises(ValueError, match="leeway"):
        Verifier(SECRET, leeway_s=-1)


def test_a_token_living_longer_than_the_maximum_is_refused() -> None:
    strict = Verifier(SECRET, max_lifetime_s=3600)
    strict.verify(aged(3600, 0))
    with pytest.raises(UnauthenticatedError, match="auth-max-token-lifetime-s"):
        strict.verify(aged(365 * 86400, 0))
    # Without iat, what it has left counts.
    no_iat = jwt.encode(
        {"tenant": "acme", "roles": ["producer"], "exp": int(time.time()) + 7200}, SECRET, "HS256"
    )
    with pytest.raises(UnauthenticatedError, match="longer than"):
        strict.verify(no_iat)
    Verifier(SECRET).verify(no_iat)  # no maximum: any lifetime


def test_revoked_token_ids_are_refused_once_listed_even_when_cached(tmp_path: Path) -> None:
    listed = tmp_path / "revoked"
    now = [0.0]
    verifier = Verifier(SECRET, revoked=RevokedTokens(listed, clock_s=lambda: now[0]))
    tok = issue(SECRET, "acme", ["producer"], 600, token_id="t-1")
    other = issue(SECRET, "acme", ["producer"], 600)
    principal = verifier.verify(tok)  # no file yet: nothing revoked
    assert principal.token_id == "t-1"
    listed.write_text("# revoked by ops\nt-1\n")
    now[0] += 2  # the file is looked at again after a second
    with pytest.raises(UnauthenticatedError, match="revoked"):
        verifier.verify(tok)  # cached, and still refused
    with pytest.raises(UnauthenticatedError, match="revoked"):
        verifier.still_valid(principal)  # a stream opened before: ended
    verifier.verify(other)
    listed.write_text("")
    now[0] += 2
    verifier.verify(tok)


def test_a_token_file_is_re_read_when_it_changes(tmp_path: Path) -> None:
    path = tmp_path / "peer-token"
    path.write_text("first\n")
    source = TokenFile(path, check_interval_s=0)
    assert source() == "first"
    tmp = tmp_path / "peer-token.new"
    tmp.write_text("second\n")
    os.replace(tmp, path)  # how operators (and Kubernetes) rotate a file
    assert source() == "second"
    path.unlink()
    assert source() == "second"  # gone: the last one is kept, not nothing
    with pytest.raises(ValueError, match="cannot read"):
        TokenFile(tmp_path / "missing")


def test_a_token_file_is_looked_at_at_most_once_an_interval(tmp_path: Path) -> None:
    path = tmp_path / "peer-token"
    path.write_text("first\n")
    source = TokenFile(path, check_interval_s=3600)
    path.write_text("second, longer\n")
    assert source() == "first"  # asked on every call: no stat until the interval passes
    source.check_interval_s = 0
    assert source() == "second, longer"


def test_node_subjects() -> None:
    assert node_of_subject(node_subject(3)) == 3
    for bad in ("node:", "node:0", "node:-1", "node:1x", "node:٣", "n3", ""):
        assert node_of_subject(bad) is None


def test_pq_token_issue_makes_per_node_peer_tokens(tmp_path: Path) -> None:
    key = tmp_path / "secret"
    key.write_bytes(SECRET)
    base = (*PQ, "token", "issue", "--tenant", "cluster", "--key-file", str(key))
    out = subprocess.run(
        (*base, "--node-id", "2", "--token-id", "n2-2026"), capture_output=True, check=True
    )
    principal = Verifier(SECRET).verify(out.stdout.decode().strip())
    assert (principal.subject, principal.roles, principal.node_id) == (
        "node:2",
        frozenset({PEER}),
        2,
    )
    assert principal.token_id == "n2-2026"
    shared = subprocess.run((*base, "--role", "peer"), capture_output=True)
    assert shared.returncode == 2  # a refused command line (docs/operations.md)
    assert b"--node-id" in shared.stderr


def node_args(tmp_path: Path, *extra: str) -> list[str]:
    key = tmp_path / "secret"
    key.write_bytes(SECRET)
    return ["node", "--data-dir", str(tmp_path / "d"), "--auth-key-file", str(key), *extra]


def test_node_flags_reach_the_verifier_and_a_wrong_peer_token_stops_the_start(
    tmp_path: Path,
) -> None:
    revoked = tmp_path / "revoked"
    args = build_parser().parse_args(
        node_args(
            tmp_path,
            "--auth-leeway-s",
            "2",
            "--auth-max-token-lifetime-s",
            "86400",
            "--revoked-tokens-file",
            str(revoked),
        )
    )
    verifier = _node_options(args).server.verifier
    assert verifier is not None
    assert (verifier.leeway_s, verifier.max_lifetime_s) == (2, 86400)
    assert verifier.revoked is not None
    assert verifier.revoked.path == revoked
    assert build_parser().parse_args(node_args(tmp_path)).auth_leeway_s == 5
    # Node 1 started with node 2's token (or a shared one) refuses to run.
    peers = "1=127.0.0.1:1,2=127.0.0.1:2"
    for subject in ("node:2", ""):
        tok = tmp_path / "peer-token"
        tok.write_text(issue(SECRET, "cluster", [PEER], 600, subject=subject))
        args = build_parser().parse_args(
            node_args(tmp_path, "--node-id", "1", "--peers", peers, "--peer-token-file", str(tok))
        )
        with pytest.raises(ValueError, match="node:1"):
            _node_options(args)
    tok.write_text(issue(SECRET, "cluster", [PEER], 600, subject="node:1"))
    args = build_parser().parse_args(
        node_args(tmp_path, "--node-id", "1", "--peers", peers, "--peer-token-file", str(tok))
    )
    assert _node_options(args).server.peer_token is not None


FORGED = "x\n2026-01-01 00:00:00.000 [ERROR] n1/pqueue.v1.Queue/Ack: forged\x1b[31m\u2028red\x85"


def record(msg: str, *args: object, exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError(FORGED)
        except ValueError:
            exc_info = sys.exc_info()
    rec = logging.LogRecord("pqueue.requests", logging.ERROR, __file__, 1, msg, args, exc_info)
    rec.claimed_client = FORGED
    return rec


def test_text_lines_escape_what_callers_wrote() -> None:
    out = TextFormatter("n1").format(record("refused: %s", FORGED, exc=True))
    first, *rest = out.split("\n")
    assert "forged" in first
    assert "\\n2026-01-01" in first
    assert "\\x1b[31m" in first
    assert "\x1b" not in out
    assert "\u2028" not in out
    assert "\x85" not in out
    assert rest
    assert all(line.startswith("    ") for line in rest)
    assert escape("plain text: ok") == "plain text: ok"
    assert escape("a\tb\r\n") == "a\\tb\\r\\n"


def test_json_lines_escape_messages_and_extras() -> None:
    out = JsonFormatter("n1").format(record("refused: %s", FORGED))
    assert "\n" not in out
    assert "\u2028" not in out
    assert "\x85" not in out
    line = json.loads(out)
    assert "\x1b" not in line["message"]
    assert "\\x1b[31m" in line["message"]
    assert "\n" not in line["claimed_client"]


def test_a_handler_on_the_root_logger_writes_one_line_per_record() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(TextFormatter("n1"))
    log = logging.getLogger("pqueue.test_forgery")
    log.addHandler(handler)
    log.propagate = False
    try:
        log.warning("queue %r and %s", FORGED, FORGED)
    finally:
        log.removeHandler(handler)
        log.propagate = True
    assert stream.getvalue().count("\n") == 1
