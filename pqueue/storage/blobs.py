"""Snapshots in files: what the stores hand the replica (``consensus.blob``).

A ``FileBlob`` is a snapshot file read with ``os.pread`` through a
descriptor it keeps open, so the file may be renamed into place, or
unlinked once a newer snapshot replaced it, while a follower still pulls
chunks of it (the space goes when the blob does). A ``FileSink`` writes one
to a temporary file (``*.tmp``, never a snapshot a store would load),
hashing as it goes; a store makes it durable (``FileBlob.sync``) and moves
it into place when it records it.

The loop calls ``write`` and ``read`` directly (a chunk is about 1 MiB, a
page-cache copy); whole-file work (``sync``, ``verify``) runs on a store's
or the log's worker thread.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import weakref
from hashlib import sha256
from pathlib import Path

from consensus.blob import Blob

logger = logging.getLogger(__name__)

#: Reading and copying go in pieces of this size.
PIECE = 1 << 20
#: The suffix of a snapshot being written: ignored (and removed) on open.
TMP_SUFFIX = ".tmp"


class FileBlob:
    """A snapshot file, read through an open descriptor (see the module doc)."""

    def __init__(self, path: Path, fd: int, size: int, digest: bytes, synced: bool) -> None:
        #: Where the file is now (a store renames it into place; None once unlinked).
        self.path: Path | None = path
        self._fd = fd
        self._size = size
        self._digest = digest
        #: Durable on disk (fsynced) already, or need not be (a store's cache).
        self.synced = synced
        self._closer = weakref.finalize(self, os.close, fd)

    @classmethod
    def open(cls, path: Path, digest: bytes | None = None) -> FileBlob:
        """The blob of an existing file; ``digest`` None: computed (reads it all)."""
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            size = os.fstat(fd).st_size
            blob = cls(path, fd, size, digest or b"", synced=True)
        except BaseException:
            os.close(fd)
            raise
        if digest is None:
            blob._digest = blob.hash()
        return blob

    @property
    def size(self) -> int:
        return self._size

    @property
    def digest(self) -> bytes:
        return self._digest

    def read(self, offset: int, n: int) -> bytes:
        n = max(0, min(n, self._size - offset))
        data = os.pread(self._fd, n, offset)
        if len(data) == n:
            return data
        parts = [data]  # a short read (rare on a regular file): go on
        got = len(data)
        while got < n:
            more = os.pread(self._fd, n - got, offset + got)
            if not more:
                raise OSError(f"snapshot file {self.path} ends at {offset + got}, not {n}")
            parts.append(more)
            got += len(more)
        return b"".join(parts)

    def hash(self) -> bytes:
        """SHA-256 of the file's bytes as they are on disk now (reads it all)."""
        h = sha256()
        for offset in range(0, self._size, PIECE):
            h.update(self.read(offset, PIECE))
        return h.digest()

    def verify(self) -> bool:
        """Whether the file still holds what its digest says (reads it all)."""
        return os.fstat(self._fd).st_size == self._size and self.hash() == self._digest

    def sync(self) -> None:
        """Make the bytes durable (fsync), once."""
        if not self.synced:
            os.fsync(self._fd)
            self.synced = True

    def unlink(self) -> None:
        """Remove the file's name (readers of this blob go on reading)."""
        if self.path is not None:
            path, self.path = self.path, None
            remove(path)

    def close(self) -> None:
        """Close the descriptor now (the file is not read any more)."""
        self._closer()


#: A durable sink flushes (fdatasync) after this many bytes: the disk's
#: queue never holds more than this of a snapshot ahead of a log write.
SYNC_EVERY_BYTES = 2 << 20


class FileSink:
    """Writes a snapshot to ``<directory>/<prefix>-<random>.tmp``, hashing
    it as it goes (a ``consensus.blob.BlobSink``).

    An IO error (a full disk) is logged and remembered: ``finish`` then
    returns None and the file is gone. ``durable``: the blob must be
    fsynced before a store records it (SQLite's file is the snapshot; a
    PostgreSQL store keeps the bytes in the database and this is a cache).
    """

    def __init__(self, directory: Path, prefix: str = "snapshot", durable: bool = True) -> None:
        self.durable = durable
        self.path = directory / f"{prefix}-{secrets.token_hex(8)}{TMP_SUFFIX}"
        self.size = 0
        self._synced = 0
        self._hash = sha256()
        self._fd: int | None = None
        self.error: OSError | None = None
        try:
            self._fd = os.open(
                self.path,
                os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0),
                0o644,
            )
        except OSError as exc:
            self._fail(exc)

    def write(self, data: bytes) -> None:
        if self._fd is None:
            return
        try:
            view = memoryview(data)
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
        except OSError as exc:
            self._fail(exc)
            return
        self._hash.update(data)
        self.size += len(data)
        if self.durable and self.size - self._synced >= SYNC_EVERY_BYTES:
            # Flush as we go: one fsync of a whole snapshot at the end would
            # queue every log write's own fsync behind it (a stall of the
            # write path as long as the disk takes for ~100 MB).
            try:
                os.fdatasync(self._fd)
            except OSError as exc:
                self._fail(exc)
                return
            self._synced = self.size

    def digest(self) -> bytes:
        """SHA-256 of what was written so far."""
        return self._hash.digest()

    def finish(self, digest: bytes | None = None) -> FileBlob | None:
        """The blob written (its SHA-256 as computed here; ``digest``, if
        given, must match it); None if writing failed."""
        fd, self._fd = self._fd, None
        if fd is None:
            return None
        ours = self._hash.digest()
        if digest is not None and digest != ours:
            os.close(fd)
            remove(self.path)
            return None
        return FileBlob(self.path, fd, self.size, ours, synced=not self.durable)

    def finish_synced(self) -> FileBlob | None:
        """``finish``, then fsync (on a worker thread: a whole file's worth)."""
        blob = self.finish()
        if blob is not None:
            try:
                blob.sync()
            except OSError as exc:
                blob.unlink()
                blob.close()
                self._fail(exc)
                return None
        return blob

    def abort(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
        remove(self.path)

    def _fail(self, exc: OSError) -> None:
        if self.error is None:
            logger.warning("cannot write snapshot file %s: %s", self.path, exc)
        self.error = exc
        self.abort()


def remove(path: Path) -> None:
    """Unlink ``path`` if it is there."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def sync_dir(directory: Path) -> None:
    """fsync a directory, so a rename or a new name in it is durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def copy_to(blob: Blob, sink: FileSink) -> FileBlob | None:
    """``blob``'s bytes into ``sink`` (a blob not in a file of ours yet)."""
    for offset in range(0, blob.size, PIECE):
        sink.write(blob.read(offset, PIECE))
    return sink.finish(blob.digest)


def is_temporary(path: Path) -> bool:
    """A file a sink was writing when the process stopped."""
    return path.name.endswith(TMP_SUFFIX)


#: Re-exported for the stores.
__all__ = ["PIECE", "FileBlob", "FileSink", "copy_to", "is_temporary", "remove", "sync_dir"]
