"""The Storage contract, run against every store (SQLite here; PostgreSQL joins next)."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from consensus.messages import Record
from pqueue.errors import StorageCorruptError, StorageError
from pqueue.storage import Storage, StoredSnapshot
from pqueue.storage.sqlite import SqliteStorage

StoreFactory = Callable[[], Storage]


def rec(slot: int, value: bytes = b"v", ballot: tuple[int, int] = (1, 1)) -> Record:
    return Record(slot, ballot, value)


@pytest.fixture(params=["sqlite"])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> StoreFactory:
    """A factory of stores that all open the same underlying data."""
    return lambda: SqliteStorage(tmp_path / "data")


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
    await store.persist(None, [], None, StoredSnapshot(3, b"state@3"))
    await store.save_snapshot(4, b"state@4")
    await store.save_snapshot(2, b"state@2")  # older: must not replace the newer one
    store = await reopened(store, make_store)
    try:
        state = await store.load_acceptor()
        assert state.snapshot == StoredSnapshot(4, b"state@4")
        assert [r.slot for r in state.records] == [5]
    finally:
        await store.close()


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


async def _reopened_with_bad_record(path: Path, slot: int) -> SqliteStorage:
    """A store holding records 1..3 whose record ``slot`` no longer matches its CRC."""
    store = SqliteStorage(path)
    await store.open()
    await store.persist((1, 1), [rec(1, b"a"), rec(2, b"b"), rec(3, b"c")], None, None)
    await store.close()
    conn = sqlite3.connect(path / "pqueue.db")
    conn.execute("UPDATE records SET value = X'DEADBEEF' WHERE slot = ?", (slot,))
    conn.commit()
    conn.close()
    store = SqliteStorage(path)
    await store.open()
    return store


@pytest.mark.parametrize("slot", [2, 3])
async def test_a_bad_record_is_corruption_even_the_last(tmp_path: Path, slot: int) -> None:
    # SQLite commits atomically, so there is no torn tail: a committed record
    # that fails its CRC may have been acknowledged, and must stop the node.
    store = await _reopened_with_bad_record(tmp_path, slot)
    try:
        with pytest.raises(StorageCorruptError, match=f"record {slot}"):
            await store.load_acceptor()
    finally:
        await store.close()


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
