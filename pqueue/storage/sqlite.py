"""SQLite storage: WAL mode, ``synchronous=FULL``, one writer thread.

Tables: ``acceptor`` (promised ballot, commit hint), ``records`` (one per
slot: ballot, value, chosen flag, CRC), ``snapshot`` (the latest one) and
``identity`` (which node of which cluster this dir is: ``pqueue.node.identity``;
added without a schema version bump, as ``CREATE TABLE IF NOT EXISTS``).

All SQLite work runs on one dedicated thread, so the event loop never blocks
on disk and the connection never crosses threads. A commit in WAL mode with
``synchronous=FULL`` fsyncs the WAL before it returns: that is the durability
point the log waits for. An exclusive ``flock`` on the data directory keeps a
second node from opening the same data.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from consensus.messages import ZERO, Ballot, Record
from pqueue.errors import StorageCorruptError, StorageError
from pqueue.storage.base import AcceptorState, StoredSnapshot, checksum, record_row
from pqueue.wire.logs import describe

logger = logging.getLogger(__name__)

T = TypeVar("T")

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS acceptor (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    promised_round INTEGER NOT NULL,
    promised_node INTEGER NOT NULL,
    commit_index INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS records (
    slot INTEGER PRIMARY KEY,
    ballot_round INTEGER NOT NULL,
    ballot_node INTEGER NOT NULL,
    chosen INTEGER NOT NULL,
    crc INTEGER NOT NULL,
    value BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS identity (id INTEGER PRIMARY KEY CHECK (id = 1), record TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS snapshot (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    idx INTEGER NOT NULL,
    crc INTEGER NOT NULL,
    data BLOB NOT NULL
);
"""


class SqliteStorage:
    """The embedded default store: ``<data_dir>/pqueue.db``."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None
        self._lock_fd: int | None = None
        self.available = True  # a local disk: its failures are fatal, not outages

    def describe(self) -> str:
        return f"sqlite:{self.data_dir}"

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._executor is None:
            raise StorageError("storage is not open")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._guarded, fn)

    def _guarded(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._conn is None:
            raise StorageError("storage is not open")
        try:
            return fn(self._conn)
        except sqlite3.Error as exc:
            raise StorageError(f"sqlite at {self.data_dir}: {describe(exc)}") from exc

    async def open(self) -> None:
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.data_dir / "LOCK", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StorageError(f"cannot use data dir {self.data_dir}: {describe(exc)}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            raise StorageError(f"data dir {self.data_dir} is in use by another process") from exc
        self._lock_fd = fd
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pq-sqlite")
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._executor, self._connect)
        except BaseException:
            await self.close()
            raise

    def _connect(self) -> None:
        try:
            conn = sqlite3.connect(self.data_dir / "pqueue.db", isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.executescript(_SCHEMA)
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        except sqlite3.Error as exc:
            raise StorageError(f"cannot open sqlite in {self.data_dir}: {describe(exc)}") from exc
        if row is None:
            conn.execute("INSERT INTO meta VALUES ('schema_version', ?)", (SCHEMA_VERSION,))
        elif row[0] != SCHEMA_VERSION:
            conn.close()
            raise StorageError(f"schema version {row[0]} is not {SCHEMA_VERSION}")
        self._conn = conn

    async def close(self) -> None:
        if self._executor is not None:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self._executor, self._disconnect)
            self._executor.shutdown(wait=True)
            self._executor = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _disconnect(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _load_snapshot(self, conn: sqlite3.Connection) -> StoredSnapshot | None:
        row = conn.execute("SELECT idx, crc, data FROM snapshot WHERE id = 1").fetchone()
        if row is None:
            return None
        idx, crc, data = row
        if checksum(idx, data) != crc:
            raise StorageCorruptError(f"snapshot at index {idx} fails its checksum")
        return StoredSnapshot(idx, bytes(data))

    async def save_snapshot(self, index: int, data: bytes) -> None:
        await self.persist(None, (), None, StoredSnapshot(index, data))
        await self._run(lambda conn: conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall())

    # ------------------------------------------------------------ identity

    async def load_identity(self) -> str | None:
        row = await self._run(
            lambda conn: conn.execute("SELECT record FROM identity WHERE id = 1").fetchone()
        )
        return None if row is None else str(row[0])

    async def save_identity(self, record: str) -> None:
        def write(conn: sqlite3.Connection) -> None:
            conn.execute("INSERT OR REPLACE INTO identity VALUES (1, ?)", (record,))

        await self._run(write)  # autocommit: one fsynced transaction

    # ------------------------------------------------------------ acceptor

    async def load_acceptor(self) -> AcceptorState:
        return await self._run(self._load_acceptor)

    def _load_acceptor(self, conn: sqlite3.Connection) -> AcceptorState:
        snapshot = self._load_snapshot(conn)
        row = conn.execute(
            "SELECT promised_round, promised_node, commit_index FROM acceptor WHERE id = 1"
        ).fetchone()
        promised, commit = ((row[0], row[1]), row[2]) if row else (ZERO, 0)
        records = []
        after = snapshot.index if snapshot else 0
        for slot, rnd, node, chosen, crc, value in conn.execute(
            "SELECT slot, ballot_round, ballot_node, chosen, crc, value FROM records "
            "WHERE slot > ? ORDER BY slot",
            (after,),
        ):
            if checksum(slot, value) != crc:
                raise StorageCorruptError(f"acceptor record {slot} fails its checksum")
            records.append(Record(slot, (rnd, node), bytes(value), bool(chosen)))
        return AcceptorState(promised, records, max(commit, after), snapshot)

    async def persist(
        self,
        promised: Ballot | None,
        records: Sequence[Record],
        commit_index: int | None,
        snapshot: StoredSnapshot | None,
    ) -> None:
        rows = [record_row(r) for r in records]

        def write(conn: sqlite3.Connection) -> None:
            conn.execute("BEGIN IMMEDIATE")
            try:
                if snapshot is not None:
                    crc = checksum(snapshot.index, snapshot.data)
                    conn.execute(
                        "INSERT INTO snapshot (id, idx, crc, data) VALUES (1, ?, ?, ?) "
                        "ON CONFLICT (id) DO UPDATE SET idx = excluded.idx, crc = excluded.crc, "
                        "data = excluded.data WHERE excluded.idx > snapshot.idx",
                        (snapshot.index, crc, snapshot.data),
                    )
                    conn.execute("DELETE FROM records WHERE slot <= ?", (snapshot.index,))
                conn.executemany("INSERT OR REPLACE INTO records VALUES (?, ?, ?, ?, ?, ?)", rows)
                if promised is not None or commit_index is not None:
                    old = conn.execute(
                        "SELECT promised_round, promised_node, commit_index FROM acceptor"
                    ).fetchone() or (0, 0, 0)
                    new_promised = promised if promised is not None else (old[0], old[1])
                    new_commit = max(old[2], commit_index or 0)
                    conn.execute(
                        "INSERT OR REPLACE INTO acceptor VALUES (1, ?, ?, ?)",
                        (new_promised[0], new_promised[1], new_commit),
                    )
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

        await self._run(write)
