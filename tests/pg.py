"""PostgreSQL for tests: the DSN from ``PQ_TEST_PG_DSN``, throwaway schemas.

Without ``PQ_TEST_PG_DSN`` the PostgreSQL tests skip, saying so (a skip is
never a pass: ``.ci/run`` sets it, so CI runs them).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from tests.faults.proxy import Proxy

DSN_ENV = "PQ_TEST_PG_DSN"
SKIP_REASON = (
    f"PostgreSQL tests need {DSN_ENV} (e.g. postgresql://postgres@127.0.0.1:5432/test); "
    ".ci/run sets it"
)


def dsn() -> str:
    """The test PostgreSQL, or skip the test."""
    value = os.environ.get(DSN_ENV, "")
    if not value:
        pytest.skip(SKIP_REASON)
    return value


def new_schema(prefix: str = "pq_test") -> str:
    """A schema name no other test uses."""
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


async def drop_schemas(*schemas: str) -> None:
    """Drop test schemas (and everything in them)."""
    conn = await asyncpg.connect(os.environ[DSN_ENV])
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
