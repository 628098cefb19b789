"""The coalescer's framing agrees with the protobuf runtime, byte for byte."""

from __future__ import annotations

import pytest
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from hypothesis import given
from hypothesis import strategies as st

from balancer.framing import (
    OP_FIELDS,
    FramingError,
    count_ops,
    fields,
    op_header,
    split_results,
    status_code,
    submit_response,
)
from pqueue.v1 import queue_pb2 as pb
from pqueue.wire.protowire import varint

_KINDS = {"Enqueue": "enqueue", "Ack": "ack", "Nack": "nack", "ExtendLease": "extend"}


def _request(kind: str, n: int, text: str, payload: bytes) -> pb.Operation:
    if kind == "enqueue":
        job = pb.JobSpec(payload=payload, priority=n % 10, idempotency_key=text)
        return pb.Operation(enqueue=pb.EnqueueRequest(queue=text, job=job))
    if kind == "ack":
        leases = [pb.JobLease(job_id=n + i, lease_id=i) for i in range(n % 5)]
        return pb.Operation(ack=pb.AckRequest(queue=text, leases=leases))
    if kind == "nack":
        return pb.Operation(nack=pb.NackRequest(queue=text, job_id=n, lease_id=n, reason=text))
    return pb.Operation(extend=pb.ExtendLeaseRequest(queue=text, job_id=n, lease_ms=n))


ops = st.builds(
    _request,
    st.sampled_from(list(_KINDS.values())),
    st.integers(0, 2**40),
    st.text(max_size=40),
    st.binary(max_size=300),
)


def test_the_operation_fields_are_the_contracts() -> None:
    by_name = pb.Operation.DESCRIPTOR.fields_by_name
    assert {m: by_name[f].number for m, f in _KINDS.items()} == OP_FIELDS


@given(st.lists(ops, min_size=1, max_size=20))
def test_framed_requests_are_the_submit_protobuf_builds(operations: list[pb.Operation]) -> None:
    framed = b""
    for op in operations:
        kind = op.WhichOneof("op")
        assert kind is not None
        request = getattr(op, kind).SerializeToString()
        method = next(m for m, f in _KINDS.items() if f == kind)
        framed += op_header(OP_FIELDS[method], len(request)) + request
    assert pb.SubmitRequest.FromString(framed) == pb.SubmitRequest(ops=operations)
    assert framed == pb.SubmitRequest(ops=operations).SerializeToString()


def _result(kind: str, n: int, code: int, message: str) -> pb.OpResult:
    if code:
        detail = any_pb2.Any()
        detail.Pack(error_details_pb2.ErrorInfo(reason="LEASE_LOST", metadata={"job_id": str(n)}))
        return pb.OpResult(status=pb.OpStatus(code=code, message=message, details=[detail]))
    responses = {
        "enqueue": pb.EnqueueResponse(job_id=n, log_index=n, duplicate=bool(n % 2)),
        "ack": pb.AckResponse(acked=n % 7, log_index=n),
        "nack": pb.NackResponse(state=pb.JOB_STATE_READY, log_index=n),
        "extend": pb.ExtendLeaseResponse(lease_expires_at_ms=n, log_index=n),
    }
    result = pb.OpResult()
    getattr(result, kind).CopyFrom(responses[kind])
    return result


results = st.builds(
    _result,
    st.sampled_from(list(_KINDS.values())),
    st.integers(0, 2**62),
    st.sampled_from([0, 0, 3, 10, 14]),
    st.text(max_size=30),
)


@given(st.lists(results, max_size=30), st.integers(0, 2**63))
def test_results_split_into_the_bytes_each_single_call_gets(
    answers: list[pb.OpResult], log_index: int
) -> None:
    data = pb.SubmitResponse(results=answers, log_index=log_index).SerializeToString()
    split = split_results(data)
    assert len(split) == len(answers)
    for result, answer in zip(split, answers, strict=True):
        status, which, response = result.status, result.which, result.response
        assert result.raw == answer.SerializeToString()
        assert result.ok == (answer.status.code == 0)
        assert status_code(status) == answer.status.code
        if answer.status.code:
            assert status == answer.status.SerializeToString()
            assert status_pb2.Status.FromString(status).message == answer.status.message
            assert which == 0
            continue
        kind = answer.WhichOneof("result")
        assert kind is not None
        assert which == pb.Operation.DESCRIPTOR.fields_by_name[kind].number
        assert response == getattr(answer, kind).SerializeToString()
        assert result.log_index() == getattr(answer, kind).log_index


@given(st.lists(results, max_size=30), st.integers(0, 30), st.integers(0, 30))
def test_a_slice_of_results_is_the_submit_response_of_its_operations(
    answers: list[pb.OpResult], start: int, stop: int
) -> None:
    data = pb.SubmitResponse(results=answers, log_index=2**63).SerializeToString()
    mine = split_results(data)[start:stop]
    expected = pb.SubmitResponse(
        results=answers[start:stop],
        log_index=max(
            (
                getattr(a, a.WhichOneof("result") or "enqueue").log_index
                for a in answers[start:stop]
                if not a.status.code
            ),
            default=0,
        ),
    )
    assert submit_response(mine) == expected.SerializeToString()


@given(st.lists(ops, max_size=20))
def test_a_client_submit_counts_its_operations(operations: list[pb.Operation]) -> None:
    data = pb.SubmitRequest(ops=operations).SerializeToString()
    assert count_ops(data) == len(operations)
    with pytest.raises(FramingError):
        count_ops(data + b"\x10\x01")  # another field: it goes alone
    if data:
        with pytest.raises(FramingError):
            count_ops(data[:-1])


def test_a_negative_code_and_truncated_bytes() -> None:
    assert status_code(status_pb2.Status(code=-2).SerializeToString()) == -2
    assert status_code(b"") == 0
    assert varint(300) == b"\xac\x02"
    for garbage in (b"\x0a\x05ab", b"\x08", b"\x0b", b"\x80" * 11):
        with pytest.raises(FramingError):
            fields(garbage)
