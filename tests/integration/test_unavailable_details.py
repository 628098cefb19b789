"""A real node's UNAVAILABLE answers, read off the wire as any language
would: the ``grpc-status-details-bin`` trailer, a google.rpc.Status with an
ErrorInfo saying why (the reasons of queue.proto's "Errors")."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from pqueue.node.server import NodeServer
from pqueue.v1 import queue_pb2 as pb
from pqueue.v1 import queue_pb2_grpc as pbg


def _error_info(exc: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    """The one ErrorInfo in the failed call's status details."""
    raw = [v for k, v in exc.trailing_metadata() or () if k == "grpc-status-details-bin"]
    assert len(raw) == 1, exc.trailing_metadata()
    assert isinstance(raw[0], bytes)
    status = status_pb2.Status.FromString(raw[0])
    assert status.code == grpc.StatusCode.UNAVAILABLE.value[0]
    infos = []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            infos.append(info)
    assert len(infos) == 1, status
    assert infos[0].domain == "pqueue.v1"
    return infos[0]


async def test_a_draining_node_says_not_taken_because_draining(server: NodeServer) -> None:
    async with grpc.aio.insecure_channel(server.address) as channel:
        queue = pbg.QueueStub(channel)
        await queue.Enqueue(pb.EnqueueRequest(queue="q", job=pb.JobSpec(payload=b"a")))
        server.node.begin_drain()
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await queue.Enqueue(pb.EnqueueRequest(queue="q", job=pb.JobSpec(payload=b"b")))
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    info = _error_info(refused.value)
    assert (info.reason, dict(info.metadata)) == ("NOT_TAKEN", {"cause": "DRAINING"})


async def test_a_read_past_the_applied_index_says_not_caught_up(server: NodeServer) -> None:
    async with grpc.aio.insecure_channel(server.address) as channel:
        queue = pbg.QueueStub(channel)
        done = await queue.Enqueue(pb.EnqueueRequest(queue="q", job=pb.JobSpec(payload=b"a")))
        ahead = done.log_index + 1000  # no write took it: the node waits 5 s, then says so
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await queue.GetJob(pb.GetJobRequest(queue="q", job_id=done.job_id, min_index=ahead))
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    info = _error_info(refused.value)
    assert info.reason == "NOT_CAUGHT_UP"  # not NOT_TAKEN: a plain UNAVAILABLE, with its cause
    assert info.metadata["min_index"] == str(ahead)
    assert int(info.metadata["applied_index"]) >= done.log_index
