"""Where each public method goes, and whether a failed call may be sent again.

- **Leader** calls (every write, every lease, and reads asking for
  ``consistent``) go to the known leader, in one hop.
- **Read** calls go to any node by weight: followers serve them from their
  applied state.

A call answered "not leader" or "not taken" (``ErrorInfo`` ``NOT_LEADER`` /
``NOT_TAKEN``) never ran, so any call may be sent again. A call that met a
plain ``UNAVAILABLE`` may or may not have run: only reads and enqueues whose
every job carries an idempotency key are sent again then.

Methods the table does not know (a newer API than this balancer) go to the
leader and are never retried on ``UNAVAILABLE``: the safe default.

Single-job writes (``Enqueue``, ``Ack``, ``Nack``, ``ExtendLease``) may ride
in a ``Submit`` (``op_field``: their ``Operation`` field; see
``balancer.coalesce``), and so may a client's own ``Submit`` (``merges``);
the same rules hold for each of them alone. A client's ``Submit`` is sent
again after a plain ``UNAVAILABLE`` only if every operation is an enqueue
with an idempotency key. ``Consume`` is a
stream, carried to the leader message for message (``balancer.streams``).
``Watch`` is a server stream, carried like a read to any node by weight
(``Proxy._server_stream``); it is never retried: a watcher resumes itself.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

from google.protobuf.message import DecodeError

from balancer.framing import OP_FIELDS
from pqueue.v1 import queue_pb2 as pb


class Kind(enum.Enum):
    LEADER = "leader"
    READ = "read"


@dataclass(frozen=True)
class Route:
    """How one method is proxied."""

    method: str  # "/pqueue.v1.Queue/Enqueue"
    name: str  # "Enqueue", for metrics
    kind: Kind
    #: Given the request bytes: its kind for this call (a consistent read leads).
    kind_of: Callable[[bytes], Kind]
    #: Given the request bytes: may it be sent again after a plain UNAVAILABLE?
    retry_unavailable: Callable[[bytes], bool]
    #: Given the request bytes: how long the node may rightly hold it before
    #: answering (a long poll's wait), beyond which a leader is suspected.
    waits_s: Callable[[bytes], float] = lambda _: 0.0
    #: Non-zero: a single-job write that may ride in a ``Submit``, in this
    #: ``Operation`` field.
    op_field: int = 0
    #: A client's ``Submit``: it may ride with other calls, its operations as they are.
    merges: bool = False
    #: A bidirectional stream (``Consume``), not a unary call.
    streaming: bool = False
    #: A server stream (``Watch``): one request, carried to a node as a read.
    server_stream: bool = False


def _always(kind: Kind) -> Callable[[bytes], Kind]:
    return lambda _: kind


def _never(_: bytes) -> bool:
    return False


def _yes(_: bytes) -> bool:
    return True


def _consistent_leads(
    message: type[pb.GetJobRequest]
    | type[pb.StatsRequest]
    | type[pb.ListDeadRequest]
    | type[pb.ListJobsRequest]
    | type[pb.ListSchedulesRequest],
) -> Callable[[bytes], Kind]:
    def kind_of(data: bytes) -> Kind:
        try:
            return Kind.LEADER if message.FromString(data).consistent else Kind.READ
        except DecodeError:
            return Kind.READ  # the node will say INVALID_ARGUMENT

    return kind_of


def _enqueue_keyed(data: bytes) -> bool:
    try:
        return bool(pb.EnqueueRequest.FromString(data).job.idempotency_key)
    except DecodeError:
        return False


def _batch_keyed(data: bytes) -> bool:
    try:
        jobs = pb.EnqueueBatchRequest.FromString(data).jobs
    except DecodeError:
        return False
    return bool(jobs) and all(j.idempotency_key for j in jobs)


def _submit_keyed(data: bytes) -> bool:
    try:
        ops = pb.SubmitRequest.FromString(data).ops
    except DecodeError:
        return False
    return bool(ops) and all(
        op.WhichOneof("op") == "enqueue" and op.enqueue.job.idempotency_key for op in ops
    )


def _lease_wait_s(data: bytes) -> float:
    try:
        return max(0, min(pb.LeaseRequest.FromString(data).wait_ms, 3_600_000)) / 1000
    except DecodeError:
        return 0.0


_READS = {
    "GetJob",
    "Stats",
    "ListQueues",
    "ListDead",
    "ListJobs",
    "ListSchedules",
    "NodeStatus",
    "StateDigest",
    "Watch",
}
_CONSISTENT = {
    "GetJob": pb.GetJobRequest,
    "Stats": pb.StatsRequest,
    "ListDead": pb.ListDeadRequest,
    "ListJobs": pb.ListJobsRequest,
    "ListSchedules": pb.ListSchedulesRequest,
}
_IDEMPOTENT_WRITES = {
    "Enqueue": _enqueue_keyed,
    "EnqueueBatch": _batch_keyed,
    "Submit": _submit_keyed,
}


def _route(service: str, name: str, streaming: bool = False, server_stream: bool = False) -> Route:
    method = f"/{service}/{name}"
    if server_stream:
        return Route(method, name, Kind.READ, _always(Kind.READ), _never, server_stream=True)
    if name in _READS:
        consistent = _CONSISTENT.get(name)
        kind_of = _consistent_leads(consistent) if consistent else _always(Kind.READ)
        return Route(method, name, Kind.READ, kind_of, _yes)
    retry = _IDEMPOTENT_WRITES.get(name, _never)
    waits = _lease_wait_s if name == "Lease" else lambda _: 0.0
    op_field = OP_FIELDS.get(name, 0) if service == "pqueue.v1.Queue" else 0
    return Route(
        method,
        name,
        Kind.LEADER,
        _always(Kind.LEADER),
        retry,
        waits,
        op_field=op_field,
        merges=name == "Submit" and service == "pqueue.v1.Queue",
        streaming=streaming,
    )


#: Every method of the public services, by its full gRPC path.
ROUTES: dict[str, Route] = {
    route.method: route
    for service in pb.DESCRIPTOR.services_by_name.values()
    for route in (
        _route(
            service.full_name,
            m.name,
            m.client_streaming and m.server_streaming,
            m.server_streaming and not m.client_streaming,
        )
        for m in service.methods
    )
}

_PUBLIC_PREFIXES = tuple(f"/{s.full_name}/" for s in pb.DESCRIPTOR.services_by_name.values())


def route_for(method: str) -> Route | None:
    """The route for a gRPC path; None for anything outside the public services."""
    route = ROUTES.get(method)
    if route is None and method.startswith(_PUBLIC_PREFIXES):
        name = method[1:].split("/", 1)[1]
        if name and "/" not in name:
            return Route(method, "unknown", Kind.LEADER, _always(Kind.LEADER), _never)
    return route
