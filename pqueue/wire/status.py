"""The one place where pqueue errors and gRPC statuses meet, both ways.

Servers call ``to_status`` (domain error -> status with rich details), clients
call ``from_rpc_error`` (status -> domain error). Details follow the standard
google.rpc error model so clients in any language can read them:
INVALID_ARGUMENT carries ``BadRequest`` (the field and why), retriable errors
carry ``RetryInfo`` (and the ``grpc-retry-pushback-ms`` trailer), and a
not-leader error carries ``ErrorInfo`` with the leader's id and address, and
every UNAVAILABLE carries an ``ErrorInfo`` saying why: ``NOT_TAKEN`` (with a
``cause``) when it is sure the call was not taken (a proxy may retry any
call on it), else the reason it may or may not have run. The reasons are the
contract written in proto/pqueue/v1/queue.proto ("Errors").
"""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from pqueue import errors
from pqueue.v1 import queue_pb2 as pb

_ERROR_DOMAIN = "pqueue.v1"
_DETAILS_KEY = "grpc-status-details-bin"
#: ErrorInfo reasons a proxy may act on.
NOT_LEADER = "NOT_LEADER"
NOT_TAKEN = "NOT_TAKEN"
#: The reason of an UNAVAILABLE raised without one (the scan in
#: tests/unit/test_unavailable_reasons.py keeps the node's own from it).
UNAVAILABLE = "UNAVAILABLE"

_CODES: list[tuple[type[errors.PQueueError], grpc.StatusCode]] = [
    (errors.InvalidArgumentError, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.NotFoundError, grpc.StatusCode.NOT_FOUND),
    (errors.AlreadyExistsError, grpc.StatusCode.ALREADY_EXISTS),
    (errors.LeaseLostError, grpc.StatusCode.ABORTED),
    (errors.FailedPreconditionError, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.UnavailableError, grpc.StatusCode.UNAVAILABLE),
    (errors.ResourceExhaustedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.UnauthenticatedError, grpc.StatusCode.UNAUTHENTICATED),
    (errors.PermissionDeniedError, grpc.StatusCode.PERMISSION_DENIED),
    (errors.DeadlineExceededError, grpc.StatusCode.DEADLINE_EXCEEDED),
]


def code_of(error: errors.PQueueError) -> grpc.StatusCode:
    """The gRPC code for a domain error (INTERNAL for anything unmapped)."""
    for cls, code in _CODES:
        if isinstance(error, cls):
            return code
    return grpc.StatusCode.INTERNAL


def _pack(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)  # type: ignore[arg-type]
    return packed


def status_proto(error: errors.PQueueError) -> status_pb2.Status:
    """The google.rpc.Status for ``error``: code, message and rich details."""
    proto = status_pb2.Status(code=code_of(error).value[0], message=error.message)
    if isinstance(error, errors.InvalidArgumentError):
        proto.details.append(
            _pack(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(
                            field=error.field, description=error.reason
                        )
                    ]
                )
            )
        )
    if isinstance(error, errors.LeaseLostError) and error.job_id:
        proto.details.append(
            _pack(
                error_details_pb2.ErrorInfo(
                    reason="LEASE_LOST",
                    domain=_ERROR_DOMAIN,
                    metadata={"job_id": str(error.job_id)},
                )
            )
        )
    if isinstance(error, errors.NotLeaderError):
        proto.details.append(
            _pack(
                error_details_pb2.ErrorInfo(
                    reason=NOT_LEADER,
                    domain=_ERROR_DOMAIN,
                    metadata={
                        "leader_id": error.leader_id,
                        "leader_address": error.leader_address,
                    },
                )
            )
        )
    if isinstance(error, errors.UnavailableError):
        # Every UNAVAILABLE a server sends says why (a client tells a call
        # that did not run, NOT_TAKEN, from one that may have).
        metadata = dict(error.metadata)
        if isinstance(error, errors.NotTakenError) and error.cause:
            metadata["cause"] = error.cause
        proto.details.append(
            _pack(
                error_details_pb2.ErrorInfo(
                    reason=error.reason or UNAVAILABLE,
                    domain=_ERROR_DOMAIN,
                    metadata=metadata,
                )
            )
        )
    retry_after_s = getattr(error, "retry_after_s", 0.0)
    if retry_after_s > 0:
        delay = duration_pb2.Duration()
        delay.FromMilliseconds(int(retry_after_s * 1000))
        proto.details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
    return proto


def to_status(error: errors.PQueueError) -> grpc.Status:
    """A gRPC status (code, message, rich details, trailers) for ``error``."""
    proto = status_proto(error)
    trailers: list[tuple[str, str]] = []
    retry_after_s = getattr(error, "retry_after_s", 0.0)
    if retry_after_s > 0:
        trailers.append(("grpc-retry-pushback-ms", str(int(retry_after_s * 1000))))
    status = rpc_status.to_status(proto)
    return _Status(status.code, status.details, (*status.trailing_metadata, *trailers))


