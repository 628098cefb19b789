"""The ``Storage`` protocol: what a node persists, and how.

A node persists its Multi-Paxos acceptor state (the promised ballot, the
records it accepted or learned chosen, a commit-index hint) and snapshots of
its state machine. Every write returns only once durable (fsynced, or
committed with ``synchronous_commit`` on): nothing is acknowledged before.

Records carry a CRC32. Both stores (SQLite, PostgreSQL) commit atomically,
so there is no torn tail: any bad record is corruption, raised as
``StorageCorruptError``, and the node stops.

Snapshots are blobs (``consensus.blob.Blob``), never whole ``bytes``: a
store takes one as a file it can move into place or stream from
(``snapshot_sink`` makes one), and hands back a ``FileBlob`` on load,
verified against its SHA-256.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from consensus.blob import Blob
from consensus.messages import ZERO, Ballot, Record
from pqueue.storage.blobs import FileSink


@dataclass(frozen=True)
class StoredSnapshot:
    """A state-machine snapshot covering the log up to ``index``."""

    index: int
    blob: Blob


@dataclass(frozen=True)
class AcceptorState:
    """What a node finds on start."""

    promised: Ballot = ZERO
    #: Records after the snapshot, by slot.
    records: list[Record] = field(default_factory=list)
    commit_index: int = 0
    snapshot: StoredSnapshot | None = None


class Storage(Protocol):
    """A node's durable acceptor state and snapshots."""

    @property
    def available(self) -> bool:
        """False while the store cannot be reached (its writes wait and retry);
        the node refuses new writes meanwhile. An embedded store always is."""

    async def open(self) -> None:
        """Create or migrate the store and take exclusive ownership of it."""

    async def close(self) -> None:
        """Release the store; safe to call twice."""

    def describe(self) -> str:
        """Where the data lives, for logs and status output."""

    async def load_acceptor(self) -> AcceptorState:
        """The promise, the records after the snapshot, the commit hint, the snapshot."""

    async def persist(
        self,
        promised: Ballot | None,
        records: Sequence[Record],
        commit_index: int | None,
        snapshot: StoredSnapshot | None,
    ) -> None:
        """Durably store one Ready's worth of state, in one transaction.

        A snapshot replaces an older one (never a newer one) and drops the
        records it covers; the commit hint only ever moves forward. Its blob
        is best a file from ``snapshot_sink`` (moved into place, not copied);
        one that is not recorded (not newer) has its temporary file removed.
        """

    async def save_snapshot(self, index: int, blob: Blob) -> None:
        """Durably store a snapshot this node took (see ``persist``)."""

    def snapshot_sink(self) -> FileSink:
        """A new temporary file for a snapshot this store may then record:
        written chunk by chunk, hashed as it goes (``pqueue.storage.blobs``)."""

    async def load_identity(self) -> str | None:
        """The identity record (``pqueue.node.identity.Identity.to_json``), None before
        the first start."""

    async def save_identity(self, record: str) -> None:
        """Durably replace the identity record."""


def record_row(r: Record) -> tuple[int, int, int, bool, int, bytes]:
    """A record as both stores keep it: slot, ballot, chosen, CRC, value."""
    return (r.slot, r.ballot[0], r.ballot[1], r.chosen, checksum(r.slot, r.value), r.value)


def checksum(index: int, data: bytes) -> int:
    """CRC32 over the index and the bytes, so a record moved to another slot fails too."""
    return zlib.crc32(data, zlib.crc32(index.to_bytes(8, "big")))


def open_storage(url: str, schema: str = "pqueue", spool_dir: Path | None = None) -> Storage:
    """A store from ``sqlite:PATH`` (a data directory), a bare directory path,
    or ``postgresql://…`` (in ``schema``, one per node; ``spool_dir``: where
    it keeps local copies of snapshots, default the system's temp dir)."""
    from pqueue.storage.sqlite import SqliteStorage

    if url.startswith(("postgresql://", "postgres://")):
        from pqueue.storage.postgres import PostgresStorage

        return PostgresStorage(url, schema, spool_dir=spool_dir)
    if url.startswith("sqlite:"):
        return SqliteStorage(Path(url.removeprefix("sqlite:")))
    if "://" in url:
        raise ValueError(f"unsupported store {url!r}: use sqlite:PATH or postgresql://…")
    return SqliteStorage(Path(url))
