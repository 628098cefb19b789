"""``freeze_startup_heap``: what is alive when a server is up leaves the
cyclic collector's scans; what comes later is collected as before. And
``serving_process``'s youngest threshold (``--gc-young``): set while it
serves, the collector still running by itself."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import gc, weakref
from pqueue.wire.loop import freeze_startup_heap

class Node:
    pass

kept = [Node() for _ in range(1000)]
frozen = freeze_startup_heap()
assert frozen >= 1000 and gc.get_freeze_count() == frozen, frozen

# A cycle made after the freeze is still found and freed by a collection.
a, b = Node(), Node()
a.other, b.other = b, a
gone = weakref.ref(a)
del a, b
gc.collect()
assert gone() is None
# Frozen objects still die by reference counting.
probe = weakref.ref(kept[0])
del kept
assert probe() is None
print("ok")
"""


def test_freezing_keeps_later_cycles_collectable() -> None:
    done = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


SERVING = """
import asyncio, gc, weakref
from prometheus_client.registry import CollectorRegistry
from pqueue.wire.loop import GC_YOUNG, serving_process

class Node:
    pass

async def main() -> None:
    assert GC_YOUNG > gc.get_threshold()[0] == 700
    async with serving_process(CollectorRegistry(), gc_young=1000):
        assert gc.get_threshold()[0] == 1000, gc.get_threshold()
        # The collector still runs by itself: a cycle is freed once enough
        # objects were made after it, with no gc.collect() asked for.
        a, b = Node(), Node()
        a.other, b.other = b, a
        gone = weakref.ref(a)
        del a, b
        kept = []
        for _ in range(20_000):
            kept.append([])
            if gone() is None:
                break
        assert gone() is None
    assert gc.get_threshold()[0] == 700
    async with serving_process(CollectorRegistry()):
        assert gc.get_threshold()[0] == GC_YOUNG
    print("ok")

asyncio.run(main())
"""


def test_a_serving_process_sets_the_youngest_threshold_and_still_collects() -> None:
    done = subprocess.run(
        [sys.executable, "-c", SERVING], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
