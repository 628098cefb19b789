"""Large states, fast: a machine filled by applying entries directly, and
data dirs seeded with its snapshot (as if their log had been compacted to it).

A node started on a seeded dir restores the snapshot and serves from there;
a node started on an empty dir next to them must catch up by the snapshot.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from pqueue.core.machine import QueueMachine
from pqueue.core.snapshot import freeze
from pqueue.storage.sqlite import SqliteStorage
from pqueue.v1 import log_pb2 as logpb


def filled_machine(jobs: int, batch: int = 1000, payload_bytes: int = 100) -> QueueMachine:
    """``jobs`` pending jobs of ``payload_bytes`` in queue ``q``, priorities
    0..9, applied as EnqueueBatch entries of ``batch`` jobs (index = entries)."""
    machine = QueueMachine()
    for b in range(-(-jobs // batch)):
        entry = logpb.LogEntry(index=b + 1, time_ms=1_000 + b)
        req = entry.commands.add().enqueue
        req.queue = "q"
        for i in range(min(batch, jobs - b * batch)):
            req.jobs.add(payload=os.urandom(payload_bytes // 2).hex().encode(), priority=i % 10)
        machine.apply_entry(entry)
    return machine


@dataclass(frozen=True)
class Seeded:
    index: int
    size: int
    digest: bytes
    #: Freezing the state, serializing and writing it (hashed, fsynced): seconds.
    write_s: float


async def seed_dirs(machine: QueueMachine, dirs: list[Path]) -> Seeded:
    """Record ``machine``'s snapshot as the snapshot of each SQLite data dir,
    written the way a node writes its own (chunks to a file, then recorded)."""
    started = time.perf_counter()
    view = freeze(machine)
    first = None
    for where in dirs:
        store = SqliteStorage(where)
        await store.open()
        try:
            sink = store.snapshot_sink()
            for chunk in view.chunks():
                sink.write(chunk)
            blob = sink.finish_synced()
            assert blob is not None, sink.error
            if first is None:
                first = Seeded(view.index, blob.size, blob.digest, time.perf_counter() - started)
            await store.save_snapshot(view.index, blob)
        finally:
            await store.close()
    assert first is not None
    return first
