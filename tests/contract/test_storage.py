"""The Storage contract, run against every store: SQLite and PostgreSQL.

PostgreSQL runs where ``tests.pg`` finds one (``PQ_TEST_PG_DSN``, or the
default DSN), each test in a schema of its own, dropped afterwards; elsewhere
those cases skip and say why.
"""

from __future__ import annotations

import asyncio
import os
import random
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Callable
from hashlib import sha256
from pathlib import Path

import asyncpg
import pytest

from consensus.blob import MemoryBlob, read_all
from consensus.messages import Record
from pqueue.errors import StorageCorruptError, StorageError
from pqueue.storage import Storage, StoredSnapshot, open_storage
from pqueue.storage.blobs import FileBlob, is_temporary
from pqueue.storage.sqlite import SqliteStorage
from tests import pg
from tests.contract import snapshot_writer

StoreFactory = Callable[[], Storage]


def rec(slot: int, value: bytes = b"v", ballot: tuple[int, int] = (1, 1)) -> Record:
    return Record(slot, ballot, value)


class Kind:
    """One store under test: how to open it, and how to tamper with its bytes."""

    def __init__(self, name: str, url: str, schema: str) -> None:
        self.name, self.url, self.schema = name, url, schema

    def make(self) -> Storage:
        return open_storage(self.url, self.schema)

    def temporaries(self) -> list[Path]:
        """Snapshot files a sink left behind (none once a store opened)."""
        if self.name == "sqlite":
            where, prefix = Path(self.url.removeprefix("sqlite:")), "snapshot"
        else:
            where, prefix = Path(tempfile.gettempdir()), f"pq-{self.schema}-snapshot"
        return [p for p in where.glob(f"{prefix}-*") if is_temporary(p)]

    async def tamper(self, slot: int) -> None:
        """Change record ``slot``'s bytes behind the store's back."""
        if self.name == "sqlite":
            conn = sqlite3.connect(Path(self.url.removeprefix("sqlite:")) / "pqueue.db")
            conn.execute("UPDATE records SET value = X'DEADBEEF' WHERE slot = ?", (slot,))
            conn.commit()
            conn.close()
            return
        pgconn = await asyncpg.connect(self.url)
        try:
            await pgconn.execute(
                f"UPDATE {self.schema}.records SET value = '\\xdeadbeef' WHERE slot = $1", slot
            )
        finally:
            await pgconn.close()


@pytest.fixture(params=["sqlite", "postgres"])
async def kind(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Kind]:
    if request.param == "sqlite":
        yield Kind("sqlite", f"sqlite:{tmp_path / 'data'}", "")
        return
    k = Kind("postgres", pg.dsn(), pg.new_schema())
    try:
        yield k
    finally:
        await pg.drop_schemas(k.schema)


@pytest.fixture
def make_store(kind: Kind) -> StoreFactory:
    """A factory of stores that all open the same underlying data."""
    return kind.make


@pytest.fixture
async def store(make_store: StoreFactory) -> AsyncIterator[Storage]:
    s = make_store()
    await s.open()
    try:
        yield s
    finally:
        await s.close()


async def reopened(store: Storage, make_store: StoreFactory) -> Storage:
    await store.close()
    fresh = make_store()
    await fresh.open()
    return fresh


async def test_acceptor_state_survives_a_restart(store: Storage, make_store: StoreFactory) -> None:
    await store.persist((2, 1), [rec(1, b"one"), rec(2, b"two")], 1, None)
    await store.persist(None, [rec(3, b"three", (2, 1))], None, None)
    store = await reopened(store, make_store)
    try:
        state = await store.load_acceptor()
        assert state.promised == (2, 1)
        assert [(r.slot, r.value, r.ballot) for r in state.records] == [
            (1, b"one", (1, 1)),
            (2, b"two", (1, 1)),
            (3, b"three", (2, 1)),
        ]
        assert (state.commit_index, state.snapshot) == (1, None)
    finally:
        await store.close()


async def test_a_commit_hint_keeps_the_promise_and_a_promise_keeps_the_hint(
    store: Storage, make_store: StoreFactory
) -> None:
    await store.persist((2, 1), [], None, None)
    await store.persist(None, [rec(1)], 3, None)  # a hint alone: the promise stays
    await store.persist((3, 2), [], None, None)  # a promise alone: the hint stays
    await store.persist(None, [], 2, None)  # an older hint changes nothing
    assert ((s := await store.load_acceptor()).promised, s.commit_index) == ((3, 2), 3)
    store = await reopened(store, make_store)
    try:
        assert ((s := await store.load_acceptor()).promised, s.commit_index) == ((3, 2), 3)
    finally:
        await store.close()


