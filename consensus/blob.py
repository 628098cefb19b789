"""Snapshots as blobs: the replica reads its snapshot through a ``Blob`` and
writes one it receives through a ``BlobSink``, so it never holds a whole
snapshot's bytes (a million-job state is ~130 MB).

The shell decides where the bytes live: ``pqueue.storage.blobs`` keeps them
in a file (read with ``os.pread``); the simulator and unit tests use the
in-memory ``MemoryBlob`` and ``MemorySink`` here. Pure: no IO in this module.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from hashlib import sha256
from typing import Protocol


class Blob(Protocol):
    """A snapshot's bytes, read piece by piece; immutable once made."""

    @property
    def size(self) -> int:
        """How many bytes."""

    @property
    def digest(self) -> bytes:
        """SHA-256 of all of them (every transferred chunk carries it)."""

    def read(self, offset: int, n: int) -> bytes:
        """Up to ``n`` bytes from ``offset`` (fewer only at the end)."""


class BlobSink(Protocol):
    """Where a snapshot being received goes, chunk by chunk, in order.

    The replica verifies size and digest itself; the sink only keeps bytes.
    """

    def write(self, data: bytes) -> None:
        """Append ``data`` (a sink that cannot, e.g. a full disk, remembers
        it and returns None from ``finish``)."""

    def finish(self, digest: bytes) -> Blob | None:
        """The blob of everything written, whose SHA-256 the replica checked
        is ``digest``; None if the sink failed (the transfer starts over)."""

    def abort(self) -> None:
        """Drop what was written (a stalled, overtaken or corrupt transfer)."""


@dataclass(frozen=True, slots=True)
class MemoryBlob:
    """A blob in memory (the simulator's, tests', and small snapshots')."""

    data: bytes
    digest: bytes = field(default=b"", compare=False)

    def __post_init__(self) -> None:
        if not self.digest:
            object.__setattr__(self, "digest", sha256(self.data).digest())

    @property
    def size(self) -> int:
        return len(self.data)

    def read(self, offset: int, n: int) -> bytes:
        return self.data[offset : offset + n]


class MemorySink:
    """A ``BlobSink`` into memory."""

    def __init__(self) -> None:
        self._data = bytearray()

    def write(self, data: bytes) -> None:
        self._data += data

    def finish(self, digest: bytes) -> Blob | None:
        return MemoryBlob(bytes(self._data), digest)

    def abort(self) -> None:
        self._data = bytearray()


def memory_sink(index: int, total: int) -> BlobSink:
    """The default sink factory (``Replica(sinks=...)``)."""
    return MemorySink()


def as_blob(snapshot: Blob | bytes) -> Blob:
    """``snapshot`` as a blob (bytes are wrapped in a ``MemoryBlob``)."""
    return MemoryBlob(snapshot) if isinstance(snapshot, bytes) else snapshot


def pieces(blob: Blob, size: int = 1 << 20) -> Iterator[bytes]:
    """``blob``'s bytes in order, ``size`` at a time (never all at once)."""
    for offset in range(0, blob.size, size):
        yield blob.read(offset, size)


def read_all(blob: Blob) -> bytes:
    """Every byte of ``blob`` (materializes it: only where the caller must)."""
    return blob.read(0, blob.size)
