"""A ``Consume`` stream driven by hand, as a consumer in any language drives it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence

import grpc

from pqueue.errors import PQueueError
from pqueue.v1 import queue_pb2 as pb
from pqueue.v1 import queue_pb2_grpc as pbg
from pqueue.wire.status import from_rpc_error

#: How long a test waits for anything the node should send.
WAIT_S = 15.0


def ack(queue: str, job: pb.LeasedJob, lease_id: int | None = None) -> pb.Operation:
    lease = pb.JobLease(job_id=job.job_id, lease_id=job.lease_id if lease_id is None else lease_id)
    return pb.Operation(ack=pb.AckRequest(queue=queue, leases=[lease]))


class RawStream:
    """One stream on its own channel: write requests, read responses."""

    def __init__(self, address: str, metadata: Sequence[tuple[str, str]] = ()) -> None:
        self.channel = grpc.aio.insecure_channel(address)
        self.call = pbg.QueueStub(self.channel).Consume(metadata=tuple(metadata))
        #: Settle answers read while waiting for jobs, and jobs read while
        #: waiting for an answer: nothing read is dropped.
        self.answers: dict[int, list[pb.OpResult]] = {}
        self.jobs: list[pb.LeasedJob] = []
        self._taken = 0
        self.responses: list[pb.ConsumeResponse] = []
        self._settle_id = 0

    async def start(self, queue: str, credits: int = 0, **start: object) -> None:
        await self.write(start=pb.ConsumeStart(queue=queue, **start), credits=credits)  # type: ignore[arg-type]

    async def write(self, **fields: object) -> None:
        """Send one request (a stream the node ended takes none: ``ended`` says why)."""
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
            await self.call.write(pb.ConsumeRequest(**fields))  # type: ignore[arg-type]

    async def read(self) -> pb.ConsumeResponse:
        """The next response (raises the stream's status if it ended)."""
        try:
            response = await asyncio.wait_for(self.call.read(), WAIT_S)
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from exc
        assert response is not grpc.aio.EOF, "the stream ended OK"
        assert isinstance(response, pb.ConsumeResponse)
        self.responses.append(response)
        if response.settle_id:
            self.answers[response.settle_id] = list(response.settled)
        self.jobs += response.jobs
        return response

    async def take(self, n: int) -> list[pb.LeasedJob]:
        """The next ``n`` jobs pushed (reading until they came); never more
        than ``n`` come in the responses read for them."""
        while len(self.jobs) < self._taken + n:
            await self.read()
        assert len(self.jobs) == self._taken + n, (
            f"{len(self.jobs) - self._taken} jobs came, {n} expected"
        )
        self._taken += n
        return self.jobs[self._taken - n : self._taken]

    async def settle(self, ops: Sequence[pb.Operation], credits: int = 0) -> list[pb.OpResult]:
        """Send ``ops`` (and ``credits``) in one request; their results."""
        self._settle_id += 1
        settle_id = self._settle_id
        await self.write(settle=list(ops), settle_id=settle_id, credits=credits)
        while settle_id not in self.answers:
            await self.read()
        return self.answers.pop(settle_id)

    async def ended(self) -> PQueueError:
        """Read until the stream ends; the error it ended with."""
        while True:
            try:
                await self.read()
            except PQueueError as exc:
                return exc

    async def close(self) -> None:
        self.call.cancel()
        await self.channel.close()