async def test_a_record_is_replaced_by_a_later_accept(store: Storage) -> None:
    await store.persist((1, 1), [rec(1, b"old", (1, 1))], None, None)
    await store.persist((2, 2), [Record(1, (2, 2), b"new", chosen=True)], None, None)
    [record] = (await store.load_acceptor()).records
    assert (record.value, record.ballot, record.chosen) == (b"new", (2, 2), True)


async def test_the_commit_hint_only_moves_forward(store: Storage) -> None:
    await store.persist(None, [], 5, None)
    await store.persist(None, [], 2, None)
    assert (await store.load_acceptor()).commit_index == 5


async def test_a_snapshot_drops_what_it_covers_and_never_goes_back(
    store: Storage, make_store: StoreFactory
) -> None:
    await store.persist((1, 1), [rec(i) for i in range(1, 6)], 5, None)
    await store.persist(None, [], None, StoredSnapshot(3, MemoryBlob(b"state@3")))
    await store.save_snapshot(4, MemoryBlob(b"state@4"))
    await store.save_snapshot(2, MemoryBlob(b"state@2"))  # older: must not replace the newer one
    store = await reopened(store, make_store)
    try:
        state = await store.load_acceptor()
        assert state.snapshot is not None
        assert (state.snapshot.index, read_all(state.snapshot.blob)) == (4, b"state@4")
        assert state.snapshot.blob.digest == sha256(b"state@4").digest()
        assert [r.slot for r in state.records] == [5]
    finally:
        await store.close()


async def test_a_snapshot_streamed_to_a_file_is_recorded_and_loads_in_chunks(
    store: Storage, make_store: StoreFactory
) -> None:
    data = os.urandom(3 * (1 << 20) + 12_345)  # not a whole number of chunks
    sink = store.snapshot_sink()
    for offset in range(0, len(data), 100_000):
        sink.write(data[offset : offset + 100_000])
    blob = sink.finish()
    assert blob is not None
    assert blob.digest == sha256(data).digest()
    await store.persist((1, 1), [rec(i) for i in range(1, 10)], 9, None)
    await store.save_snapshot(7, blob)
    # Moved into place (SQLite) or copied and let go (PostgreSQL): no temporary
    # name remains, and whoever holds the blob (the replica) reads on.
    assert blob.path is None or not is_temporary(blob.path)
    assert blob.read(3 << 20, 1 << 20) == data[3 << 20 :]
    store = await reopened(store, make_store)
    try:
        state = await store.load_acceptor()
        assert state.snapshot is not None
        loaded = state.snapshot.blob
        assert isinstance(loaded, FileBlob)
        assert (state.snapshot.index, loaded.size, loaded.digest) == (
            7,
            len(data),
            sha256(data).digest(),
        )
        assert read_all(loaded) == data
        assert [r.slot for r in state.records] == [8, 9]
    finally:
        await store.close()


async def test_a_snapshot_file_cut_short_is_ignored_and_removed_at_restart(
    store: Storage, make_store: StoreFactory
) -> None:
    await store.save_snapshot(3, MemoryBlob(b"state@3"))
    partial = store.snapshot_sink()
    partial.write(b"the first half of snapshot 4")  # ...and the process dies here
    store = await reopened(store, make_store)
    try:
        assert not partial.path.exists()
        state = await store.load_acceptor()
        assert state.snapshot is not None
        assert (state.snapshot.index, read_all(state.snapshot.blob)) == (3, b"state@3")
    finally:
        partial.abort()
        await store.close()


async def test_kill_9_while_snapshotting_leaves_a_whole_snapshot_and_no_leftover(
    kind: Kind,
) -> None:
    cmd = [sys.executable, "-m", "tests.contract.snapshot_writer", kind.url, kind.schema or "x"]
    writer = _spawn(cmd)
    acked = 0
    try:
        assert writer.stdout is not None
        while acked < 3:
            line = await asyncio.to_thread(writer.stdout.readline)
            assert line, "the writer died on its own"
            acked = int(line)
        await asyncio.sleep(random.uniform(0, 0.05))  # somewhere in the next write
    finally:
        writer.kill()
        await asyncio.to_thread(writer.wait)
        if writer.stdout is not None:
            writer.stdout.close()
    store = kind.make()
    await store.open()
    try:
        state = await store.load_acceptor()  # verified against its digest on load
    finally:
        await store.close()
    assert state.snapshot is not None
    assert state.snapshot.index >= acked
    assert read_all(state.snapshot.blob) == snapshot_writer.content(state.snapshot.index)
    assert not kind.temporaries()


