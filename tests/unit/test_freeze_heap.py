"""``freeze_startup_heap``: what is alive when a server is up leaves the
cyclic collector's scans; what comes later is collected as before. And
``serving_process``'s youngest threshold (``--gc-young``): set while it
serves and starts, the collector still running by itself."""

from __future__ import annotations

import subprocess
import sys

import pytest

from balancer.config import BalancerConfig

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
from pqueue.wire.loop import GC_YOUNG, collector_tuned, serving_process

class Node:
    pass

async def main() -> None:
    assert GC_YOUNG > gc.get_threshold()[0] == 700
    older = gc.get_threshold()[1:]
    with collector_tuned(1000) as thresholds:
        assert thresholds == gc.get_threshold() == (1000, *older)
        async with serving_process(CollectorRegistry()):
            # The collector still runs by itself: a cycle is freed once
            # enough objects were made after it, no gc.collect() asked for.
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
    assert gc.get_threshold() == (700, *older)
    try:
        with collector_tuned():
            assert gc.get_threshold()[0] == GC_YOUNG
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert gc.get_threshold() == (700, *older)
    try:
        with collector_tuned(0):
            raise AssertionError("0 turns automatic collection off: refused")
    except ValueError as exc:
        assert "100 or more" in str(exc), exc
    print("ok")

asyncio.run(main())
"""


def test_the_collectors_threshold_is_set_while_serving_and_it_still_collects() -> None:
    done = subprocess.run(
        [sys.executable, "-c", SERVING], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_a_balancer_refuses_a_youngest_threshold_that_turns_collection_off() -> None:
    with pytest.raises(ValueError, match="gc_young must be 100 or more, not 0"):
        BalancerConfig(backends=("127.0.0.1:1",), gc_young=0).validate()
