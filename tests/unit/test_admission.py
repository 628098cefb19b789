"""Admission's pure parts: finding unknown fields, and the per-method caps."""

from __future__ import annotations

import pytest

from pqueue.core import limits
from pqueue.v1 import queue_pb2 as pb
from pqueue.wire.admission import AdmissionConfig, request_caps, unknown_field_path

#: A length-delimited field numbered 1007, three bytes long.
UNKNOWN = b"\xfa\x3e\x03abc"


def test_a_clean_request_has_no_unknown_field() -> None:
    req = pb.EnqueueBatchRequest(queue="q", jobs=[pb.JobSpec(payload=b"x", group="g")])
    assert unknown_field_path(pb.EnqueueBatchRequest.FromString(req.SerializeToString())) is None


def test_unknown_fields_are_found_at_any_depth_by_path() -> None:
    top = pb.AckRequest.FromString(pb.AckRequest(queue="q").SerializeToString() + UNKNOWN)
    assert unknown_field_path(top) == "#1007"
    padded = pb.JobSpec.FromString(pb.JobSpec(payload=b"x").SerializeToString() + UNKNOWN)
    batch = pb.EnqueueBatchRequest(queue="q", jobs=[pb.JobSpec(), pb.JobSpec(), padded])
    parsed = pb.EnqueueBatchRequest.FromString(batch.SerializeToString())
    assert unknown_field_path(parsed) == "jobs[2].#1007"
    single = pb.EnqueueRequest.FromString(
        pb.EnqueueRequest(queue="q", job=padded).SerializeToString()
    )
    assert unknown_field_path(single) == "job.#1007"
    lease = pb.JobLease.FromString(pb.JobLease(job_id=1).SerializeToString() + UNKNOWN)
    ack = pb.AckRequest.FromString(pb.AckRequest(leases=[lease]).SerializeToString())
    assert unknown_field_path(ack) == "leases[0].#1007"
    # A map of scalars is skipped without error.
    status = pb.NodeStatusResponse(peers={1: "a:1"})
    assert unknown_field_path(status) is None


def test_every_public_method_has_a_cap_that_fits_its_largest_valid_request() -> None:
    caps = request_caps()
    methods = {
        f"/{s.full_name}/{m.name}"
        for s in pb.DESCRIPTOR.services_by_name.values()
        for m in s.methods
    }
    assert methods <= set(caps)
    assert caps["/pqueue.v1.Queue/EnqueueBatch"] == limits.MAX_MESSAGE_BYTES
    biggest = pb.EnqueueRequest(
        queue="t" * 64 + "/" + "q" * limits.MAX_NAME_CHARS,
        job=pb.JobSpec(
            payload=b"x" * limits.MAX_PAYLOAD_BYTES_LIMIT,
            idempotency_key="é" * limits.MAX_KEY_CHARS,
            group="é" * limits.MAX_KEY_CHARS,
        ),
    )
    assert biggest.ByteSize() <= caps["/pqueue.v1.Queue/Enqueue"]
    ack = pb.AckRequest(
        queue="t" * 64 + "/" + "q" * limits.MAX_NAME_CHARS,
        leases=[pb.JobLease(job_id=2**64 - 1, lease_id=2**64 - 1)] * limits.MAX_BATCH_JOBS,
    )
    assert ack.ByteSize() <= caps["/pqueue.v1.Queue/Ack"]
    nack = pb.NackRequest(queue="q", job_id=2**64 - 1, reason="😀" * limits.MAX_REASON_CHARS)
    assert nack.ByteSize() <= caps["/pqueue.v1.Queue/Nack"]


def test_a_config_that_would_refuse_everything_is_refused() -> None:
    with pytest.raises(ValueError, match="positive"):
        AdmissionConfig(caps={"/x/y": 0}).validate()
    with pytest.raises(ValueError, match="health"):
        AdmissionConfig(max_health_watches=0).validate()
