"""Drive a QueueMachine with commands at chosen times (shared by unit tests)."""

from __future__ import annotations

from typing import Any

from pqueue.core import features
from pqueue.core.machine import QueueMachine, Result
from pqueue.core.snapshot import take_snapshot
from pqueue.v1 import log_pb2 as logpb
from pqueue.v1 import queue_pb2 as pb


class Driver:
    """One command per entry, at an explicit time."""

    def __init__(
        self, machine: QueueMachine | None = None, now: int = 1_000_000, lifecycle: bool = False
    ) -> None:
        self.m = machine or QueueMachine()
        self.now = now
        if lifecycle:  # as a leader does once every member supports it
            self.ok(tick=logpb.Tick(lifecycle=True))
            assert self.m.lifecycle

    def run(self, **command: Any) -> Result:
        commands = [logpb.Command(**command)]
        entry = logpb.LogEntry(
            index=self.m.applied_index + 1,
            time_ms=self.now,
            commands=commands,
            # Stamped as the leader stamps it.
            required_features=features.required_by(commands),
        )
        return self.m.apply_entry(entry).results[0]

    def ok(self, **command: Any) -> Any:
        result = self.run(**command)
        assert not isinstance(result, Exception), result
        return result

    def enqueue(self, queue: str = "q", payload: bytes = b"x", **spec: Any) -> int:
        r = self.ok(
            enqueue=pb.EnqueueBatchRequest(queue=queue, jobs=[pb.JobSpec(payload=payload, **spec)])
        )
        return int(r.results[0].job_id)

    def lease(self, queue: str = "q", n: int = 1, lease_ms: int = 0) -> list[pb.LeasedJob]:
        r = self.ok(lease=pb.LeaseRequest(queue=queue, max_jobs=n, lease_ms=lease_ms))
        return list(r.jobs)

    def ack(self, job: pb.LeasedJob, queue: str = "q") -> Result:
        leases = [pb.JobLease(job_id=job.job_id, lease_id=job.lease_id)]
        return self.run(ack=pb.AckRequest(queue=queue, leases=leases))

    def nack(self, job: pb.LeasedJob, queue: str = "q", **kw: Any) -> Any:
        return self.run(
            nack=pb.NackRequest(queue=queue, job_id=job.job_id, lease_id=job.lease_id, **kw)
        )

    def create(self, queue: str = "q", **config: Any) -> Any:
        return self.run(
            create_queue=pb.CreateQueueRequest(queue=queue, config=pb.QueueConfig(**config))
        )

    def state(self) -> bytes:
        """The queues' state, without the index, time and features every
        entry may move (a refused command's entry is stamped too)."""
        snap = take_snapshot(self.m)
        snap.index = snap.time_ms = 0
        del snap.required_features[:]
        return snap.SerializeToString(deterministic=True)

    def tick(self, advance_ms: int = 0) -> None:
        self.now += advance_ms
        self.ok(tick=logpb.Tick())
