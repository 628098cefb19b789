"""PostgreSQL storage through asyncpg: one schema per node, group commit.

Tables in the node's schema (created and migrated on open, versioned in
``schema_migrations``): ``acceptor`` (promised ballot, commit hint),
``records`` (one per slot: ballot, value, chosen flag, CRC), ``snapshot``
(the latest one's index, size and SHA-256) with ``snapshot_chunks`` (its
bytes, in rows of 1 MiB), ``owner`` (a fencing epoch), ``identity`` (which
node of which cluster: ``pqueue.node.identity``), ``applied`` (the index the
``jobs`` table reflects) and ``jobs`` (one row per live job, for SQL).

Snapshots stay in the database (a node's disk may be a scratch disk; the
schema is its state) but never pass whole through either side: a snapshot's
chunks are written in a transaction of their own (on a writer of their own,
so the log's writes do not wait behind 100 MB), then the log's writer
records it and drops the records it covers in one transaction; loading
streams the chunks to a local file (``spool_dir``), verified against the
SHA-256, which the replica then reads. Chunks of any index but the recorded
one are garbage (a write cut short): removed on open and at each record.

Durability: every transaction commits with ``synchronous_commit = on``, so
a write returns only once PostgreSQL has flushed it. The log's writes go
through one ``GroupWriter`` (every write waiting at that moment in one
transaction); the ``jobs`` table has a writer of its own, so it never
delays nor fails the log. Every write is idempotent (upserts, a promise
that only rises, maxima, "only a newer snapshot"), so when PostgreSQL goes
away mid-commit the writer retries the same transaction until it comes
back: the node's log waits, ``available`` is false (its callers are told
UNAVAILABLE), and nothing acknowledged is lost.

Ownership: a session advisory lock on the schema's name, on a connection of
its own, keeps a second node out; taking it bumps ``owner.epoch``, and every
write transaction checks the epoch is still ours, so a node whose lock
session died unnoticed (a partition) cannot write after another took over.
After an outage the lock is taken again before the next write; while an
older session of ours still holds it (the server has not yet noticed the
partition: TCP keepalives bound that), the writer keeps waiting.

Over 400 lines on purpose: one store, its schema, its lock and its SQL together.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import tempfile
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import asyncpg

from consensus.blob import Blob
from consensus.messages import ZERO, Ballot, Record
from pqueue.errors import StorageCorruptError, StorageError
from pqueue.storage.base import AcceptorState, StoredSnapshot, checksum, record_row
from pqueue.storage.blobs import PIECE, FileBlob, FileSink, is_temporary, remove
from pqueue.storage.jobrow import JobRow
from pqueue.storage.pgwriter import Conn, GroupWriter, Write, transient
from pqueue.wire.logs import describe

logger = logging.getLogger(__name__)

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
    (
        2,
        """
        -- Who owns the schema: bumped by each node that takes the lock, and
        -- checked (FOR SHARE) inside every write transaction, so a node that
        -- lost its lock unnoticed cannot commit after another took over.
        CREATE TABLE owner (id smallint PRIMARY KEY CHECK (id = 1), epoch bigint NOT NULL);
        INSERT INTO owner VALUES (1, 0);
        """,
    ),
    (
        3,
        """
        -- The tenant whose producer enqueued each job (queues may be shared).
        ALTER TABLE jobs ADD COLUMN tenant text NOT NULL DEFAULT '';
        """,
    ),
    (
        4,
        """
        -- Which node of which cluster this schema is (pqueue.node.identity).
        CREATE TABLE identity (id smallint PRIMARY KEY CHECK (id = 1), record text NOT NULL);
        """,
    ),
    (
        5,
        """
        -- A snapshot's bytes in 1 MiB chunks (issue 14): neither the node nor
        -- the server holds one whole. An older release's snapshot is cut up
        -- here; its CRC stays (checked on load), new ones have none.
        CREATE TABLE snapshot_chunks (
            idx bigint NOT NULL,
            seq integer NOT NULL,
            data bytea NOT NULL,
            PRIMARY KEY (idx, seq)
        );
        ALTER TABLE snapshot ADD COLUMN size bigint, ADD COLUMN digest bytea;
        INSERT INTO snapshot_chunks
            SELECT idx, g, substring(data FROM g * 1048576 + 1 FOR 1048576)
            FROM snapshot, generate_series(0, greatest(length(data) - 1, 0) / 1048576) AS g;
        UPDATE snapshot SET size = length(data), digest = sha256(data);
        ALTER TABLE snapshot DROP COLUMN data, ALTER COLUMN crc DROP NOT NULL,
            ALTER COLUMN size SET NOT NULL, ALTER COLUMN digest SET NOT NULL;
        """,
    ),
    (
        6,
        """
        -- Issue 16: jobs kept once they ended (state 'completed', 'cancelled',
        -- and 'dead' since when and why) and when a waiting job expires.
        ALTER TABLE jobs ADD COLUMN finished_at timestamptz,
            ADD COLUMN result bytea NOT NULL DEFAULT ''::bytea,
            ADD COLUMN reason text NOT NULL DEFAULT '',
            ADD COLUMN expires_at timestamptz;
        """,
    ),
]

#: A schema name as PostgreSQL keeps it unquoted: lower case, at most 63 bytes.
SCHEMA_NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")

#: Find a dead client within about 10 s (server side) so its lock goes.
KEEPALIVE_SETTINGS = {
    "tcp_keepalives_idle": "5",
    "tcp_keepalives_interval": "2",
    "tcp_keepalives_count": "3",
    "tcp_user_timeout": "10000",
}
CONNECT_TIMEOUT_S = 5.0
#: At close, how long the explicit unlock may take before the connection is
#: just closed (the lock then goes when the server notices): short, since a
#: node stopping during a partition waits this long.
UNLOCK_TIMEOUT_S = 2.0
#: The advisory lock's key, from ``PostgresStorage._lock_name`` as $1.
LOCK_KEY_SQL = "hashtextextended($1, 0)"
#: The latest time a timestamptz column takes here (9999-12-31).
_MAX_MS = 253_402_300_799_999


class LockBusyError(ConnectionError):
    """The schema's lock is still held by a session the server has not yet
    seen die (ours, before a partition): wait, as for any outage."""


def _text(value: str) -> str:
    """PostgreSQL text cannot hold NUL: the jobs table shows it as ``\\x00``."""
    return value.replace("\x00", "\\x00")


def _seconds(ms: int) -> float:
    return min(max(ms, 0), _MAX_MS) / 1000


#: The ``jobs`` table's columns are ``JobRow``'s fields, in order (``*_ms``
#: as timestamptz without the suffix; tests/contract/test_postgres.py checks).
JOB_FIELDS = tuple(f.name for f in dataclasses.fields(JobRow))
#: The payload never changes: written on insert only.
_UPSERT_JOBS = (
    "INSERT INTO jobs VALUES ("
    + ", ".join(
        f"to_timestamp(${i})" if name.endswith("_ms") else f"${i}"
        for i, name in enumerate(JOB_FIELDS, 1)
    )
    + ") ON CONFLICT (id) DO UPDATE SET "
    "state = excluded.state, attempts = excluded.attempts, "
    "priority = excluded.priority, ready_at = excluded.ready_at, "
    "lease_expires_at = excluded.lease_expires_at, "
    "last_error = excluded.last_error, finished_at = excluded.finished_at, "
    "result = excluded.result, reason = excluded.reason, expires_at = excluded.expires_at"
)


def _job_values(row: JobRow) -> tuple[Any, ...]:
    """The ``jobs`` columns of one row, in table order."""
    return tuple(_column(name, getattr(row, name)) for name in JOB_FIELDS)


def _column(name: str, value: Any) -> Any:
    if value is None:
        return None
    if name.endswith("_ms"):
        return _seconds(value)
    return _text(value) if isinstance(value, str) else value


class PostgresStorage:
    """A node's store in ``schema`` of the PostgreSQL at ``dsn``."""

    def __init__(
        self,
        dsn: str,
        schema: str,
        retry_max_s: float = 2.0,
        attempt_timeout_s: float = 10.0,
        spool_dir: Path | None = None,
    ) -> None:
        if not SCHEMA_NAME.match(schema):
            raise ValueError(
                f"schema {schema!r}: lower-case letters, digits and _, a letter first, at most 63"
            )
        self.dsn = dsn
        self.schema = schema
        #: Where local copies of snapshots go (the replica reads those); the
        #: files are unlinked as soon as they are open, so none outlive us.
        self.spool_dir = spool_dir or Path(tempfile.gettempdir())
        self._spool_prefix = f"pq-{schema}-snapshot"
        self._pool: asyncpg.Pool | None = None
        self._lock_conn: asyncpg.Connection | None = None
        self._locking = asyncio.Lock()
        self._epoch = 0
        self._log = GroupWriter("log", self._run, self.describe(), retry_max_s, attempt_timeout_s)
        self._jobs = GroupWriter("jobs", self._run, self.describe(), retry_max_s, attempt_timeout_s)
        #: Snapshot chunks: a writer of their own, so the log never waits behind them.
        self._chunks = GroupWriter(
            "snapshot", self._run, self.describe(), retry_max_s, 6 * attempt_timeout_s
        )

    @property
    def available(self) -> bool:
        """False while PostgreSQL cannot be reached (the log's writes wait)."""
        return self._log.available

    @property
    def transactions(self) -> int:
        """The log's transactions committed (each holds every write that waited)."""
        return self._log.transactions

    def describe(self) -> str:
        where = self.dsn.split("@")[-1].split("?")[0]  # never a password
        return f"postgresql://…@{where} schema {self.schema}"

    # ------------------------------------------------------------ lifecycle

    async def open(self) -> None:
        try:
            await self._lock(first=True)
            assert self._lock_conn is not None
            await self._migrate(self._lock_conn)
            await self._bump_epoch()
            await self._lock_conn.execute(
                f"DELETE FROM {self.schema}.snapshot_chunks WHERE idx IS DISTINCT FROM "
                f"(SELECT idx FROM {self.schema}.snapshot WHERE id = 1)"
            )
            self.spool_dir.mkdir(parents=True, exist_ok=True)
            for path in self.spool_dir.glob(f"{self._spool_prefix}-*"):
                if is_temporary(path):
                    remove(path)  # a copy cut short by a crash
            settings = {"search_path": self.schema, "synchronous_commit": "on"}
            # Startup parameters, not SETs: the pool's RESET ALL on release
            # returns to these, never to the server's defaults.
            self._pool = await asyncpg.create_pool(
                self.dsn,
                min_size=1,
                max_size=3,
                timeout=CONNECT_TIMEOUT_S,
                server_settings={**settings, **KEEPALIVE_SETTINGS},
            )
        except BaseException as exc:
            await self.close()
            if isinstance(exc, StorageError) or not isinstance(exc, Exception):
                raise
            raise StorageError(f"cannot open {self.describe()}: {describe(exc)}") from exc
        self._log.start()
        self._jobs.start()
        self._chunks.start()

    async def _lock(self, first: bool = False) -> None:
        """Own the schema: a session advisory lock on a connection of our own."""
        # Both writers come here after an outage: one takes the lock (and
        # bumps the epoch), the other must then find it taken by us.
        async with self._locking:
            await self._take_lock(first)

    async def _take_lock(self, first: bool) -> None:
        if self._lock_conn is not None and not self._lock_conn.is_closed():
            return
        self._lock_conn = None
        conn = await asyncpg.connect(
            self.dsn,
            timeout=CONNECT_TIMEOUT_S,
            command_timeout=CONNECT_TIMEOUT_S,
            server_settings={"synchronous_commit": "on", **KEEPALIVE_SETTINGS},
        )
        try:
            got = await conn.fetchval(
                f"SELECT pg_try_advisory_lock({LOCK_KEY_SQL})", self._lock_name()
            )
            epoch = (
                None
                if got or first
                else await conn.fetchval(f"SELECT epoch FROM {self.schema}.owner WHERE id = 1")
            )
        except BaseException:
            await conn.close()
            raise
        if not got:
            await conn.close()
            if first or epoch != self._epoch:
                raise StorageError(f"schema {self.schema} is in use by another node")
            # Still ours: our old session, which the server has not seen die.
            raise LockBusyError(f"schema {self.schema}'s lock is still held")
        self._lock_conn = conn
        if not first:
            await self._bump_epoch()

    async def _bump_epoch(self) -> None:
        assert self._lock_conn is not None
        epoch = await self._lock_conn.fetchval(
            f"UPDATE {self.schema}.owner SET epoch = epoch + 1 WHERE id = 1 RETURNING epoch"
        )
        self._epoch = int(epoch)
        logger.info("schema %s owned at epoch %d", self.schema, self._epoch)

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
        await self._log.stop()
        await self._jobs.stop()
        await self._chunks.stop()
        if self._pool is not None:
            self._pool.terminate()
            self._pool = None
        if self._lock_conn is not None:
            conn, self._lock_conn = self._lock_conn, None
            await self._unlock(conn)

    def _lock_name(self) -> str:
        """What the schema's advisory lock is keyed on (``LOCK_KEY_SQL``)."""
        return f"pqueue:{self.schema}"

    async def _unlock(self, conn: asyncpg.Connection) -> None:
        """Let the schema go before the connection does.

        Closing alone is not enough: the server drops a session's advisory lock
        only once its backend has seen the socket close, a moment after we
        return, so a store opened at once (a restart, a test) could find the
        schema still held and refuse. An explicit unlock is synchronous.
        """
        try:
            if not conn.is_closed():
                held = await conn.fetchval(
                    f"SELECT pg_advisory_unlock({LOCK_KEY_SQL})",
                    self._lock_name(),
                    timeout=UNLOCK_TIMEOUT_S,
                )
                if not held:
                    logger.warning("schema %s: its lock was not held at close", self.schema)
        except Exception as exc:  # the lock goes with the session anyway
            logger.debug("schema %s: unlock failed (%s); closing", self.schema, describe(exc))
        finally:
            conn.terminate()

    # ------------------------------------------------------------ writes

    async def _run(self, ops: list[Write]) -> None:
        """One transaction for ``ops``, as the schema's owner (or not at all)."""
        await self._lock()
        assert self._pool is not None
        async with self._pool.acquire() as conn, conn.transaction():
            epoch = await conn.fetchval("SELECT epoch FROM owner WHERE id = 1 FOR SHARE")
            if epoch != self._epoch:
                raise StorageError(
                    f"{self.describe()}: another node owns the schema now "
                    f"(epoch {epoch}, ours {self._epoch})"
                )
            for op in ops:
                await op(conn)

    async def persist(
        self,
        promised: Ballot | None,
        records: Sequence[Record],
        commit_index: int | None,
        snapshot: StoredSnapshot | None,
    ) -> None:
        rows = [record_row(r) for r in records]
        if snapshot is not None:
            # Its bytes first, in a transaction of their own; recorded below.
            await self._chunks.submit(self._write_chunks(snapshot))

        async def write(conn: Conn) -> None:
            if snapshot is not None:
                blob = snapshot.blob
                await conn.execute(
                    "INSERT INTO snapshot (id, idx, crc, size, digest) "
                    "VALUES (1, $1, NULL, $2, $3) ON CONFLICT (id) DO UPDATE SET "
                    "idx = excluded.idx, crc = NULL, size = excluded.size, "
                    "digest = excluded.digest WHERE excluded.idx > snapshot.idx",
                    snapshot.index,
                    blob.size,
                    blob.digest,
                )
                await conn.execute("DELETE FROM records WHERE slot <= $1", snapshot.index)
                await conn.execute(
                    "DELETE FROM snapshot_chunks "
                    "WHERE idx < (SELECT idx FROM snapshot WHERE id = 1)"
                )
            if rows:
                await conn.executemany(
                    "INSERT INTO records VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (slot) DO "
                    "UPDATE SET ballot_round = excluded.ballot_round, ballot_node = "
                    "excluded.ballot_node, chosen = excluded.chosen, crc = excluded.crc, "
                    "value = excluded.value",
                    rows,
                )
            if promised is not None or commit_index is not None:
                # A retried transaction lands where the first would have: the
                # promise only rises, the hint only grows.
                await conn.execute(
                    "INSERT INTO acceptor VALUES (1, $1, $2, $3) ON CONFLICT (id) DO UPDATE SET "
                    "(promised_round, promised_node) = (SELECT CASE WHEN $4 AND "
                    "(excluded.promised_round, excluded.promised_node) > "
                    "(acceptor.promised_round, acceptor.promised_node) "
                    "THEN excluded.promised_round ELSE acceptor.promised_round END, "
                    "CASE WHEN $4 AND (excluded.promised_round, excluded.promised_node) > "
                    "(acceptor.promised_round, acceptor.promised_node) "
                    "THEN excluded.promised_node ELSE acceptor.promised_node END), "
                    "commit_index = GREATEST(acceptor.commit_index, excluded.commit_index)",
                    (promised or ZERO)[0],
                    (promised or ZERO)[1],
                    commit_index or 0,
                    promised is not None,
                )

        await self._log.submit(write)
        if snapshot is not None:
            self._drop_spool_name(snapshot.blob)

    def _write_chunks(self, snapshot: StoredSnapshot) -> Write:
        """The write of a snapshot's chunks (none if a snapshot as new is recorded)."""

        async def write(conn: Conn) -> None:
            recorded = await conn.fetchval("SELECT idx FROM snapshot WHERE id = 1")
            if recorded is not None and recorded >= snapshot.index:
                return  # not newer: the record below keeps the recorded one
            blob = snapshot.blob
            for seq, offset in enumerate(range(0, max(blob.size, 1), PIECE)):
                await conn.execute(
                    "INSERT INTO snapshot_chunks VALUES ($1, $2, $3) "
                    "ON CONFLICT (idx, seq) DO UPDATE SET data = excluded.data",
                    snapshot.index,
                    seq,
                    blob.read(offset, PIECE),
                )

        return write

    def _drop_spool_name(self, blob: Blob) -> None:
        """A temporary file of ours is in the database now: unlink its name
        (the replica reads it through its descriptor)."""
        if (
            isinstance(blob, FileBlob)
            and blob.path is not None
            and blob.path.parent == self.spool_dir
            and is_temporary(blob.path)
        ):
            blob.unlink()

    def snapshot_sink(self) -> FileSink:
        """A local file for a snapshot (a copy: the database holds the bytes)."""
        return FileSink(self.spool_dir, self._spool_prefix, durable=False)

    async def save_snapshot(self, index: int, blob: Blob) -> None:
        await self.persist(None, (), None, StoredSnapshot(index, blob))

    async def save_identity(self, record: str) -> None:
        async def write(conn: Conn) -> None:
            await conn.execute(
                "INSERT INTO identity VALUES (1, $1) ON CONFLICT (id) DO UPDATE "
                "SET record = excluded.record",
                record,
            )

        await self._log.submit(write)

    async def load_identity(self) -> str | None:
        if self._pool is None:
            raise StorageError("storage is not open")
        try:
            async with self._pool.acquire() as conn:
                value = await conn.fetchval("SELECT record FROM identity WHERE id = 1")
        except Exception as exc:
            kind = "unreachable" if transient(exc) else "failed"
            raise StorageError(f"{self.describe()} {kind}: {describe(exc)}") from exc
        return None if value is None else str(value)

    def record_applied(
        self, applied_index: int, upserts: list[JobRow], deleted: list[int], replace_all: bool
    ) -> asyncio.Future[None]:
        """Bring the ``jobs`` table to ``applied_index``, in one transaction with it
        (``replace_all``: the rows are every job there is). Resolves at commit;
        nobody need wait (the table has a writer of its own)."""
        rows = [_job_values(r) for r in upserts]

        async def write(conn: Conn) -> None:
            if replace_all:
                await conn.execute("DELETE FROM jobs")
            if deleted:
                await conn.execute("DELETE FROM jobs WHERE id = ANY($1::bigint[])", deleted)
            if rows:
                await conn.executemany(_UPSERT_JOBS, rows)
            # This index, not the highest seen: after a restore it can go back.
            await conn.execute(
                "INSERT INTO applied VALUES (1, $1) ON CONFLICT (id) DO UPDATE SET "
                "applied_index = excluded.applied_index",
                applied_index,
            )

        return self._jobs.submit(write)

    # ------------------------------------------------------------ reads

    async def load_acceptor(self) -> AcceptorState:
        if self._pool is None:
            raise StorageError("storage is not open")
        try:
            async with self._pool.acquire() as conn:
                return await self._load(conn)
        except StorageError:
            raise
        except Exception as exc:
            kind = "unreachable" if transient(exc) else "failed"
            raise StorageError(f"{self.describe()} {kind}: {describe(exc)}") from exc

    async def _load_snapshot(self, conn: Conn) -> StoredSnapshot | None:
        """The recorded snapshot, streamed to a local file and verified."""
        row = await conn.fetchrow("SELECT idx, crc, size, digest FROM snapshot WHERE id = 1")
        if row is None:
            return None
        idx, crc = row["idx"], row["crc"]
        sink = self.snapshot_sink()
        running = zlib.crc32(idx.to_bytes(8, "big"))
        try:
            async with conn.transaction():
                async for chunk in conn.cursor(
                    "SELECT data FROM snapshot_chunks WHERE idx = $1 ORDER BY seq", idx, prefetch=2
                ):
                    running = zlib.crc32(chunk["data"], running)
                    sink.write(chunk["data"])
        except BaseException:
            sink.abort()
            raise
        if sink.error is not None:
            raise StorageError(f"cannot copy the snapshot to {self.spool_dir}: {sink.error}")
        blob = sink.finish(bytes(row["digest"]))
        if blob is None or blob.size != row["size"] or (crc is not None and running != crc):
            if blob is not None:
                blob.unlink()
                blob.close()
            raise StorageCorruptError(f"snapshot at index {idx} fails its checksum")
        blob.unlink()  # a local copy: read through its descriptor, gone with it
        return StoredSnapshot(idx, blob)

    async def _load(self, conn: Conn) -> AcceptorState:
        snapshot = await self._load_snapshot(conn)
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
