"""PostgreSQL for tests: the DSN from ``PQ_TEST_PG_DSN``, throwaway schemas.

Without ``PQ_TEST_PG_DSN`` the PostgreSQL tests skip, saying so (a skip is
never a pass: ``.ci/run`` sets it, so CI runs them).
"""

from __future__ import annotations

import os
import uuid

import asyncpg
import pytest

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
