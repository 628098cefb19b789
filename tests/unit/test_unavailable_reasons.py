"""Every UNAVAILABLE a node or balancer raises says why (issue 18).

The scan reads the source of pqueue/node and balancer: each
``UnavailableError`` is built with a ``reason`` and each ``NotTakenError``
with a ``cause``, and each one used is written in the contract (the
"Errors" comment of proto/pqueue/v1/queue.proto). The round trips check that
the reason goes out as a google.rpc ErrorInfo and comes back, so that a
client in any language reads the same thing.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from balancer.hop import relayed
from pqueue import errors
from pqueue.node.forward import hop_error
from pqueue.wire.status import error_of, status_proto

ROOT = Path(__file__).resolve().parents[2]
SCANNED = sorted([*ROOT.glob("pqueue/node/*.py"), *ROOT.glob("balancer/*.py")])
CONTRACT = (ROOT / "proto" / "pqueue" / "v1" / "queue.proto").read_text()


def _constructions() -> list[tuple[str, int, str, str | None]]:
    """(file, line, class, the reason or cause literal: None if not a literal)
    for each UnavailableError and NotTakenError built in the scanned files."""
    found = []
    for path in SCANNED:
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
                continue
            name = node.func.id
            if name not in ("UnavailableError", "NotTakenError"):
                continue
            key = "reason" if name == "UnavailableError" else "cause"
            given = [kw.value for kw in node.keywords if kw.arg == key] + node.args[2:3]
            value: str | None = ""
            if given:
                arg = given[0]
                value = None
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    value = arg.value
            found.append((path.relative_to(ROOT).as_posix(), node.lineno, name, value))
    return found


def _documented() -> set[str]:
    """The reasons and causes the contract lists: `//     NAME   what it means`."""
    return set(re.findall(r"^//\s{3,}([A-Z][A-Z_]+)\s", CONTRACT, re.MULTILINE))


def test_every_unavailable_the_servers_raise_says_why() -> None:
    built = _constructions()
    assert len(built) > 20  # the scan sees the node's and the balancer's
    missing = [f"{f}:{line} {cls}" for f, line, cls, value in built if value == ""]
    assert not missing, "give these a reason= (UnavailableError) or cause= (NotTakenError)"


def test_every_reason_used_is_in_the_contract() -> None:
    used = {value for *_, value in _constructions() if value}
    used |= {"NOT_LEADER", "REFUSED", "UNAVAILABLE"}  # not literals in a construction
    assert used - _documented() == set()


def test_no_reason_is_documented_twice_in_one_list() -> None:
    taken, other = CONTRACT.split("// - Any other reason:", 1)
    taken = taken.split("// - NOT_TAKEN:", 1)[1]
    for section in (taken, other):
        names = re.findall(r"^//\s{3,}([A-Z][A-Z_]+)\s", section, re.MULTILINE)
        assert len(names) == len(set(names)), names


def _error_info(error: errors.PQueueError) -> error_details_pb2.ErrorInfo:
    infos = []
    for detail in status_proto(error).details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            infos.append(info)
    assert len(infos) == 1
    return infos[0]


def test_not_taken_goes_out_with_its_cause_and_comes_back() -> None:
    error = errors.NotTakenError("no leader yet", retry_after_s=0.5, cause="NO_LEADER")
    info = _error_info(error)
    assert (info.reason, info.domain, dict(info.metadata)) == (
        "NOT_TAKEN",
        "pqueue.v1",
        {"cause": "NO_LEADER"},
    )
    proto = status_proto(error)
    back = error_of(grpc.StatusCode.UNAVAILABLE, proto.message, list(proto.details))
    assert type(back) is errors.NotTakenError
    assert (back.cause, back.reason, back.retry_after_s) == ("NO_LEADER", "NOT_TAKEN", 0.5)


def test_a_plain_unavailable_goes_out_with_its_reason_and_comes_back() -> None:
    error = errors.UnavailableError(
        "not applied", 0.5, reason="NOT_CAUGHT_UP", metadata={"min_index": "9"}
    )
    info = _error_info(error)
    assert (info.reason, dict(info.metadata)) == ("NOT_CAUGHT_UP", {"min_index": "9"})
    proto = status_proto(error)
    back = error_of(grpc.StatusCode.UNAVAILABLE, proto.message, list(proto.details))
    assert type(back) is errors.UnavailableError
    assert (back.reason, back.metadata) == ("NOT_CAUGHT_UP", {"min_index": "9"})


def test_an_unavailable_raised_without_a_reason_still_carries_one() -> None:
    assert _error_info(errors.UnavailableError("x")).reason == "UNAVAILABLE"


def test_an_unavailable_without_details_reads_as_plain() -> None:
    back = error_of(grpc.StatusCode.UNAVAILABLE, "connection refused", [])
    assert type(back) is errors.UnavailableError
    assert back.reason == ""


def _rpc_error(code: grpc.StatusCode, trailers: grpc.aio.Metadata) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailers, "refused")


def test_a_follower_names_the_leader_it_could_not_reach() -> None:
    error = hop_error(_rpc_error(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata()), "h:1")
    assert isinstance(error, errors.UnavailableError)
    assert not isinstance(error, errors.NotTakenError)  # it may have run
    assert (error.reason, error.metadata) == ("LEADER_UNREACHABLE", {"leader_address": "h:1"})


@pytest.mark.parametrize(
    "error",
    [
        errors.NotTakenError("draining", 1.0, cause="DRAINING"),
        errors.UnavailableError("moved", 0.2, reason="COMMIT_UNKNOWN"),
    ],
)
def test_a_follower_passes_the_leaders_reason_on(error: errors.UnavailableError) -> None:
    trailers = grpc.aio.Metadata(
        ("grpc-status-details-bin", status_proto(error).SerializeToString())
    )
    relayed = hop_error(_rpc_error(grpc.StatusCode.UNAVAILABLE, trailers), "h:1")
    assert type(relayed) is type(error)
    assert isinstance(relayed, errors.UnavailableError)
    assert relayed.reason == error.reason
    assert getattr(relayed, "cause", None) == getattr(error, "cause", None)


def test_a_balancer_names_a_node_that_said_nothing() -> None:
    bare = relayed(grpc.StatusCode.UNAVAILABLE, "Socket closed", (("x-a", "1"),), "h:2")
    assert bare[0] == ("x-a", "1")
    key, value = bare[1]
    assert key == "grpc-status-details-bin"
    assert isinstance(value, bytes)
    proto = status_pb2.Status.FromString(value)
    assert (proto.code, proto.message) == (grpc.StatusCode.UNAVAILABLE.value[0], "Socket closed")
    error = error_of(grpc.StatusCode.UNAVAILABLE, proto.message, list(proto.details))
    assert type(error) is errors.UnavailableError
    assert (error.reason, error.metadata) == ("NODE_UNREACHABLE", {"node_address": "h:2"})
    # What a node said passes as it is; other codes too.
    said = (("grpc-status-details-bin", b"\x08\x0e"),)
    assert relayed(grpc.StatusCode.UNAVAILABLE, "m", said, "h:2") == said
    assert relayed(grpc.StatusCode.INTERNAL, "m", (), "h:2") == ()
