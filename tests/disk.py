"""The real SQLite store with faults injected on demand: a write that fails
(as ENOSPC would) or one that stalls (as a busy or shared disk does)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from consensus.blob import Blob
from consensus.messages import Ballot, Record
from pqueue.errors import StorageError
from pqueue.storage.base import StoredSnapshot
from pqueue.storage.sqlite import SqliteStorage


class FaultyDisk(SqliteStorage):
    """``fail_append``: log writes fail; ``fail_snapshot``: the next snapshot
    fails; ``stall_s``: each log write takes that much longer."""

    fail_append = False
    fail_snapshot = False
    stall_s = 0.0

    async def persist(
        self,
        promised: Ballot | None,
        records: Sequence[Record],
        commit_index: int | None,
        snapshot: StoredSnapshot | None,
    ) -> None:
        if self.fail_append:
            raise StorageError("injected: no space left on device")
        await super().persist(promised, records, commit_index, snapshot)
        if self.stall_s:
            await asyncio.sleep(self.stall_s)

    async def save_snapshot(self, index: int, blob: Blob) -> None:
        if self.fail_snapshot:
            self.fail_snapshot = False
            raise StorageError("injected: no space left on device")
        await super().save_snapshot(index, blob)
