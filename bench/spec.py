"""What one cell of ``make bench`` asks of its producer and consumer processes."""

from __future__ import annotations

import struct
from dataclasses import asdict, dataclass
from typing import Any

#: Every job's payload: the time its enqueue was due (CLOCK_MONOTONIC, one
#: clock for every process on the machine), padded to this size.
PAYLOAD_BYTES = 256
_STAMP = struct.Struct("<d")


def stamped(t: float) -> bytes:
    """A payload carrying ``t``."""
    return _STAMP.pack(t).ljust(PAYLOAD_BYTES, b"x")


def stamp_of(payload: bytes) -> float:
    return float(_STAMP.unpack_from(payload)[0])


@dataclass(frozen=True)
class CellSpec:
    """One system under one scenario, as the agents see it."""

    #: "pqueue", "postgres" or "nats".
    system: str
    #: The endpoint, DSN or comma-separated server URLs.
    target: str
    #: The queue, table or stream (its subject is ``<queue>.jobs``).
    queue: str
    #: Jobs per enqueue and per fetch.
    batch: int
    #: Closed loop: producer tasks. Open loop: unused (calls are not bounded).
    producers: int
    #: Connections (pqueue: ``Client``s) the producer tasks share, round robin.
    producer_clients: int
    #: Consumer slots (pqueue: ``Worker`` concurrency in all) or fetching tasks.
    consumers: int
    consumer_clients: int
    seconds: float
    #: Jobs per second offered (open loop); 0: closed loop.
    rate: float = 0.0
    #: PostgreSQL pools hold at most this many connections a side.
    pg_max_conns: int = 20
    #: PostgreSQL consumers idle on "notify" (LISTEN/NOTIFY) or "poll".
    pg_wakeup: str = "poll"
    pg_poll_ms: float = 10.0
    #: pqueue: the SDK's look-aside (operations and streams to the leader the
    #: balancer names); False: everything through ``target``, the proxy's path.
    look_aside: bool = True
    #: pqueue: the SDK's Submits on an open ``SubmitStream`` (its default);
    #: False: each a ``Submit`` call (``--submits call``).
    stream_submits: bool = True

    def to_json(self) -> dict[str, Any]:
        return asdict(self)
