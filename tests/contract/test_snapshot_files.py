"""Snapshots as files (issue 14): what the stores keep on disk, how an older
store's snapshot is carried over, and what a damaged one does."""

from __future__ import annotations

import os
import sqlite3
import zlib
from hashlib import sha256
from pathlib import Path

import asyncpg
import pytest

from consensus.blob import MemoryBlob, read_all
from consensus.messages import Record
from pqueue.errors import StorageCorruptError
from pqueue.storage.blobs import FileBlob, FileSink
from pqueue.storage.postgres import MIGRATIONS, PostgresStorage
from pqueue.storage.sqlite import SqliteStorage
from tests import pg

#: The SQLite schema of release with schema version 1 (the snapshot as a BLOB).
_V1 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE acceptor (id INTEGER PRIMARY KEY CHECK (id = 1), promised_round INTEGER NOT NULL,
    promised_node INTEGER NOT NULL, commit_index INTEGER NOT NULL);
CREATE TABLE records (slot INTEGER PRIMARY KEY, ballot_round INTEGER NOT NULL,
    ballot_node INTEGER NOT NULL, chosen INTEGER NOT NULL, crc INTEGER NOT NULL,
    value BLOB NOT NULL);
CREATE TABLE snapshot (id INTEGER PRIMARY KEY CHECK (id = 1), idx INTEGER NOT NULL,
    crc INTEGER NOT NULL, data BLOB NOT NULL);
