"""Every domain error survives the trip to a gRPC status and back (docs/semantics.md "Errors")."""

from __future__ import annotations

import grpc
import pytest

from pqueue import errors
from pqueue.wire.status import code_of, from_rpc_error, to_status

CASES: list[tuple[errors.PQueueError, grpc.StatusCode]] = [
    (errors.InvalidArgumentError("jobs[3].priority", "above 9"), grpc.StatusCode.INVALID_ARGUMENT),
    (errors.NotFoundError("queue 'x' not found"), grpc.StatusCode.NOT_FOUND),
    (errors.AlreadyExistsError("exists"), grpc.StatusCode.ALREADY_EXISTS),
    (errors.LeaseLostError("stale", 7), grpc.StatusCode.ABORTED),
    (errors.FailedPreconditionError("nope"), grpc.StatusCode.FAILED_PRECONDITION),
    (
        errors.NotLeaderError("not leader", "n2", "10.0.0.2:7700"),
        grpc.StatusCode.FAILED_PRECONDITION,
    ),
    (errors.UnavailableError("draining", 1.5), grpc.StatusCode.UNAVAILABLE),
    (errors.ResourceExhaustedError("quota", 2.0), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.UnauthenticatedError("no token"), grpc.StatusCode.UNAUTHENTICATED),
    (errors.PermissionDeniedError("tenant"), grpc.StatusCode.PERMISSION_DENIED),
    (errors.DeadlineExceededError("late"), grpc.StatusCode.DEADLINE_EXCEEDED),
]


def _as_rpc_error(error: errors.PQueueError) -> grpc.aio.AioRpcError:
    status = to_status(error)
    return grpc.aio.AioRpcError(
        status.code,
        grpc.aio.Metadata(),
        grpc.aio.Metadata(*status.trailing_metadata),
        details=status.details,
    )


@pytest.mark.parametrize(("error", "code"), CASES, ids=lambda v: type(v).__name__)
def test_round_trip(error: errors.PQueueError, code: grpc.StatusCode) -> None:
    assert code_of(error) == code
    back = from_rpc_error(_as_rpc_error(error))
    assert type(back) is type(error)
    assert back.message == error.message
    assert back.retriable == error.retriable


def test_details_survive() -> None:
    bad = from_rpc_error(_as_rpc_error(errors.InvalidArgumentError("queue", "empty")))
    assert isinstance(bad, errors.InvalidArgumentError)
    assert (bad.field, bad.reason) == ("queue", "empty")
    nl = from_rpc_error(_as_rpc_error(errors.NotLeaderError("x", "n2", "h:1")))
    assert isinstance(nl, errors.NotLeaderError)
    assert (nl.leader_id, nl.leader_address) == ("n2", "h:1")
    busy = from_rpc_error(_as_rpc_error(errors.ResourceExhaustedError("x", 2.5)))
    assert isinstance(busy, errors.ResourceExhaustedError)
    assert busy.retry_after_s == 2.5
    assert busy.retriable
    too_big = from_rpc_error(_as_rpc_error(errors.ResourceExhaustedError("message too large")))
    assert not too_big.retriable  # no hint: the same call fails the same way
    lost = from_rpc_error(_as_rpc_error(errors.LeaseLostError("stale", 42)))
    assert isinstance(lost, errors.LeaseLostError)
    assert lost.job_id == 42


def test_retry_pushback_trailer() -> None:
    status = to_status(errors.UnavailableError("draining", 0.25))
    assert ("grpc-retry-pushback-ms", "250") in status.trailing_metadata


def test_an_unknown_status_is_a_remote_error() -> None:
    exc = grpc.aio.AioRpcError(
        grpc.StatusCode.DATA_LOSS, grpc.aio.Metadata(), grpc.aio.Metadata(), details="bits"
    )
    err = from_rpc_error(exc)
    assert isinstance(err, errors.RemoteError)
    assert err.code == "DATA_LOSS"
