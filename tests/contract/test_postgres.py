"""What only the PostgreSQL store promises: its settings, group commit, riding
out an outage, and the operators' ``jobs`` table."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator

import asyncpg
import pytest

from consensus.messages import Record
from pqueue.errors import StorageError
from pqueue.storage import postgres
from pqueue.storage.jobrow import JobRow
from pqueue.storage.postgres import PostgresStorage
from tests import pg
from tests.faults.proxy import Proxy


@pytest.fixture
async def schema() -> AsyncIterator[str]:
    pg.dsn()  # skips without PostgreSQL
    name = pg.new_schema()
    try:
        yield name
    finally:
        await pg.drop_schemas(name)


@pytest.fixture
async def store(schema: str) -> AsyncIterator[PostgresStorage]:
    s = PostgresStorage(pg.dsn(), schema)
    await s.open()
    try:
        yield s
    finally:
        await s.close()


async def test_it_commits_synchronously_in_its_own_schema(store: PostgresStorage) -> None:
    await store.persist((1, 1), [Record(1, (1, 1), b"x")], 1, None)
    assert store._pool is not None
    async with store._pool.acquire() as conn:
        # Set by the store itself, whatever the server's default.
        setting = await conn.fetchrow(
            "SELECT setting, source FROM pg_settings WHERE name = 'synchronous_commit'"
        )
        assert setting is not None
        assert (setting["setting"], setting["source"]) == ("on", "client")
        assert await conn.fetchval("SELECT current_schema()") == store.schema
    conn2 = await asyncpg.connect(pg.dsn())
    try:
        versions = await conn2.fetch(f"SELECT version FROM {store.schema}.schema_migrations")
        assert [r["version"] for r in versions] == [1, 2, 3, 4, 5, 6]
        assert await conn2.fetchval(f"SELECT count(*) FROM {store.schema}.records") == 1
    finally:
        await conn2.close()


async def test_waiting_writes_share_one_transaction(store: PostgresStorage) -> None:
    before = store.transactions
    await asyncio.gather(
        *(store.persist(None, [Record(i, (1, 1), b"v")], None, None) for i in range(1, 101))
    )
    assert len((await store.load_acceptor()).records) == 100
    assert store.transactions - before < 50  # group commit: far fewer than 100


async def test_reopening_migrates_nothing_twice(schema: str) -> None:
    for _ in range(2):
        s = PostgresStorage(pg.dsn(), schema)
        await s.open()
        await s.close()


async def test_closing_lets_the_schema_go_at_once(schema: str) -> None:
    # A restart (or a test) opens the schema again straight after closing it:
    # the advisory lock must be gone when close() returns, not a moment later
    # when the server notices the old session's socket closed.
    checker = await asyncpg.connect(pg.dsn())

    async def held(name: str) -> int:
        # A bigint key is held as classid (its high 32 bits), objid (its low
        # 32 bits) and objsubid 1, in this database.
        count: int = await checker.fetchval(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"
            " AND objsubid = 1 AND database = (SELECT oid FROM pg_database"
            " WHERE datname = current_database())"
            f" AND (classid::bigint << 32) | objid::bigint = {postgres.LOCK_KEY_SQL}",
            name,
        )
        return count

    try:
        # Closing without the unlock leaves it held at the next query often,
        # not always (the old session's exit races it): 30 rounds find it.
        for _ in range(30):
            s = PostgresStorage(pg.dsn(), schema)
            await s.open()
            assert await held(s._lock_name()) == 1  # the query does find it
            await s.close()
            assert await held(s._lock_name()) == 0
    finally:
        await checker.close()


async def test_an_outage_holds_writes_and_loses_nothing(schema: str) -> None:
    async with pg.through_a_proxy() as (proxy, via_proxy):
        await _ride_out_an_outage(proxy, PostgresStorage(via_proxy, schema, retry_max_s=0.2))


async def _ride_out_an_outage(proxy: Proxy, store: PostgresStorage) -> None:
    await store.open()
    try:
        await store.persist((1, 1), [Record(1, (1, 1), b"before")], 1, None)
        proxy.cut()  # PostgreSQL goes away
        held = asyncio.create_task(store.persist(None, [Record(2, (1, 1), b"during")], 2, None))
        for _ in range(100):
            if not store.available:
                break
            await asyncio.sleep(0.02)
        assert not store.available  # the node refuses new writes meanwhile
        assert not held.done()  # and this one is not acknowledged
        proxy.heal()
        await asyncio.wait_for(held, 10)
        assert store.available
        state = await store.load_acceptor()
        assert [(r.slot, r.value) for r in state.records] == [(1, b"before"), (2, b"during")]
        assert state.commit_index == 2
    finally:
        await store.close()


def job(job_id: int, state: str = "ready", queue: str = "q") -> JobRow:
    return JobRow(
        id=job_id,
        queue=queue,
        priority=job_id % 3,
        payload=b"p%d" % job_id,
        state=state,
        attempts=0,
        group="",
        idempotency_key="",
        created_at_ms=1_700_000_000_000 + job_id,
        ready_at_ms=1_700_000_000_000 + job_id,
        lease_expires_at_ms=None,
        last_error=None,
    )


async def test_the_jobs_table_moves_with_the_applied_index(store: PostgresStorage) -> None:
    shared = dataclasses.replace(job(3), tenant="beta")
    await store.record_applied(5, [job(1), job(2), shared], [], replace_all=True)
    assert store._pool is not None
    async with store._pool.acquire() as conn:
        assert await conn.fetchval("SELECT tenant FROM jobs WHERE id = 3") == "beta"
    await store.record_applied(6, [job(2, "leased")], [3], replace_all=False)
    async with store._pool.acquire() as conn:
        rows = await conn.fetch("SELECT id, state FROM jobs ORDER BY id")
        assert [(r["id"], r["state"]) for r in rows] == [(1, "ready"), (2, "leased")]
        assert await conn.fetchval("SELECT applied_index FROM applied") == 6
    await store.record_applied(2, [job(7)], [], replace_all=True)  # a restore: back in time
    async with store._pool.acquire() as conn:
        assert [r["id"] for r in await conn.fetch("SELECT id FROM jobs")] == [7]
        assert await conn.fetchval("SELECT applied_index FROM applied") == 2


async def test_any_job_fits_the_jobs_table(store: PostgresStorage) -> None:
    odd = JobRow(
        id=1,
        queue="q",
        priority=0,
        payload=b"\x00\xff",
        state="delayed",
        attempts=0,
        group="a\x00b",  # PostgreSQL text cannot hold NUL
        idempotency_key="k\x00",
        created_at_ms=0,
        ready_at_ms=2**62,  # beyond any timestamptz
        lease_expires_at_ms=None,
        last_error="bad\x00byte",
    )
    await store.record_applied(1, [odd], [], replace_all=False)
    assert store._pool is not None
    async with store._pool.acquire() as conn:
        row = await conn.fetchrow('SELECT "group", ready_at, last_error FROM jobs')
        assert row is not None
        assert row["group"] == "a\\x00b"
        assert row["ready_at"].year == 9999
        assert row["last_error"] == "bad\\x00byte"


async def test_the_jobs_columns_are_the_row_fields_in_order(store: PostgresStorage) -> None:
    """Rows are written positionally from ``JobRow``'s fields: a field added
    without its column (or in another place) fails here."""
    assert store._pool is not None
    async with store._pool.acquire() as conn:
        columns = await conn.fetch(
            "SELECT column_name FROM information_schema.columns "
            "WHERE table_schema = $1 AND table_name = 'jobs' ORDER BY ordinal_position",
            store.schema,
        )
    fields = [f.name for f in dataclasses.fields(JobRow)]
    assert [c["column_name"] for c in columns] == [f.removesuffix("_ms") for f in fields]


def test_schema_names_are_what_postgresql_keeps() -> None:
    for bad in ("PQ_N1", "pq-n1", "1pq", "pq_" + "x" * 61, "pqé", ""):
        with pytest.raises(ValueError, match="schema"):
            PostgresStorage("postgresql://x@h/db", bad)
    PostgresStorage("postgresql://x@h/db", "pq_" + "x" * 60)  # 63: the longest


async def test_a_node_that_lost_its_lock_cannot_write_after_another_took_over(
    schema: str,
) -> None:
    first = PostgresStorage(pg.dsn(), schema, retry_max_s=0.05)
    await first.open()
    try:
        await first.persist((5, 1), [Record(1, (5, 1), b"first")], 1, None)
        admin = await asyncpg.connect(pg.dsn())
        try:  # its lock session dies unseen (a partition the server noticed first)
            assert first._lock_conn is not None
            pid = first._lock_conn.get_server_pid()
            await admin.execute("SELECT pg_terminate_backend($1)", pid)
            # pg_terminate_backend only signals: wait until the backend (and
            # its advisory lock) is gone, or the second open may find it held.
            for _ in range(200):
                gone = await admin.fetchval(
                    "SELECT count(*) = 0 FROM pg_stat_activity WHERE pid = $1", pid
                )
                if gone:
                    break
                await asyncio.sleep(0.025)
        finally:
            await admin.close()
        second = PostgresStorage(pg.dsn(), schema)
        await second.open()  # takes the lock, bumps the epoch
        try:
            await second.persist((6, 2), [Record(2, (6, 2), b"second")], 2, None)
            with pytest.raises(StorageError, match="another node"):
                await asyncio.wait_for(
                    first.persist((7, 1), [Record(3, (7, 1), b"stale")], 3, None), 10
                )
            state = await second.load_acceptor()
            assert state.promised == (6, 2)
            assert [r.slot for r in state.records] == [1, 2]  # nothing from the stale node
        finally:
            await second.close()
    finally:
        await first.close()


async def test_ended_jobs_show_when_why_their_result_and_expiry(store: PostgresStorage) -> None:
    waiting = dataclasses.replace(job(1), expires_at_ms=1_700_000_100_000)
    await store.record_applied(1, [waiting], [], replace_all=True)
    expired = dataclasses.replace(
        job(1, "dead"), finished_at_ms=1_700_000_100_000, reason="expired"
    )
    done = dataclasses.replace(
        job(2, "completed"), finished_at_ms=1_700_000_000_500, result=b"\x00ok", reason="n\x00te"
    )
    await store.record_applied(2, [expired, done], [], replace_all=False)  # an update, an insert
    assert store._pool is not None
    async with store._pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT id, state, extract(epoch FROM finished_at) * 1000 AS finished, result, "
            "reason, extract(epoch FROM expires_at) * 1000 AS expires FROM jobs ORDER BY id"
        )
    got = [
        (r["id"], r["state"], int(r["finished"]), r["result"], r["reason"], r["expires"])
        for r in rows
    ]
    assert got == [
        (1, "dead", 1_700_000_100_000, b"", "expired", None),
        (2, "completed", 1_700_000_000_500, b"\x00ok", "n\\x00te", None),
    ]


async def test_migration_6_keeps_the_rows_of_an_older_jobs_table(
    schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    older = [m for m in postgres.MIGRATIONS if m[0] < 6]
    with monkeypatch.context() as patch:
        patch.setattr(postgres, "MIGRATIONS", older)
        s = PostgresStorage(pg.dsn(), schema)
        await s.open()
        assert s._pool is not None
        async with s._pool.acquire() as conn:
            await conn.execute(
                "INSERT INTO jobs VALUES (9, 'q', 0, '\\x00'::bytea, 'dead', 5, '', '', now(), "
                "now(), NULL, 'boom', 'acme')"
            )
        await s.close()
    s = PostgresStorage(pg.dsn(), schema)  # this release: migrates to 6
    await s.open()
    try:
        assert s._pool is not None
        async with s._pool.acquire() as conn:
            row = await conn.fetchrow("SELECT * FROM jobs WHERE id = 9")
        assert row is not None
        assert (row["last_error"], row["tenant"]) == ("boom", "acme")
        assert (row["finished_at"], row["result"], row["reason"], row["expires_at"]) == (
            None,
            b"",
            "",
            None,
        )
    finally:
        await s.close()
