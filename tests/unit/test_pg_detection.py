"""``tests.pg.find``: which PostgreSQL the suite tests against, and why."""

from __future__ import annotations

import os
import socket

import pytest

from tests import pg


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then let go)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_default_that_does_not_answer_is_none_with_the_reason() -> None:
    default = f"postgresql://postgres@127.0.0.1:{closed_port()}/test"
    found, why = pg.find({}, default, timeout_s=2.0)
    assert found is None
    assert why.startswith(f"PostgreSQL tests skip: PQ_TEST_PG_DSN is unset and {default}")
    assert "did not answer (" in why
    assert why.endswith("start PostgreSQL there or set PQ_TEST_PG_DSN")


def test_a_default_that_answers_is_used() -> None:
    local = pg.dsn()  # this session's PostgreSQL (skips without one)
    found, why = pg.find({}, local, timeout_s=5.0)
    assert found == local
    assert why == f"PostgreSQL: {local} (found at the default; PQ_TEST_PG_DSN unset)"


def test_the_variable_wins_as_it_is_and_off_opts_out() -> None:
    unreachable = f"postgresql://postgres@127.0.0.1:{closed_port()}/test"
    assert pg.find({"PQ_TEST_PG_DSN": unreachable}, pg.DEFAULT_DSN) == (
        unreachable,
        f"PostgreSQL: {unreachable} (from PQ_TEST_PG_DSN)",
    )
    found, why = pg.find({"PQ_TEST_PG_DSN": "off"}, pg.DEFAULT_DSN)
    assert (found, why) == (None, "PostgreSQL tests skip: PQ_TEST_PG_DSN=off")


def test_the_session_header_says_which(pytestconfig: pytest.Config) -> None:
    lines = pytestconfig.hook.pytest_report_header(
        config=pytestconfig, start_path=pytestconfig.rootpath
    )
    line = pg.use(os.environ)  # decided once, at session start
    assert line in lines
    assert line.startswith(("PostgreSQL: ", "PostgreSQL tests skip: "))


def test_none_found_skips_or_under_require_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """CI sets PQ_TEST_REQUIRE_PG: a PostgreSQL test that finds none fails there."""
    monkeypatch.setattr(pg, "_found", (None, "PostgreSQL tests skip: nothing here"))
    monkeypatch.delenv(pg.REQUIRE_ENV, raising=False)
    with pytest.raises(pytest.skip.Exception, match="nothing here"):
        pg.dsn()
    monkeypatch.setenv(pg.REQUIRE_ENV, "1")
    with pytest.raises(pytest.fail.Exception, match="PQ_TEST_REQUIRE_PG is set"):
        pg.dsn()
