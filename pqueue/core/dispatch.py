"""Dispatch limits of a queue: pause, ``max_inflight`` and the
``max_dispatch_per_s`` token bucket.

Pure, and decided only by the stamped time of the entry being applied, so
every replica lets the same leases through. The bucket holds thousandths of
a lease (``QueueState.dispatch_tokens`` as of ``dispatch_at_ms``); it fills
at the queue's rate (``limits.dispatch_milli``: thousandths per second, so
``elapsed_ms * rate // 1000`` per refill) up to one second of leases, and
never less than one lease; each job leased costs ``LEASE_COST``. It is
settled lazily: only a lease that takes jobs (and an update that changes the
rate) writes it, so leases that find it empty change nothing, and a queue
created with a rate starts with a full bucket.
"""

from __future__ import annotations

from pqueue.core import limits
from pqueue.core.jobs import LEASED, QueueState
from pqueue.v1 import queue_pb2 as pb

#: What one leased job takes from the bucket (thousandths of a lease).
LEASE_COST = 1000


def capacity(rate: int) -> int:
    """The bucket's size at ``rate`` (thousandths per second): one second of
    leases, and at least one lease."""
    return max(LEASE_COST, rate)


def tokens_at(queue: QueueState, now: int) -> int:
    """The bucket's content at ``now`` (the queue's current rate, not 0)."""
    rate = limits.dispatch_milli(queue.config)
    elapsed = max(0, now - queue.dispatch_at_ms)
    return min(capacity(rate), queue.dispatch_tokens + elapsed * rate // 1000)


def leasable(queue: QueueState, lifecycle: bool) -> bool:
    """Whether the queue may lease at all now: not paused, and below its
    ``max_inflight`` (the bucket aside: it depends on the time)."""
    if queue.paused:
        return False
    cap = queue.config.max_inflight if lifecycle else 0
    return not cap or queue.counts[LEASED] < cap


def lease_room(queue: QueueState, now: int, lifecycle: bool) -> int | None:
    """How many jobs a lease at ``now`` may take by the queue's controls
    (None: they set no bound)."""
    if queue.paused:
        return 0
    if not lifecycle:
        return None
    room: int | None = None
    cap = queue.config.max_inflight
    if cap:
        room = max(0, cap - queue.counts[LEASED])
    if limits.dispatch_milli(queue.config):
        tokens = tokens_at(queue, now) // LEASE_COST
        room = tokens if room is None else min(room, tokens)
    return room


def charge(queue: QueueState, now: int, leased: int, lifecycle: bool) -> None:
    """Take ``leased`` jobs' cost from the bucket (a lease at ``now`` that
    ``lease_room`` allowed); nothing when none were leased."""
    if lifecycle and leased and limits.dispatch_milli(queue.config):
        queue.dispatch_tokens = tokens_at(queue, now) - leased * LEASE_COST
        queue.dispatch_at_ms = now


def next_dispatch_ms(queue: QueueState, lifecycle: bool) -> int | None:
    """The stamped time from which the bucket holds a whole lease (at or
    before the machine's time: it does now); None without a rate."""
    rate = limits.dispatch_milli(queue.config) if lifecycle else 0
    if not rate:
        return None
    need = LEASE_COST - queue.dispatch_tokens
    if need <= 0:
        return queue.dispatch_at_ms
    return queue.dispatch_at_ms + -(-need * 1000 // rate)


def settle(queue: QueueState, now: int, config: pb.QueueConfig) -> None:
    """The queue's rate changes to ``config``'s at ``now`` (before the config
    is replaced): the bucket keeps what it held at the old rate, up to the
    new capacity; a queue that had no rate starts full; one that has none
    any more keeps no bucket."""
    old, new = limits.dispatch_milli(queue.config), limits.dispatch_milli(config)
    if old == new:
        return
    if not new:
        queue.dispatch_tokens = queue.dispatch_at_ms = 0
        return
    held = tokens_at(queue, now) if old else capacity(new)
    queue.dispatch_tokens = min(capacity(new), held)
    queue.dispatch_at_ms = now
