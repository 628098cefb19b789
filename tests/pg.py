"""PostgreSQL for tests: which one (``find``), throwaway schemas.

The suite tests against ``PQ_TEST_PG_DSN`` when it is set (``off`` opts
out). Unset, it tries ``DEFAULT_DSN`` (the PostgreSQL a
developer runs locally, trust auth) once at session start, with a short
connect timeout, and uses it if it answers: ``make test`` on a fresh clone
runs the PostgreSQL tests too. The session's header says which PostgreSQL
it tests against, or why the PostgreSQL tests skip (a skip is never a pass:
``.ci/run`` sets no DSN, so CI finds the default, and sets
``PQ_TEST_REQUIRE_PG`` so that a PostgreSQL it did not find fails).
``tests/conftest.py`` calls ``use`` once; tests call ``dsn()``.
"""

from __future__ import annotations

import asyncio
import os
import threading
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from tests.faults.proxy import Proxy

DSN_ENV = "PQ_TEST_PG_DSN"
#: Tried when ``PQ_TEST_PG_DSN`` is unset.
DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/test"
#: How long the try at ``DEFAULT_DSN`` may take (a closed port answers at once).
PROBE_TIMEOUT_S = 2.0

#: This session's PostgreSQL (None: the PostgreSQL tests skip) and why.
_found: tuple[str | None, str] | None = None


def find(
    env: Mapping[str, str], default: str = DEFAULT_DSN, timeout_s: float = PROBE_TIMEOUT_S
) -> tuple[str | None, str]:
    """The DSN to test PostgreSQL against (None: none) and a line saying why.

    ``PQ_TEST_PG_DSN`` in ``env`` wins as it is (a wrong one fails the
    tests, as it should in CI); ``off`` means none. Unset, ``default`` if a
    connection to it answers ``SELECT 1`` within ``timeout_s``.
    """
    given = env.get(DSN_ENV, "")
    if given.lower() == "off":
        return None, f"PostgreSQL tests skip: {DSN_ENV}=off"
    if given:
        return given, f"PostgreSQL: {given} (from {DSN_ENV})"
    problem = _probe(default, timeout_s)
    if problem is None:
        return default, f"PostgreSQL: {default} (found at the default; {DSN_ENV} unset)"
    return None, (
        f"PostgreSQL tests skip: {DSN_ENV} is unset and {default} did not answer "
        f"({problem}); start PostgreSQL there or set {DSN_ENV}"
    )


def _probe(dsn: str, timeout_s: float) -> str | None:
    """Why ``dsn`` does not answer (None: it does). Runs its own event loop
    in a thread of its own, so it works whatever loop the caller has."""
    outcome: list[str | None] = []

    async def connect() -> None:
        conn = await asyncpg.connect(dsn, timeout=timeout_s)
        try:
            await conn.fetchval("SELECT 1", timeout=timeout_s)
        finally:
            await conn.close(timeout=timeout_s)

    def run() -> None:
        try:
            # One bound for the whole try (connect and query), as documented.
            asyncio.run(asyncio.wait_for(connect(), timeout_s))
        except Exception as exc:  # any failure is the answer: "not there"
            outcome.append(f"{type(exc).__name__}: {exc}".rstrip(": "))
        else:
            outcome.append(None)

    thread = threading.Thread(target=run, name="pq-test-pg-probe")
    thread.start()
    thread.join()
    return outcome[0]


def use(env: Mapping[str, str]) -> str:
    """Decide this session's PostgreSQL (once); the line that says which.
    Found at the default, it goes into ``os.environ`` too, for the
    processes tests start and what reads the variable itself."""
    global _found
    if _found is None:
        _found = find(env)
        if _found[0] is not None and not os.environ.get(DSN_ENV):
            os.environ[DSN_ENV] = _found[0]
    return _found[1]


#: Set (``.ci/run`` sets it), a PostgreSQL test without a PostgreSQL fails.
REQUIRE_ENV = "PQ_TEST_REQUIRE_PG"


def dsn() -> str:
    """The test PostgreSQL, or skip the test (saying why; fail under
    ``PQ_TEST_REQUIRE_PG``, where a skip would pass for a pass)."""
    found = _found if _found is not None else find(os.environ)
    if found[0] is None:
        if os.environ.get(REQUIRE_ENV):
            pytest.fail(f"{found[1]} ({REQUIRE_ENV} is set)")
        pytest.skip(found[1])
    return found[0]


def configured() -> str | None:
    """The test PostgreSQL, or None (for a test that runs either way)."""
    found = _found if _found is not None else find(os.environ)
    return found[0]


def new_schema(prefix: str = "pq_test") -> str:
    """A schema name no other test uses."""
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


async def drop_schemas(*schemas: str) -> None:
    """Drop test schemas (and everything in them)."""
    conn = await asyncpg.connect(dsn())
    try:
        for schema in schemas:
            await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    finally:
        await conn.close()


@asynccontextmanager
async def through_a_proxy() -> AsyncIterator[tuple[Proxy, str]]:
    """A cuttable TCP proxy in front of the test PostgreSQL, and a DSN through it."""
    url = urlsplit(dsn())
    proxy = Proxy(url.port or 5432)
    await proxy.start()
    try:
        yield proxy, urlunsplit(url._replace(netloc=f"{url.username}@127.0.0.1:{proxy.port}"))
    finally:
        await proxy.stop()
