"""gRPC servicers for the public ``Queue`` and ``Admin`` services.

Each method checks the stateless rules of its request, turns it into a log
command (or reads the applied state), and returns the response. Domain errors
become gRPC statuses here and nowhere else (``pqueue.status.to_status``).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message

from pqueue import limits
from pqueue.commitlog import LogStatus
from pqueue.errors import InvalidArgumentError, NotLeaderError, NotTakenError, PQueueError
from pqueue.forward import FORWARDED_KEY, Forwarder
from pqueue.load import CpuSampler
from pqueue.node import QueueNode
from pqueue.status import to_status
from pqueue.v1 import log_pb2 as logpb
from pqueue.v1 import queue_pb2 as pb
from pqueue.v1 import queue_pb2_grpc as pbg

logger = logging.getLogger(__name__)

Req = TypeVar("Req", bound=Message)
Resp = TypeVar("Resp", bound=Message)
Context = grpc.aio.ServicerContext[Any, Any]
Handler = Callable[[Any, Req, Context], Awaitable[Resp]]


def rpc(fn: Handler[Req, Resp]) -> Handler[Req, Resp]:
    """Turn a raised ``PQueueError`` into the matching gRPC status."""

    @functools.wraps(fn)
    async def wrapper(self: Any, request: Req, context: Context) -> Resp:
        self.node.calls_in_flight += 1  # load, as balancers see it
        try:
            return await fn(self, request, context)
        except PQueueError as exc:
            logger.debug("%s refused: %s", fn.__name__, exc)
            await context.abort_with_status(to_status(exc))
            raise AssertionError("unreachable") from exc  # abort_with_status raises
        finally:
            self.node.calls_in_flight -= 1

    return wrapper


def on_leader(fn: Handler[Req, Resp]) -> Handler[Req, Resp]:
    """Run on the leader: a follower forwards the call there, in one hop."""

    @functools.wraps(fn)
    async def wrapper(self: Any, request: Req, context: Context) -> Resp:
        if not self.node.log.is_leader:
            return await self._forward(fn.__name__, request, context)  # type: ignore[no-any-return]
        try:
            return await fn(self, request, context)
        except NotLeaderError:  # lost the lead before proposing: nothing ran here
            return await self._forward(fn.__name__, request, context)  # type: ignore[no-any-return]

    return wrapper


def _check_size(request: Message) -> None:
    """Client requests are held to the client limit (the server admits peer-sized ones)."""
    size = request.ByteSize()
    if size > limits.MAX_MESSAGE_BYTES:
        raise InvalidArgumentError(
            "request", f"{size} bytes exceeds the {limits.MAX_MESSAGE_BYTES}-byte message limit"
        )


def _check_count(n: int, field: str, upper: int) -> None:
    if n == 0:
        raise InvalidArgumentError(field, "must not be empty")
    if n > upper:
        raise InvalidArgumentError(field, f"at most {upper} per call, got {n}")


class _Base:
    SERVICE = ""

    def __init__(self, node: QueueNode, forwarder: Forwarder) -> None:
        self.node = node
        self.forwarder = forwarder

    async def _forward(self, method: str, request: Message, context: Context) -> Message:
        if any(key == FORWARDED_KEY for key, _ in context.invocation_metadata() or ()):
            raise self.node.log.not_leader_error()  # already forwarded once: no second hop
        _, address = self.node.log.leader_hint()
        if not address:
            raise self.node.log.not_leader_error()
        return await self.forwarder.call(
            address,
            self.SERVICE,
            method,
            request,
            context.time_remaining(),
            self.node.config.node_id,
        )

    async def _propose(self, command: logpb.Command, response_type: type[Resp]) -> Resp:
        if self.node.draining:
            raise NotTakenError("node is draining", retry_after_s=1.0)
        result = await self.node.propose(command)
        if not isinstance(result, response_type):
            raise TypeError(f"{command.WhichOneof('kind')} gave {type(result).__name__}")
        return result


class QueueService(_Base, pbg.QueueServicer):
    """Producers and consumers."""

    SERVICE = "pqueue.v1.Queue"

    @rpc
    @on_leader
    async def Enqueue(self, request: pb.EnqueueRequest, context: Context) -> pb.EnqueueResponse:
        _check_size(request)
        limits.check_queue_name(request.queue)
        limits.check_job_spec(request.job, "job")
        batch = pb.EnqueueBatchRequest(queue=request.queue, jobs=[request.job])
        result = await self._propose(logpb.Command(enqueue=batch), pb.EnqueueBatchResponse)
        return result.results[0]

    @rpc
    @on_leader
    async def EnqueueBatch(
        self, request: pb.EnqueueBatchRequest, context: Context
    ) -> pb.EnqueueBatchResponse:
        _check_size(request)
        limits.check_queue_name(request.queue)
        _check_count(len(request.jobs), "jobs", limits.MAX_BATCH_JOBS)
        for i, spec in enumerate(request.jobs):
            limits.check_job_spec(spec, f"jobs[{i}]")
        return await self._propose(logpb.Command(enqueue=request), pb.EnqueueBatchResponse)

    @rpc
    @on_leader
    async def Lease(self, request: pb.LeaseRequest, context: Context) -> pb.LeaseResponse:
        limits.check_queue_name(request.queue)
        if request.max_jobs > limits.MAX_LEASE_JOBS:
            raise InvalidArgumentError("max_jobs", f"at most {limits.MAX_LEASE_JOBS}")
        limits.check_duration(request.lease_ms, "lease_ms")
        limits.check_duration(request.wait_ms, "wait_ms", limits.MAX_WAIT_MS)
        limits.check_text(request.consumer_id, "consumer_id")
        if self.node.draining:
            raise NotTakenError("node is draining", retry_after_s=1.0)
        return await self.node.lease(request)

    @rpc
    @on_leader
    async def Ack(self, request: pb.AckRequest, context: Context) -> pb.AckResponse:
        limits.check_queue_name(request.queue)
        _check_count(len(request.leases), "leases", limits.MAX_BATCH_JOBS)
        return await self._propose(logpb.Command(ack=request), pb.AckResponse)

    @rpc
    @on_leader
    async def Nack(self, request: pb.NackRequest, context: Context) -> pb.NackResponse:
        limits.check_queue_name(request.queue)
        if request.HasField("delay_ms"):
            limits.check_duration(request.delay_ms, "delay_ms")
        limits.check_text(request.reason, "reason", limits.MAX_REASON_CHARS)
        return await self._propose(logpb.Command(nack=request), pb.NackResponse)

    @rpc
    @on_leader
    async def ExtendLease(
        self, request: pb.ExtendLeaseRequest, context: Context
    ) -> pb.ExtendLeaseResponse:
        limits.check_queue_name(request.queue)
        limits.check_duration(request.lease_ms, "lease_ms")
        return await self._propose(logpb.Command(extend=request), pb.ExtendLeaseResponse)

    @rpc
    async def GetJob(self, request: pb.GetJobRequest, context: Context) -> pb.GetJobResponse:
        limits.check_queue_name(request.queue)
        if request.consistent and not self.node.log.is_leader:
            return await self._forward("GetJob", request, context)  # type: ignore[return-value]
        return pb.GetJobResponse(job=self.node.machine.get_job(request.queue, request.job_id))

    @rpc
    async def Stats(self, request: pb.StatsRequest, context: Context) -> pb.StatsResponse:
        if request.queue:
            limits.check_queue_name(request.queue)
        if request.consistent and not self.node.log.is_leader:
            return await self._forward("Stats", request, context)  # type: ignore[return-value]
        stats = self.node.machine.stats(request.queue, self.node.clock_ms())
        return pb.StatsResponse(queues=stats)


class AdminService(_Base, pbg.AdminServicer):
    """Operators."""

    SERVICE = "pqueue.v1.Admin"

    @rpc
    @on_leader
    async def CreateQueue(
        self, request: pb.CreateQueueRequest, context: Context
    ) -> pb.CreateQueueResponse:
        limits.check_queue_name(request.queue)
        limits.effective_config(request.config)
        return await self._propose(logpb.Command(create_queue=request), pb.CreateQueueResponse)

    @rpc
    @on_leader
    async def DeleteQueue(
        self, request: pb.DeleteQueueRequest, context: Context
    ) -> pb.DeleteQueueResponse:
        limits.check_queue_name(request.queue)
        return await self._propose(logpb.Command(delete_queue=request), pb.DeleteQueueResponse)

    @rpc
    async def ListQueues(
        self, request: pb.ListQueuesRequest, context: Context
    ) -> pb.ListQueuesResponse:
        return pb.ListQueuesResponse(queues=self.node.machine.list_queues(self.node.clock_ms()))

    @rpc
    @on_leader
    async def PurgeQueue(
        self, request: pb.PurgeQueueRequest, context: Context
    ) -> pb.PurgeQueueResponse:
        limits.check_queue_name(request.queue)
        return await self._propose(logpb.Command(purge=request), pb.PurgeQueueResponse)

    @rpc
    async def ListDead(self, request: pb.ListDeadRequest, context: Context) -> pb.ListDeadResponse:
        limits.check_queue_name(request.queue)
        if request.limit > limits.MAX_LIST_LIMIT:
            raise InvalidArgumentError("limit", f"at most {limits.MAX_LIST_LIMIT}")
        limit = request.limit or limits.DEFAULT_LIST_LIMIT
        return self.node.machine.list_dead(request.queue, limit, request.after_job_id)

    @rpc
    @on_leader
    async def Redrive(self, request: pb.RedriveRequest, context: Context) -> pb.RedriveResponse:
        limits.check_queue_name(request.queue)
        return await self._propose(logpb.Command(redrive=request), pb.RedriveResponse)

    @rpc
    @on_leader
    async def DeleteDead(
        self, request: pb.DeleteDeadRequest, context: Context
    ) -> pb.DeleteDeadResponse:
        limits.check_queue_name(request.queue)
        return await self._propose(logpb.Command(delete_dead=request), pb.DeleteDeadResponse)

    @rpc
    async def NodeStatus(
        self, request: pb.NodeStatusRequest, context: Context
    ) -> pb.NodeStatusResponse:
        st = self.node.log.status()
        _, leader_address = self.node.log.leader_hint()
        return pb.NodeStatusResponse(
            node_id=st.node_id,
            address=st.peers.get(st.node_id, ""),
            role=st.role,
            ballot=f"{st.ballot[0]}.{st.ballot[1]}",
            leader_id=st.leader_id,
            leader_address=leader_address,
            commit_index=st.commit_index,
            applied_index=st.applied_index,
            snapshot_index=st.snapshot_index,
            pending=st.pending,
            peers=st.peers,
            ballot_round=st.ballot[0],
            not_serving=not self.node.serving,
            load=self._load(st),
        )

    def __init__(self, node: QueueNode, forwarder: Forwarder) -> None:
        super().__init__(node, forwarder)
        self.cpu = CpuSampler()

    def _load(self, st: LogStatus) -> pb.NodeLoad:
        cpu = self.cpu.read()
        long_polls = self.node.waiting_long_polls
        return pb.NodeLoad(
            cpu_utilization=cpu.utilization,
            process_cpu_cores=cpu.process_cores,
            cpu_count=cpu.cpu_count,
            # Neither this probe nor the long polls parked here are work.
            in_flight_calls=max(0, self.node.calls_in_flight - 1 - long_polls),
            waiting_long_polls=long_polls,
            apply_lag_entries=max(0, st.commit_index - st.applied_index),
            ready_jobs=self.node.machine.ready_jobs(),
            rss_bytes=cpu.rss_bytes,
        )