def to_op_status(error: errors.PQueueError) -> pb.OpStatus:
    """The per-operation status of a ``Submit`` for ``error``: the same
    code, message and details its single call would carry (an ``OpStatus``
    is wire-identical to a google.rpc.Status)."""
    return pb.OpStatus.FromString(status_proto(error).SerializeToString())


class _Status(grpc.Status):
    """A status with extra trailers (grpc_status builds only the details one)."""

    def __init__(
        self,
        code: grpc.StatusCode,
        details: str,
        trailing_metadata: tuple[tuple[str, str | bytes], ...],
    ) -> None:
        self.code = code
        self.details = details
        self.trailing_metadata = trailing_metadata


def _rich_details(exc: grpc.aio.AioRpcError) -> list[any_pb2.Any]:
    """The google.rpc.Status details a server attached, if any."""
    for key, value in exc.trailing_metadata() or ():
        if key == _DETAILS_KEY and isinstance(value, bytes):
            return list(status_pb2.Status.FromString(value).details)
    return []


def _error_info(details: list[any_pb2.Any], reason: str) -> dict[str, str] | None:
    """The metadata of the ErrorInfo detail with this reason, if any."""
    for any_ in details:
        if any_.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            any_.Unpack(info)
            if info.reason == reason:
                return dict(info.metadata)
    return None


def _first_error_info(details: list[any_pb2.Any]) -> error_details_pb2.ErrorInfo | None:
    """The first ErrorInfo detail (the one an UNAVAILABLE carries), if any."""
    for any_ in details:
        if any_.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            any_.Unpack(info)
            return info
    return None


def error_info(exc: grpc.aio.AioRpcError, reason: str) -> dict[str, str] | None:
    """The metadata of a failed call's ``ErrorInfo`` with ``reason``, if it has one."""
    return _error_info(_rich_details(exc), reason)


def from_rpc_error(exc: grpc.aio.AioRpcError) -> errors.PQueueError:
    """The domain error a failed call stands for, details decoded."""
    code = exc.code()
    return error_of(code, exc.details() or code.name, _rich_details(exc))


def from_op_status(status: pb.OpStatus) -> errors.PQueueError | None:
    """The domain error one ``Submit`` operation failed with (None: it succeeded),
    exactly as ``from_rpc_error`` gives it for the single call."""
    if status.code == 0:
        return None
    code = code_by_value(status.code)
    return error_of(code, status.message or code.name, list(status.details))


_BY_VALUE = {c.value[0]: c for c in grpc.StatusCode}


def code_by_value(number: int) -> grpc.StatusCode:
    """The status code a status's number stands for (UNKNOWN if none)."""
    return _BY_VALUE.get(number, grpc.StatusCode.UNKNOWN)


def error_of(code: grpc.StatusCode, message: str, details: list[any_pb2.Any]) -> errors.PQueueError:
    """The domain error for a status: its code, message and rich details."""
    retry_after_s = 0.0
    for any_ in details:
        if any_.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            any_.Unpack(info)
            retry_after_s = info.retry_delay.ToMilliseconds() / 1000
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        for any_ in details:
            if any_.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                any_.Unpack(bad)
                if bad.field_violations:
                    v = bad.field_violations[0]
                    return errors.InvalidArgumentError(v.field, v.description)
        return errors.InvalidArgumentError("request", message)
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        leader = _error_info(details, NOT_LEADER)
        if leader is not None:
            return errors.NotLeaderError(
                message,
                leader_id=leader.get("leader_id", ""),
                leader_address=leader.get("leader_address", ""),
            )
        return errors.FailedPreconditionError(message)
    if code == grpc.StatusCode.ABORTED:
        info = _error_info(details, "LEASE_LOST")
        job_id = int(info.get("job_id", "0")) if info else 0
        return errors.LeaseLostError(message, job_id)
    simple: dict[grpc.StatusCode, type[errors.PQueueError]] = {
        grpc.StatusCode.NOT_FOUND: errors.NotFoundError,
        grpc.StatusCode.ALREADY_EXISTS: errors.AlreadyExistsError,
        grpc.StatusCode.UNAUTHENTICATED: errors.UnauthenticatedError,
        grpc.StatusCode.PERMISSION_DENIED: errors.PermissionDeniedError,
        grpc.StatusCode.DEADLINE_EXCEEDED: errors.DeadlineExceededError,
    }
    if code in simple:
        return simple[code](message)
    if code == grpc.StatusCode.UNAVAILABLE:
        info = _first_error_info(details)
        if info is None:
            return errors.UnavailableError(message, retry_after_s)
        metadata = dict(info.metadata)
        if info.reason == NOT_TAKEN:
            cause = metadata.pop("cause", "")
            return errors.NotTakenError(message, retry_after_s, cause, metadata)
        return errors.UnavailableError(message, retry_after_s, info.reason, metadata)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return errors.ResourceExhaustedError(message, retry_after_s)
    return errors.RemoteError(message, code.name)
