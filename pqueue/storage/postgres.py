"""PostgreSQL storage through asyncpg: one schema per node, group commit.

Tables in the node's schema (created and migrated on open, versioned in
``schema_migrations``): ``acceptor`` (promised ballot, commit hint),
``records`` (one per slot: ballot, value, chosen flag, CRC), ``snapshot``
(the latest one), ``applied`` (the index the ``jobs`` table reflects) and
``jobs`` (one row per live job, for operators' SQL).

Durability: every transaction commits with ``synchronous_commit = on``, so
a write returns only once PostgreSQL has flushed it. All writes go through
one writer task that packs every write waiting at that moment into one
transaction (group commit). Every write is idempotent (upserts, monotonic
maxima, "only a newer snapshot"), so when PostgreSQL goes away mid-commit
the writer retries the same transaction until it comes back: the node's
log waits, ``available`` is false (its callers are told UNAVAILABLE), and
nothing acknowledged is lost.

A session-level advisory lock on the schema's name, held on a connection
of its own, keeps a second node from opening the same schema.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence

import asyncpg

from consensus.messages import ZERO, Ballot, Record
from pqueue.errors import StorageCorruptError, StorageError
from pqueue.storage.base import AcceptorState, StoredSnapshot, checksum
from pqueue.storage.jobrow import JobRow

logger = logging.getLogger(__name__)

#: A connection from the pool (asyncpg hands out proxies of connections).
Conn = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy
Write = Callable[[Conn], Awaitable[None]]

#: Versioned migrations: (version, SQL). Applied in order, each once.
MIGRATIONS: list[tuple[int, str]] = [
    (
        1,
        """
        CREATE TABLE acceptor (
            id smallint PRIMARY KEY CHECK (id = 1),
            promised_round bigint NOT NULL,
            promised_node bigint NOT NULL,
            commit_index bigint NOT NULL
        );
        CREATE TABLE records (
            slot bigint PRIMARY KEY,
            ballot_round bigint NOT NULL,
            ballot_node bigint NOT NULL,
            chosen boolean NOT NULL,
            crc bigint NOT NULL,
            value bytea NOT NULL
        );
        CREATE TABLE snapshot (
            id smallint PRIMARY KEY CHECK (id = 1),
            idx bigint NOT NULL,
            crc bigint NOT NULL,
            data bytea NOT NULL
        );
        CREATE TABLE applied (
            id smallint PRIMARY KEY CHECK (id = 1),
            applied_index bigint NOT NULL
        );
        CREATE TABLE jobs (
            id bigint PRIMARY KEY,
            queue text NOT NULL,
            priority integer NOT NULL,
            payload bytea NOT NULL,
            state text NOT NULL,
            attempts integer NOT NULL,
            "group" text NOT NULL,
            idempotency_key text NOT NULL,
            created_at timestamptz NOT NULL,
            ready_at timestamptz NOT NULL,
            lease_expires_at timestamptz,
            last_error text
        );
        CREATE INDEX jobs_backlog ON jobs (queue, state, priority, ready_at);
        """,
    ),
]

#: Errors after which the same transaction may simply be tried again.
_TRANSIENT = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.InterfaceError,
)

#: Jobs-table writes allowed to wait before ``record_applied`` waits too.
_MAX_PENDING_MIRROR = 64


def _log_mirror_failure(fut: asyncio.Future[None]) -> None:
    """Nobody may await a jobs-table write: say here when one failed."""
    if not fut.cancelled() and fut.exception() is not None:
        logger.error("jobs table write failed: %s", fut.exception())


class PostgresStorage:
    """A node's store in ``schema`` of the PostgreSQL at ``dsn``."""

    def __init__(self, dsn: str, schema: str, retry_max_s: float = 2.0) -> None:
        if not schema.replace("_", "").isalnum() or not schema[0].isalpha():
            raise ValueError(f"schema {schema!r}: letters, digits and _ only, a letter first")
        self.dsn = dsn
        self.schema = schema
        self.retry_max_s = retry_max_s
        #: False while PostgreSQL cannot be reached (writes wait and retry).
        self.available = True
        #: Transactions committed (each holds every write that waited for it).
        self.transactions = 0
        self._pool: asyncpg.Pool | None = None
        self._lock_conn: asyncpg.Connection | None = None
        self._queue: asyncio.Queue[tuple[Write, asyncio.Future[None]]] = asyncio.Queue()
        self._writer: asyncio.Task[None] | None = None
        self._mirror_pending: list[asyncio.Future[None]] = []

    def describe(self) -> str:
        host = self.dsn.split("@")[-1]  # never the password
        return f"postgresql://…@{host} schema {self.schema}"

    # ------------------------------------------------------------ lifecycle

    async def open(self) -> None:
        try:
            await self._lock()
            assert self._lock_conn is not None
            await self._migrate(self._lock_conn)
            # Startup parameters, not SETs: the pool's RESET ALL on release
            # returns to these, never to the server's defaults.
            self._pool = await asyncpg.create_pool(
                self.dsn,
                min_size=1,
                max_size=2,
                server_settings={"search_path": self.schema, "synchronous_commit": "on"},
            )
        except (asyncpg.PostgresError, *_TRANSIENT) as exc:
            await self.close()
            raise StorageError(f"cannot open {self.describe()}: {exc}") from exc
        except BaseException:
            await self.close()
            raise
        self._writer = asyncio.create_task(self._writer_loop(), name=f"pq-pg-{self.schema}")

    async def _lock(self) -> None:
        """Own the schema: a session advisory lock on a connection of our own."""
        if self._lock_conn is not None and not self._lock_conn.is_closed():
            return
        self._lock_conn = await asyncpg.connect(self.dsn)
        got = await self._lock_conn.fetchval(
            "SELECT pg_try_advisory_lock(hashtextextended($1, 0))", f"pqueue:{self.schema}"
        )
        if not got:
            await self._lock_conn.close()
            self._lock_conn = None
            raise StorageError(f"schema {self.schema} is in use by another node")

    async def _migrate(self, conn: asyncpg.Connection) -> None:
        async with conn.transaction():
            await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {self.schema}")
            await conn.execute(
                f"CREATE TABLE IF NOT EXISTS {self.schema}.schema_migrations "
                "(version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {
                r["version"]
                for r in await conn.fetch(f"SELECT version FROM {self.schema}.schema_migrations")
            }
            newest = max(v for v, _ in MIGRATIONS)
            if done and max(done) > newest:
                raise StorageError(
                    f"schema {self.schema} is at version {max(done)}, newer than this "
                    f"pqueue ({newest})"
                )
            await conn.execute(f"SET LOCAL search_path TO {self.schema}")
            for version, sql in MIGRATIONS:
                if version not in done:
                    logger.info("migrating schema %s to version %d", self.schema, version)
                    await conn.execute(sql)
                    await conn.execute(
                        "INSERT INTO schema_migrations (version) VALUES ($1)", version
                    )

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.cancel()
            await asyncio.wait([self._writer])
            self._writer = None
        while not self._queue.empty():
            _, fut = self._queue.get_nowait()
            if not fut.done():
                fut.set_exception(StorageError("storage closed"))
        if self._pool is not None:
            await self._pool.close()
            self._pool = None
        if self._lock_conn is not None:
            await self._lock_conn.close()  # releases the advisory lock
            self._lock_conn = None

    # ------------------------------------------------------------ writes

    async def _write(self, op: Write) -> None:
        if self._writer is None:
            raise StorageError("storage is not open")
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((op, fut))
        await fut

    async def _writer_loop(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while not self._queue.empty():
                batch.append(self._queue.get_nowait())
            await self._commit(batch)

    async def _commit(self, batch: list[tuple[Write, asyncio.Future[None]]]) -> None:
        """One transaction for the whole batch, retried while PostgreSQL is away."""
        backoff_s = 0.05
        while True:
            try:
                # After an outage the lock's session may be gone: take it
                # again before writing, or refuse (another node took over).
                await self._lock()
                assert self._pool is not None
                async with self._pool.acquire() as conn, conn.transaction():
                    for op, _ in batch:
                        await op(conn)
                self.transactions += 1
            except _TRANSIENT as exc:
                if self.available:
                    logger.error("postgresql unavailable, retrying writes: %s", exc)
                self.available = False
                await asyncio.sleep(backoff_s)
                backoff_s = min(self.retry_max_s, backoff_s * 2)
                continue
            except (asyncpg.PostgresError, StorageError) as exc:
                error = (
                    exc
                    if isinstance(exc, StorageError)
                    else StorageError(f"{self.describe()}: {exc}")
                )
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(error)
                return
            if not self.available:
                logger.info("postgresql is back: writes resume")
            self.available = True
            for _, fut in batch:
                if not fut.done():
                    fut.set_result(None)
            return

    async def persist(
        self,
        promised: Ballot | None,
        records: Sequence[Record],
        commit_index: int | None,
        snapshot: StoredSnapshot | None,
    ) -> None:
        rows = [
            (r.slot, r.ballot[0], r.ballot[1], r.chosen, checksum(r.slot, r.value), r.value)
            for r in records
        ]

        async def write(conn: Conn) -> None:
            if snapshot is not None:
                await conn.execute(
                    "INSERT INTO snapshot (id, idx, crc, data) VALUES (1, $1, $2, $3) "
                    "ON CONFLICT (id) DO UPDATE SET idx = excluded.idx, crc = excluded.crc, "
                    "data = excluded.data WHERE excluded.idx > snapshot.idx",
                    snapshot.index,
                    checksum(snapshot.index, snapshot.data),
                    snapshot.data,
                )
                await conn.execute("DELETE FROM records WHERE slot <= $1", snapshot.index)
            if rows:
                await conn.executemany(
                    "INSERT INTO records VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (slot) DO "
                    "UPDATE SET ballot_round = excluded.ballot_round, ballot_node = "
                    "excluded.ballot_node, chosen = excluded.chosen, crc = excluded.crc, "
                    "value = excluded.value",
                    rows,
                )
            if promised is not None or commit_index is not None:
                # A retried transaction must land where the first would have:
                # the promise is set (it only ever rises), the hint only grows.
                await conn.execute(
                    "INSERT INTO acceptor VALUES (1, $1, $2, $3) ON CONFLICT (id) DO UPDATE SET "
                    "promised_round = CASE WHEN $4 THEN excluded.promised_round "
                    "ELSE acceptor.promised_round END, "
                    "promised_node = CASE WHEN $4 THEN excluded.promised_node "
                    "ELSE acceptor.promised_node END, "
                    "commit_index = GREATEST(acceptor.commit_index, excluded.commit_index)",
                    (promised or ZERO)[0],
                    (promised or ZERO)[1],
                    commit_index or 0,
                    promised is not None,
                )

        await self._write(write)

    async def save_snapshot(self, index: int, data: bytes) -> None:
        await self.persist(None, (), None, StoredSnapshot(index, data))

    async def record_applied(
        self,
        applied_index: int,
        upserts: list[JobRow],
        deleted: list[int],
        replace_all: bool,
        wait: bool = False,
    ) -> None:
        """Bring the ``jobs`` table to ``applied_index``, in one transaction with it
        (``replace_all``: the rows are every job there is).

        Joins the next group commit without waiting for it, unless many such
        writes already wait (then it waits: the table must not fall far behind).
        """
        rows = [
            (
                r.id,
                r.queue,
                r.priority,
                r.payload,
                r.state,
                r.attempts,
                r.group,
                r.idempotency_key,
                r.created_at_ms / 1000,
                r.ready_at_ms / 1000,
                None if r.lease_expires_at_ms is None else r.lease_expires_at_ms / 1000,
                r.last_error,
            )
            for r in upserts
        ]

        async def write(conn: Conn) -> None:
            if replace_all:
                await conn.execute("DELETE FROM jobs")
            if deleted:
                await conn.execute("DELETE FROM jobs WHERE id = ANY($1::bigint[])", deleted)
            if rows:
                await conn.executemany(
                    "INSERT INTO jobs VALUES ($1, $2, $3, $4, $5, $6, $7, $8, to_timestamp($9), "
                    "to_timestamp($10), to_timestamp($11), $12) ON CONFLICT (id) DO UPDATE SET "
                    "queue = excluded.queue, priority = excluded.priority, payload = "
                    "excluded.payload, state = excluded.state, attempts = excluded.attempts, "
                    '"group" = excluded."group", idempotency_key = excluded.idempotency_key, '
                    "created_at = excluded.created_at, ready_at = excluded.ready_at, "
                    "lease_expires_at = excluded.lease_expires_at, "
                    "last_error = excluded.last_error",
                    rows,
                )
            await conn.execute(
                "INSERT INTO applied VALUES (1, $1) ON CONFLICT (id) DO UPDATE SET "
                "applied_index = GREATEST(applied.applied_index, excluded.applied_index)",
                applied_index,
            )

        if self._writer is None:
            raise StorageError("storage is not open")
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((write, fut))
        fut.add_done_callback(_log_mirror_failure)
        self._mirror_pending = [f for f in self._mirror_pending if not f.done()]
        self._mirror_pending.append(fut)
        if wait or len(self._mirror_pending) > _MAX_PENDING_MIRROR:
            await fut

    # ------------------------------------------------------------ reads

    async def load_acceptor(self) -> AcceptorState:
        assert self._pool is not None
        try:
            async with self._pool.acquire() as conn:
                return await self._load(conn)
        except (asyncpg.PostgresError, *_TRANSIENT) as exc:
            raise StorageError(f"{self.describe()}: {exc}") from exc

    async def _load(self, conn: Conn) -> AcceptorState:
        snapshot = None
        row = await conn.fetchrow("SELECT idx, crc, data FROM snapshot WHERE id = 1")
        if row is not None:
            if checksum(row["idx"], row["data"]) != row["crc"]:
                raise StorageCorruptError(f"snapshot at index {row['idx']} fails its checksum")
            snapshot = StoredSnapshot(row["idx"], bytes(row["data"]))
        acc = await conn.fetchrow(
            "SELECT promised_round, promised_node, commit_index FROM acceptor WHERE id = 1"
        )
        promised: Ballot = (acc["promised_round"], acc["promised_node"]) if acc else ZERO
        commit = acc["commit_index"] if acc else 0
        after = snapshot.index if snapshot else 0
        records = []
        for r in await conn.fetch(
            "SELECT slot, ballot_round, ballot_node, chosen, crc, value FROM records "
            "WHERE slot > $1 ORDER BY slot",
            after,
        ):
            value = bytes(r["value"])
            if checksum(r["slot"], value) != r["crc"]:
                raise StorageCorruptError(f"acceptor record {r['slot']} fails its checksum")
            records.append(
                Record(r["slot"], (r["ballot_round"], r["ballot_node"]), value, r["chosen"])
            )
        return AcceptorState(promised, records, max(commit, after), snapshot)
