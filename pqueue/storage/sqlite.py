"""SQLite storage: WAL mode, ``synchronous=FULL``, one writer thread.

Tables: ``acceptor`` (promised ballot, commit hint), ``records`` (one per
slot: ballot, value, chosen flag, CRC), ``snapshot_file`` (the latest
snapshot: its index, size, SHA-256 and file name) and ``identity`` (which
node of which cluster this dir is: ``pqueue.node.identity``; added without a
schema version bump, as ``CREATE TABLE IF NOT EXISTS``).

The snapshot itself is a file next to the database,
``snapshot-<index>-<digest>.snap``: written as ``*.tmp``, fsynced, renamed
into place (the directory fsynced), then recorded in the same transaction
that drops the records it covers. The database says which file is the
snapshot: on open, a ``*.tmp`` (a write cut short) or a ``.snap`` it does not
name (renamed, never recorded; or replaced) is removed. Schema version 1
kept the snapshot's bytes in the database: opening such a store moves them
to a file (version 2), and a release that only knows version 1 refuses it.

All SQLite work runs on one dedicated thread (``_Worker``: a queue in, each
result handed back to the loop; no executor's futures and locks per write),
so the event loop never blocks on disk and the connection never crosses
threads. A commit in WAL mode with
``synchronous=FULL`` fsyncs the WAL before it returns: that is the durability
point the log waits for. An exclusive ``flock`` on the data directory keeps a
second node from opening the same data.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import queue
import sqlite3
import threading
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from consensus.blob import Blob
from consensus.messages import ZERO, Ballot, Record
from pqueue.errors import StorageCorruptError, StorageError
from pqueue.storage.base import AcceptorState, StoredSnapshot, checksum, record_row
from pqueue.storage.blobs import PIECE, FileBlob, FileSink, copy_to, is_temporary, remove, sync_dir
from pqueue.wire.logs import describe

logger = logging.getLogger(__name__)

T = TypeVar("T")

SCHEMA_VERSION = 2
#: Snapshot files (and their temporaries) in the data dir start with this.
SNAPSHOT_PREFIX = "snapshot"
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
CREATE TABLE IF NOT EXISTS snapshot_file (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    idx INTEGER NOT NULL,
    size INTEGER NOT NULL,
    digest BLOB NOT NULL,
    name TEXT NOT NULL
);
"""


_Work = tuple[Callable[[], Any], "asyncio.Future[Any]", asyncio.AbstractEventLoop]


def _settle(fut: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if fut.done():  # its caller was cancelled: nobody waits
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)


