"""``freeze_startup_heap``: what is alive when a server is up leaves the
cyclic collector's scans; what comes later is collected as before."""

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
