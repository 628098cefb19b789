"""A process that takes snapshots 1, 2, 3, ... (4 MiB each, streamed to a file
through the store's sink) and prints each index once it is recorded.

``python -m tests.contract.snapshot_writer URL [SCHEMA]``: the contract suite
``kill -9``s it mid-write and checks that the store then holds a whole,
verified snapshot at least as new as the last printed one, and no leftover.
"""

from __future__ import annotations

import asyncio
import sys

from pqueue.storage import open_storage

SIZE = 4 << 20
PIECE = 256 << 10


def content(index: int) -> bytes:
    """The bytes of snapshot ``index`` (the test recomputes them)."""
    return (index.to_bytes(8, "big") * (SIZE // 8))[:SIZE]


async def main(url: str, schema: str) -> None:
    store = open_storage(url, schema)
    await store.open()
    index = 0
    while True:
        index += 1
        data = content(index)
        sink = store.snapshot_sink()
        for offset in range(0, SIZE, PIECE):
            sink.write(data[offset : offset + PIECE])
            await asyncio.sleep(0)
        blob = sink.finish_synced()
        assert blob is not None
        await store.save_snapshot(index, blob)
        print(index, flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "pqueue"))
