"""Random and malformed input on every public method and on the peer service.

Hypothesis builds requests field by field from each method's descriptor
(extreme integers, odd unicode, long and empty strings, nested and repeated
fields) and also sends raw bytes. Every call must end, within its deadline,
with a status that says what happened: never UNKNOWN, INTERNAL or
UNAVAILABLE, and the node must keep serving. Jobs acknowledged before the
fuzzing must all still be there afterwards.

Well-formed consensus messages from a stranger are another matter: Paxos
trusts its peers (it is not Byzantine fault tolerant), so such a sender is
kept out by mutual TLS (tests/integration/test_security.py); here the peer
service gets bytes and batches that do not decode, which it must shrug off.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pqueue.client import Client
from pqueue.core import limits
from pqueue.node.server import NodeServer
from pqueue.v1 import peer_pb2
from pqueue.v1 import queue_pb2 as pb

#: Statuses that tell the caller what happened. UNKNOWN and INTERNAL would be
#: bugs; UNAVAILABLE from a healthy node alone would be one too.
CLEAR = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,  # a long poll outlasting the fuzzer's deadline
}
CALL_TIMEOUT_S = 2.0
HISTORY = "fuzz-history-queue"

METHODS = [
    (f"/{service.full_name}/{m.name}", GetMessageClass(m.input_type))
    for service in pb.DESCRIPTOR.services_by_name.values()
    for m in service.methods
]

_TEXT = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["", "q", "a/q", "a/b/c", "\x00", "é" * 200, "x" * 300]),
)
_INTS = {
    FieldDescriptor.TYPE_INT32: st.integers(-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: st.integers(-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: st.integers(-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: st.integers(-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: st.integers(-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: st.integers(-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: st.integers(0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: st.integers(0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: st.integers(0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: st.integers(0, 2**64 - 1),
}


def _scalar(field: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    if field.type in _INTS:
        small = st.integers(0, 5) if field.type in (
            FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_UINT64,
            FieldDescriptor.TYPE_FIXED32, FieldDescriptor.TYPE_FIXED64,
        ) else st.integers(-5, 5)  # fmt: skip
        return st.one_of(small, _INTS[field.type])  # small values hit real ids and limits
    if field.type == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if field.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return st.floats(
            allow_nan=True, width=32 if field.type == FieldDescriptor.TYPE_FLOAT else 64
        )
    if field.type == FieldDescriptor.TYPE_STRING:
        return _TEXT
    if field.type == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=64)
    if field.type == FieldDescriptor.TYPE_ENUM:
        return st.integers(-1, 8)  # unknown values too (open enums)
    assert field.message_type is not None
    return messages(field.message_type, depth + 1)


def messages(descriptor: Any, depth: int = 0) -> st.SearchStrategy[Message]:
    """Messages of ``descriptor``'s type with a random subset of fields set."""
    cls = GetMessageClass(descriptor)
    fields = [
        f
        for f in descriptor.fields
        if (depth < 3 or f.type != FieldDescriptor.TYPE_MESSAGE)
        and not (f.message_type is not None and f.message_type.GetOptions().map_entry)
    ]
    if not fields:
        return st.builds(cls)

    @st.composite
    def build(draw: Callable[[st.SearchStrategy[Any]], Any]) -> Message:
        msg = cls()
        for field in draw(st.lists(st.sampled_from(fields), max_size=len(fields), unique=True)):
            if field.is_repeated:
                getattr(msg, field.name).extend(draw(st.lists(_scalar(field, depth), max_size=3)))
            elif field.type == FieldDescriptor.TYPE_MESSAGE:
                getattr(msg, field.name).CopyFrom(draw(_scalar(field, depth)))
            else:
                setattr(msg, field.name, draw(_scalar(field, depth)))
        return msg

    return build()


def requests() -> st.SearchStrategy[tuple[str, bytes]]:
    """(method, request bytes): a structured request, or raw bytes."""
    structured = st.sampled_from(METHODS).flatmap(
        lambda m: messages(m[1].DESCRIPTOR).map(lambda msg: (m[0], msg.SerializeToString()))
    )
    raw = st.tuples(st.sampled_from([m for m, _ in METHODS]), st.binary(max_size=200))
    return st.one_of(structured, raw)


async def _status(call: Any) -> tuple[grpc.StatusCode, str]:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