class _Worker:
    """One thread that runs the store's work in order, each result handed
    back to the event loop that asked for it."""

    def __init__(self, name: str) -> None:
        self._work: queue.SimpleQueue[_Work | None] = queue.SimpleQueue()
        # A daemon: a process that exits without closing the store does not
        # wait here (an unfinished transaction is rolled back at the next open).
        self._thread = threading.Thread(target=self._work_loop, name=name, daemon=True)
        self._thread.start()

    def run(self, fn: Callable[[], T]) -> asyncio.Future[T]:
        """``fn()`` on the thread, after everything asked before it."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        self._work.put((fn, fut, loop))
        return fut

    def _work_loop(self) -> None:
        while (item := self._work.get()) is not None:
            fn, fut, loop = item
            result: Any = None
            error: BaseException | None = None
            try:
                result = fn()
            except BaseException as exc:  # handed to the caller, whatever it is
                error = exc
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits
                loop.call_soon_threadsafe(_settle, fut, result, error)
            del item, fn, fut, result, error  # hold nothing while waiting

    async def close(self) -> None:
        """Let the thread finish what was asked, then end it."""
        self._work.put(None)
        await asyncio.to_thread(self._thread.join)


class SqliteStorage:
    """The embedded default store: ``<data_dir>/pqueue.db``."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self._worker: _Worker | None = None
        self._conn: sqlite3.Connection | None = None
        self._lock_fd: int | None = None
        #: The acceptor row as last committed (promised round, node, commit
        #: index), read once: the worker thread is its only writer.
        self._acceptor: tuple[int, int, int] | None = None
        self.available = True  # a local disk: its failures are fatal, not outages

    def describe(self) -> str:
        return f"sqlite:{self.data_dir}"

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._worker is None:
            raise StorageError("storage is not open")
        return await self._worker.run(lambda: self._guarded(fn))

    def _guarded(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._conn is None:
            raise StorageError("storage is not open")
        try:
            return fn(self._conn)
        except sqlite3.Error as exc:
            raise StorageError(f"sqlite at {self.data_dir}: {describe(exc)}") from exc
        except OSError as exc:
            raise StorageError(f"snapshot file in {self.data_dir}: {describe(exc)}") from exc

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
        self._worker = _Worker("pq-sqlite")
        try:
            await self._worker.run(self._connect)
        except BaseException:
            await self.close()
            raise

    def _connect(self) -> None:
        self._acceptor = None
        try:
            conn = sqlite3.connect(self.data_dir / "pqueue.db", isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.executescript(_SCHEMA)
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            if row is None:
                conn.execute("INSERT INTO meta VALUES ('schema_version', ?)", (SCHEMA_VERSION,))
            elif row[0] == 1:
                self._migrate_snapshot_to_a_file(conn)
            elif row[0] != SCHEMA_VERSION:
                conn.close()
                raise StorageError(f"schema version {row[0]} is not {SCHEMA_VERSION}")
            self._remove_stray_files(conn)
        except sqlite3.Error as exc:
            raise StorageError(f"cannot open sqlite in {self.data_dir}: {describe(exc)}") from exc
        except OSError as exc:
            raise StorageError(
                f"cannot open the snapshot in {self.data_dir}: {describe(exc)}"
            ) from exc
        self._conn = conn

    def _migrate_snapshot_to_a_file(self, conn: sqlite3.Connection) -> None:
        """Version 1 -> 2: the snapshot's bytes move from the database to a
        file (streamed: never held whole); one transaction records the file,
        drops the old table and bumps the version."""
        old = conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'snapshot'"
        ).fetchone()
        row = conn.execute("SELECT idx, crc FROM snapshot WHERE id = 1").fetchone() if old else None
        placed: FileBlob | None = None
        idx = 0
        if row is not None:
            idx, crc = row
            sink = FileSink(self.data_dir, SNAPSHOT_PREFIX)
            running = zlib.crc32(idx.to_bytes(8, "big"))
            with conn.blobopen("snapshot", "data", 1, readonly=True) as data:
                while piece := data.read(PIECE):
                    running = zlib.crc32(piece, running)
                    sink.write(piece)
            if running != crc:
                sink.abort()
                raise StorageCorruptError(f"snapshot at index {idx} fails its checksum")
            blob = sink.finish()
            if blob is None:
                raise StorageError(f"cannot move the snapshot to a file: {sink.error}")
            placed = self._place(blob, idx)
        conn.execute("BEGIN IMMEDIATE")
        try:
            if placed is not None:
                assert placed.path is not None
                conn.execute(
                    "INSERT INTO snapshot_file VALUES (1, ?, ?, ?, ?)",
                    (idx, placed.size, placed.digest, placed.path.name),
                )
            conn.execute("DROP TABLE IF EXISTS snapshot")
            conn.execute(
                "UPDATE meta SET value = ? WHERE key = 'schema_version'", (SCHEMA_VERSION,)
            )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        finally:
            if placed is not None:
                placed.close()
        logger.info("moved the snapshot in %s to a file (schema version 2)", self.data_dir)

    def _remove_stray_files(self, conn: sqlite3.Connection) -> None:
        """Remove snapshot files the database does not name (see the module doc)."""
        row = conn.execute("SELECT name FROM snapshot_file WHERE id = 1").fetchone()
        keep = row[0] if row else None
        for path in self.data_dir.glob(f"{SNAPSHOT_PREFIX}-*"):
            if path.name != keep and (is_temporary(path) or path.suffix == ".snap"):
                logger.info("removing %s: not the recorded snapshot", path.name)
                remove(path)

    def _place(self, blob: Blob, index: int) -> FileBlob:
        """``blob`` as a durable file at its final name (not yet recorded).

        A temporary file of ours is moved; any other blob is copied first."""
        if (
            isinstance(blob, FileBlob)
            and blob.path is not None
            and blob.path.parent == self.data_dir
            and is_temporary(blob.path)
        ):
            file = blob
        else:
            sink = self.snapshot_sink()
            copied = copy_to(blob, sink)
            if copied is None:
                raise StorageError(f"cannot write the snapshot to a file: {sink.error}")
            file = copied
        file.sync()
        assert file.path is not None
        final = self.data_dir / f"{SNAPSHOT_PREFIX}-{index:016d}-{file.digest[:6].hex()}.snap"
        os.replace(file.path, final)
        file.path = final
        sync_dir(self.data_dir)
        return file

    def snapshot_sink(self) -> FileSink:
        """A temporary snapshot file in the data dir (see ``persist``)."""
        return FileSink(self.data_dir, SNAPSHOT_PREFIX)

    async def close(self) -> None:
        if self._worker is not None:
            worker, self._worker = self._worker, None
            await worker.run(self._disconnect)
            await worker.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _acceptor_row(self, conn: sqlite3.Connection) -> tuple[int, int, int]:
        """The committed acceptor row (on the worker thread), read once."""
        if self._acceptor is None:
            row = conn.execute(
                "SELECT promised_round, promised_node, commit_index FROM acceptor"
            ).fetchone()
            self._acceptor = (row[0], row[1], row[2]) if row else (0, 0, 0)
        return self._acceptor

    def _disconnect(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _load_snapshot(self, conn: sqlite3.Connection) -> StoredSnapshot | None:
        row = conn.execute("SELECT idx, size, digest, name FROM snapshot_file").fetchone()
        if row is None:
            return None
        idx, size, digest, name = row
        try:
            blob = FileBlob.open(self.data_dir / name, bytes(digest))
        except FileNotFoundError:
            raise StorageCorruptError(f"snapshot at index {idx}: its file {name} is gone") from None
        if blob.size != size or not blob.verify():
            blob.close()
            raise StorageCorruptError(f"snapshot at index {idx} ({name}) fails its checksum")
        return StoredSnapshot(idx, blob)

    async def save_snapshot(self, index: int, blob: Blob) -> None:
        await self.persist(None, (), None, StoredSnapshot(index, blob))
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
            # Only a newer snapshot replaces the recorded one: its file is
            # made durable at its final name first (this thread is the only
            # writer, so the recorded one cannot change meanwhile).
            placed: FileBlob | None = None
            replaced: str | None = None
            if snapshot is not None:
                row = conn.execute("SELECT idx, name FROM snapshot_file").fetchone()
                if row is None or snapshot.index > row[0]:
                    replaced = row[1] if row else None
                    placed = self._place(snapshot.blob, snapshot.index)
                elif (
                    isinstance(snapshot.blob, FileBlob)
                    and snapshot.blob.path is not None
                    and is_temporary(snapshot.blob.path)
                ):
                    snapshot.blob.unlink()  # not newer: never recorded
            conn.execute("BEGIN IMMEDIATE")
            try:
                if placed is not None:
                    assert snapshot is not None
                    assert placed.path is not None
                    conn.execute(
                        "INSERT OR REPLACE INTO snapshot_file VALUES (1, ?, ?, ?, ?)",
                        (snapshot.index, placed.size, placed.digest, placed.path.name),
                    )
                if snapshot is not None:
                    conn.execute("DELETE FROM records WHERE slot <= ?", (snapshot.index,))
                conn.executemany("INSERT OR REPLACE INTO records VALUES (?, ?, ?, ?, ?, ?)", rows)
                acceptor = None
                if promised is not None or commit_index is not None:
                    old = self._acceptor_row(conn)
                    new_promised = promised if promised is not None else (old[0], old[1])
                    acceptor = (new_promised[0], new_promised[1], max(old[2], commit_index or 0))
                    if acceptor != old:
                        conn.execute(
                            "INSERT OR REPLACE INTO acceptor VALUES (1, ?, ?, ?)", acceptor
                        )
                conn.execute("COMMIT")
                if acceptor is not None:
                    self._acceptor = acceptor
            except BaseException:
                conn.execute("ROLLBACK")
                self._acceptor = None  # read it again
                if placed is not None:
                    placed.unlink()  # never recorded
                raise
            if placed is not None:
                if snapshot is not None and placed is not snapshot.blob:
                    placed.close()  # a copy: nobody reads it
                if replaced is not None and replaced != getattr(placed.path, "name", None):
                    remove(self.data_dir / replaced)  # its readers keep their descriptor

        await self._run(write)