INSERT INTO meta VALUES ('schema_version', 1);
"""


def _files(where: Path, pattern: str = "snapshot-*") -> list[Path]:
    return sorted(where.glob(pattern))


def _crc(index: int, data: bytes) -> int:
    return zlib.crc32(data, zlib.crc32(index.to_bytes(8, "big")))


def _v1_store(where: Path, index: int, data: bytes, crc: int | None = None) -> None:
    where.mkdir(parents=True)
    conn = sqlite3.connect(where / "pqueue.db")
    conn.executescript(_V1)
    conn.execute(
        "INSERT INTO snapshot VALUES (1, ?, ?, ?)",
        (index, _crc(index, data) if crc is None else crc, data),
    )
    conn.execute(
        "INSERT INTO records VALUES (?, 1, 1, 1, ?, ?)", (index + 1, _crc(index + 1, b"r"), b"r")
    )
    conn.commit()
    conn.close()


async def test_an_older_sqlite_store_has_its_snapshot_moved_to_a_file(tmp_path: Path) -> None:
    data = os.urandom((2 << 20) + 777)
    _v1_store(tmp_path / "d", 40, data)
    store = SqliteStorage(tmp_path / "d")
    await store.open()
    try:
        state = await store.load_acceptor()
        assert state.snapshot is not None
        assert state.snapshot.index == 40
        assert read_all(state.snapshot.blob) == data
        assert state.snapshot.blob.digest == sha256(data).digest()
        assert [r.slot for r in state.records] == [41]
    finally:
        await store.close()
    [snap] = (tmp_path / "d").glob("snapshot-*.snap")
    assert snap.read_bytes() == data
    conn = sqlite3.connect(tmp_path / "d" / "pqueue.db")
    try:
        assert conn.execute("SELECT value FROM meta").fetchone() == (2,)
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert "snapshot" not in tables  # the BLOB is gone from the database
    finally:
        conn.close()


async def test_an_older_sqlite_snapshot_that_fails_its_crc_is_corruption(tmp_path: Path) -> None:
    _v1_store(tmp_path / "d", 40, b"state", crc=12345)
    store = SqliteStorage(tmp_path / "d")
    with pytest.raises(StorageCorruptError, match="checksum"):
        await store.open()
    assert not list((tmp_path / "d").glob("snapshot-*"))


async def test_a_renamed_but_unrecorded_snapshot_file_is_removed(tmp_path: Path) -> None:
    """A crash between the rename and the commit leaves a ``.snap`` the
    database does not name: the recorded snapshot stays the snapshot."""
    store = SqliteStorage(tmp_path)
    await store.open()
    await store.save_snapshot(5, MemoryBlob(b"state@5"))
    await store.close()
    stray = tmp_path / f"snapshot-{9:016d}-abcdef012345.snap"
    stray.write_bytes(b"state@9, never recorded")
    store = SqliteStorage(tmp_path)
    await store.open()
    try:
        state = await store.load_acceptor()
        assert state.snapshot is not None
        assert (state.snapshot.index, read_all(state.snapshot.blob)) == (5, b"state@5")
        assert not stray.exists()
        assert len(_files(tmp_path)) == 1
    finally:
        await store.close()


async def test_a_newer_snapshot_replaces_the_file_and_its_readers_read_on(tmp_path: Path) -> None:
    store = SqliteStorage(tmp_path)
    await store.open()
    try:
        await store.save_snapshot(5, MemoryBlob(b"state@5"))
        old = (await store.load_acceptor()).snapshot
        assert old is not None
        await store.save_snapshot(8, MemoryBlob(b"state@8"))
        assert [p.name.split("-")[1] for p in _files(tmp_path)] == [f"{8:016d}"]
        # A follower pulling the old one (the replica's retained snapshot) is
        # not disturbed: its descriptor outlives the file's name.
        assert read_all(old.blob) == b"state@5"
    finally:
        await store.close()


@pytest.mark.parametrize("damage", ["flip", "truncate", "remove"])
async def test_a_damaged_snapshot_file_is_corruption(tmp_path: Path, damage: str) -> None:
    store = SqliteStorage(tmp_path)
    await store.open()
    await store.save_snapshot(5, MemoryBlob(b"state@5" * 1000))
    await store.persist(None, [Record(6, (1, 1), b"r")], 6, None)
    await store.close()
    [snap] = _files(tmp_path, "snapshot-*.snap")
    if damage == "flip":
        data = bytearray(snap.read_bytes())
        data[100] ^= 1
        snap.write_bytes(bytes(data))
    elif damage == "truncate":
        os.truncate(snap, 10)
    else:
        snap.unlink()
    store = SqliteStorage(tmp_path)
    await store.open()
    try:
        with pytest.raises(StorageCorruptError, match="snapshot at index 5"):
            await store.load_acceptor()
    finally:
        await store.close()


def test_a_sink_that_cannot_write_says_so_and_leaves_nothing(tmp_path: Path) -> None:
    sink = FileSink(tmp_path / "missing-dir")
    sink.write(b"data")
    assert sink.error is not None
    assert sink.finish() is None
    good = FileSink(tmp_path)
    good.write(b"abc")
    assert good.finish(sha256(b"abd").digest()) is None  # not what was asked for
    assert not list(tmp_path.iterdir())
    blob = FileSink(tmp_path)
    blob.write(b"abc")
    made = blob.finish(sha256(b"abc").digest())
    assert isinstance(made, FileBlob)
    assert (made.size, made.read(1, 10)) == (3, b"bc")


async def _schema_v4(conn: asyncpg.Connection, schema: str, crc: int, data: bytes) -> None:
    """A schema as the release before snapshots in chunks left it (version 4),
    holding ``data`` as its snapshot at index 40 with checksum ``crc``."""
    await conn.execute(f"CREATE SCHEMA {schema}")
    await conn.execute(
        f"CREATE TABLE {schema}.schema_migrations "
        "(version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
    )
    async with conn.transaction():
        await conn.execute(f"SET LOCAL search_path TO {schema}")
        for version, sql in MIGRATIONS[:4]:
            await conn.execute(sql)
            await conn.execute("INSERT INTO schema_migrations (version) VALUES ($1)", version)
        await conn.execute("INSERT INTO snapshot VALUES (1, 40, $1, $2)", crc, data)


async def test_an_older_postgresql_schema_has_its_snapshot_cut_into_chunks() -> None:
    schema = pg.new_schema()
    data = os.urandom((2 << 20) + 999)
    conn = await asyncpg.connect(pg.dsn())
    try:
        await _schema_v4(conn, schema, _crc(40, data), data)
        store = PostgresStorage(pg.dsn(), schema)
        await store.open()
        try:
            state = await store.load_acceptor()
            assert state.snapshot is not None
            assert state.snapshot.index == 40
            assert read_all(state.snapshot.blob) == data
            assert state.snapshot.blob.digest == sha256(data).digest()
            chunks = await conn.fetchval(f"SELECT count(*) FROM {schema}.snapshot_chunks")
            assert chunks == 3
            # A newer snapshot replaces it, chunks and all.
            await store.save_snapshot(50, MemoryBlob(b"state@50"))
            rows = await conn.fetch(f"SELECT idx, seq FROM {schema}.snapshot_chunks")
            assert [(r["idx"], r["seq"]) for r in rows] == [(50, 0)]
        finally:
            await store.close()
    finally:
        await conn.close()
        await pg.drop_schemas(schema)


async def test_an_older_postgresql_snapshot_that_fails_its_crc_is_corruption() -> None:
    schema = pg.new_schema()
    conn = await asyncpg.connect(pg.dsn())
    try:
        await _schema_v4(conn, schema, 12345, b"state")
        store = PostgresStorage(pg.dsn(), schema)
        await store.open()
        try:
            with pytest.raises(StorageCorruptError, match="snapshot at index 40"):
                await store.load_acceptor()
        finally:
            await store.close()
    finally:
        await conn.close()
        await pg.drop_schemas(schema)
