"""A process that persists records 1, 2, 3, ... and prints each one once durable.

``python -m tests.contract.writer sqlite:PATH`` or ``... postgresql://DSN SCHEMA``:
the contract suite ``kill -9``s it mid-stream and checks that every printed
(acknowledged) record survived and that what is stored is a prefix.
"""

from __future__ import annotations

import asyncio
import sys

from consensus.messages import Record
from pqueue.storage import open_storage


async def main(url: str, schema: str) -> None:
    store = open_storage(url, schema)
    await store.open()
    slot = 0
    while True:
        slot += 1
        # A few records per write, like a Ready; a bigger value now and then.
        size = 64 if slot % 7 else 64 * 1024
        await store.persist((1, 1), [Record(slot, (1, 1), bytes([slot % 251]) * size)], slot, None)
        print(slot, flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "pqueue"))