async def _history(server: NodeServer) -> dict[int, bytes]:
    """Acknowledged jobs, to find again after the fuzzing (which never names their
    queue), and jobs in queue ``q`` for the fuzzer to lease, ack and delete."""
    jobs = {}
    async with Client(server.address, max_retries=0) as c:
        for i in range(20):
            await c.enqueue("q", b"fodder", priority=i % 3)
        for i in range(20):
            result = await c.enqueue(HISTORY, f"job {i}".encode(), priority=i % 3)
            jobs[result.job_id] = f"job {i}".encode()
    return jobs


async def _still_serving_with_nothing_lost(server: NodeServer, jobs: dict[int, bytes]) -> None:
    async with grpc.aio.insecure_channel(server.address) as channel:
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    async with Client(server.address, max_retries=0) as c:
        for job_id, payload in jobs.items():
            job = await c.get_job(HISTORY, job_id, consistent=True)
            assert job.payload == payload
        await c.enqueue("after-the-fuzz", b"still takes writes")


async def test_every_public_method_answers_random_and_malformed_requests_clearly(
    server: NodeServer,
) -> None:
    jobs = await _history(server)
    seen: dict[grpc.StatusCode, int] = {}
    async with grpc.aio.insecure_channel(server.address) as channel:
        calls: dict[str, grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]] = {
            method: channel.unary_unary(method, request_serializer=None, response_deserializer=None)
            for method, _ in METHODS
        }
        examples: list[tuple[str, bytes]] = []

        @settings(
            max_examples=300,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        @given(requests())
        def collect(example: tuple[str, bytes]) -> None:
            examples.append(example)

        # Hypothesis runs sync tests: draw the examples, then send them on this loop
        # (a failure names its example; it is not shrunk).
        collect()
        for method, data in examples:
            code, details = await _status(calls[method](data, timeout=CALL_TIMEOUT_S))
            assert code in CLEAR, f"{method} {data!r}: {code} {details}"
            seen[code] = seen.get(code, 0) + 1
    assert seen.get(grpc.StatusCode.INVALID_ARGUMENT, 0) > 0  # the fuzzer reached the checks
    assert seen.get(grpc.StatusCode.OK, 0) > 0  # and got past them too
    await _still_serving_with_nothing_lost(server, jobs)


async def test_the_peer_service_shrugs_off_what_does_not_decode(server: NodeServer) -> None:
    jobs = await _history(server)
    garbage: list[list[bytes]] = []

    @settings(max_examples=100, deadline=None, database=None)
    @given(
        st.lists(
            st.one_of(
                st.binary(max_size=300),
                # A batch whose messages are of no kind the protocol knows.
                st.builds(
                    lambda kinds: peer_pb2.PeerBatch(
                        messages=[peer_pb2.PeerMessage(kind=k, src=1, dst=1) for k in kinds]
                    ).SerializeToString(),
                    st.lists(st.sampled_from([-1, 0, 10, 11, 40]), max_size=5),
                ),
            ),
            min_size=1,
            max_size=5,
        )
    )
    def collect(stream: list[bytes]) -> None:
        garbage.append(stream)

    collect()
    async with grpc.aio.insecure_channel(server.address) as channel:
        send: grpc.aio.StreamUnaryMultiCallable[bytes, bytes] = channel.stream_unary(
            "/pqueue.v1.Peer/Send", request_serializer=None, response_deserializer=None
        )
        for stream in garbage:
            code, details = await _status(send(iter(stream), timeout=CALL_TIMEOUT_S))
            assert code in CLEAR, f"{stream!r}: {code} {details}"
    await _still_serving_with_nothing_lost(server, jobs)


async def test_oversized_requests_are_refused_before_the_state_machine(server: NodeServer) -> None:
    async with grpc.aio.insecure_channel(
        server.address, options=[("grpc.max_send_message_length", -1)]
    ) as channel:
        enqueue: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
            "/pqueue.v1.Queue/Enqueue"
        )
        # Past gRPC's own limit: refused by gRPC, before any of our code runs.
        huge = b"\x0a" + b"\xff" * (limits.MAX_PEER_MESSAGE_BYTES + 1024)
        code, _ = await _status(enqueue(huge, timeout=30))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        # Within it but past the method's own cap: refused before parsing, as
        # gRPC refuses a message past its limit.
        job = pb.JobSpec(payload=b"x" * (limits.MAX_MESSAGE_BYTES + 1))
        big = pb.EnqueueRequest(queue="q", job=job).SerializeToString()
        code, details = await _status(enqueue(big, timeout=30))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
        assert "may be at most" in details
    async with Client(server.address, max_retries=0) as c:
        assert not await c.list_queues()  # nothing was enqueued, not even the queue