async def test_a_failed_write_writes_nothing(store: Storage) -> None:
    await store.persist((1, 1), [rec(1)], None, None)
    broken = Record(2, (1, 1), None)  # type: ignore[arg-type]
    with pytest.raises((StorageError, TypeError)):
        await store.persist((9, 9), [rec(3), broken], 7, None)
    state = await store.load_acceptor()
    assert (state.promised, [r.slot for r in state.records], state.commit_index) == ((1, 1), [1], 0)


async def test_concurrent_writes_all_land(store: Storage) -> None:
    await asyncio.gather(*(store.persist(None, [rec(i)], None, None) for i in range(1, 51)))
    assert [r.slot for r in (await store.load_acceptor()).records] == list(range(1, 51))


async def test_a_second_opener_is_refused(store: Storage, make_store: StoreFactory) -> None:
    with pytest.raises(StorageError, match="in use"):
        await make_store().open()


@pytest.mark.parametrize("slot", [2, 3])
async def test_a_bad_record_is_corruption_even_the_last(kind: Kind, slot: int) -> None:
    # Both stores commit atomically, so there is no torn tail: a committed
    # record that fails its CRC may have been acknowledged, and must stop
    # the node.
    store = kind.make()
    await store.open()
    await store.persist((1, 1), [rec(1, b"a"), rec(2, b"b"), rec(3, b"c")], None, None)
    await store.close()
    await kind.tamper(slot)
    store = kind.make()
    await store.open()
    try:
        with pytest.raises(StorageCorruptError, match=f"record {slot}"):
            await store.load_acceptor()
    finally:
        await store.close()


async def test_a_crash_between_write_and_commit_keeps_every_acknowledged_write(
    kind: Kind,
) -> None:
    """``kill -9`` a writer mid-stream: what it was told is durable is there,
    and what is there is a prefix (no hole, no half record)."""
    cmd = [sys.executable, "-m", "tests.contract.writer", kind.url, kind.schema or "pqueue"]
    writer = _spawn(cmd)
    acked = 0
    try:
        assert writer.stdout is not None
        while acked < 40:
            line = await asyncio.to_thread(writer.stdout.readline)
            assert line, "the writer died on its own"
            acked = int(line)
    finally:
        writer.kill()
        await asyncio.to_thread(writer.wait)
        if writer.stdout is not None:
            writer.stdout.close()
    store = kind.make()
    await store.open()
    try:
        state = await store.load_acceptor()
    finally:
        await store.close()
    slots = [r.slot for r in state.records]
    assert slots == list(range(1, len(slots) + 1))  # a prefix
    assert len(slots) >= acked  # every acknowledged one
    size = {r.slot: len(r.value) for r in state.records}
    assert all(size[i] == (64 if i % 7 else 64 * 1024) for i in slots)  # none torn


def _spawn(cmd: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)


async def test_sqlite_runs_in_wal_with_full_sync(tmp_path: Path) -> None:
    store = SqliteStorage(tmp_path)
    await store.open()
    try:
        conn = sqlite3.connect(tmp_path / "pqueue.db")
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        conn.close()
        sync = await store._run(lambda c: c.execute("PRAGMA synchronous").fetchone()[0])
        assert sync == 2  # FULL
    finally:
        await store.close()


async def test_the_identity_record_survives_a_restart_and_is_replaced_whole(
    store: Storage, make_store: StoreFactory
) -> None:
    assert await store.load_identity() is None  # a new store: first start
    await store.save_identity('{"node_id": 1}')
    await store.save_identity('{"node_id": 2}')
    store = await reopened(store, make_store)
    try:
        assert await store.load_identity() == '{"node_id": 2}'
        await store.persist((1, 1), [rec(1)], 1, None)  # the log does not touch it
        assert await store.load_identity() == '{"node_id": 2}'
    finally:
        await store.close()
