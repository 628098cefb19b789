"""The event loop every program runs on, and the process's open-file limit."""

from __future__ import annotations

import asyncio
import gc
import logging
import resource
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

from prometheus_client.registry import CollectorRegistry

from pqueue.wire.logs import describe
from pqueue.wire.stalls import StallWatch

logger = logging.getLogger(__name__)


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop where it is installed, asyncio's loop elsewhere."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency off Windows
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def raise_fd_limit() -> int:
    """Raise this process's soft open-file limit to its hard limit; the new soft limit.

    Each client connection holds a descriptor: at the common default of 1,024
    a thousand idle connections locked every other client out. Entry points
    call this (it changes the whole process)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft == resource.RLIM_INFINITY or (target != resource.RLIM_INFINITY and soft >= target):
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as exc:
        logger.warning(
            "cannot raise the open-file limit from %d to %d: %s", soft, target, describe(exc)
        )
        return soft
    logger.debug("open-file limit raised from %d to %d", soft, target)
    return target


def freeze_startup_heap() -> int:
    """Move every object alive now out of the cyclic collector's reach; how many.

    Called once a server is up: its modules, descriptors and (on a node) the
    state it recovered are live for good, yet every full collection scanned
    them again, on the event loop: 25-95 ms pauses on a bench node, each one
    a latency spike for every caller waiting then. Frozen objects are still
    freed by reference counting when they die; only a cycle among them would
    stay (a collection runs first, so none is frozen as garbage)."""
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    logger.debug("froze %d objects out of the cyclic collector's scans", frozen)
    return frozen


#: The cyclic collector's youngest generation is collected once this many
#: more container objects were made than freed (CPython's default is 700).
#: A server's objects mostly die young by reference counting, but at 700 a
#: collection came mid-request, every few hundred microseconds of a busy
#: node, and traversed what that request held alive at the time (a batch's
#: jobs, lists, futures), then moved it to the older generations, whose
#: collections it made come sooner: in the 100-job batch cell a follower
#: spent 7-10 % of its CPU in the collector, and a full collection took
#: 60 ms, ten times in 40 s (session 21; ``docs/benchmarks.md``). At 20,000
#: transients die before a collection sees them; one comes every few
#: seconds of a busy node and takes 10-30 ms (``pq_gc_pause_seconds``
#: shows them); the older generations keep their thresholds.
GC_YOUNG = 20_000


#: The lowest ``--gc-young`` taken (0 would turn automatic collection off).
GC_YOUNG_MIN = 100


@contextmanager
def collector_tuned(young: int = GC_YOUNG) -> Iterator[tuple[int, ...]]:
    """While inside: the youngest generation's threshold ``young``, the
    older ones as they were (the thresholds, yielded); then as before."""
    if young < GC_YOUNG_MIN:
        raise ValueError(f"gc_young must be {GC_YOUNG_MIN} or more, not {young}")
    before = gc.get_threshold()
    gc.set_threshold(young, *before[1:])
    try:
        logger.debug("collector thresholds %s", gc.get_threshold())
        yield gc.get_threshold()
    finally:
        gc.set_threshold(*before)


@asynccontextmanager
async def serving_process(registry: CollectorRegistry) -> AsyncIterator[StallWatch]:
    """What a node or balancer process does once its server serves, for as
    long as it serves: its startup heap frozen (``freeze_startup_heap``) and
    its event loop watched (``StallWatch``, exported on ``registry``). The
    runners set the collector's threshold before, around starting too
    (``collector_tuned``): a node's recovery makes objects as serving does."""
    freeze_startup_heap()
    stalls = StallWatch()
    registry.register(stalls)
    stalls.start()
    try:
        yield stalls
    finally:
        await stalls.stop()
