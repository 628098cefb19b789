"""Which of a Submit's enqueues go in as one command (``pqueue.node.packing``)."""

from __future__ import annotations

from pqueue.core import limits
from pqueue.errors import InvalidArgumentError, PermissionDeniedError, ResourceExhaustedError
from pqueue.node.packing import packed, per_job, run_start
from pqueue.v1 import log_pb2 as logpb
from pqueue.v1 import queue_pb2 as pb


def enqueue(
    queue: str = "q", payload: bytes = b"x", tenant: str = "", jobs: int = 1
) -> logpb.Command:
    command = logpb.Command(caller=logpb.Caller(tenant=tenant))
    command.enqueue.queue = queue
    command.enqueue.jobs.extend(pb.JobSpec(payload=payload) for _ in range(jobs))
    return command


def ack(queue: str = "q") -> logpb.Command:
    return logpb.Command(ack=pb.AckRequest(queue=queue, leases=[pb.JobLease(job_id=1, lease_id=1)]))


def test_the_run_that_ends_the_submit_is_packed_and_nothing_before_it() -> None:
    assert run_start([enqueue(), enqueue(), enqueue()]) == 0
    assert run_start([enqueue(), ack(), enqueue(), enqueue()]) == 2
    assert run_start([enqueue("a"), enqueue("b"), enqueue("b")]) == 1  # another queue ends it
    assert run_start([enqueue(tenant="t1"), enqueue(tenant="t2")]) == 2  # other stamps: none
    assert run_start([enqueue(), enqueue(), ack()]) == 3  # ends with an ack: none
    assert run_start([enqueue()]) == 1  # one alone is not a run
    assert run_start([]) == 0
    limited = logpb.Command()
    limited.CopyFrom(enqueue())
    limited.limits.max_queue_depth = 5
    assert run_start([limited, enqueue(), enqueue()]) == 1  # other tenant limits
    assert run_start([enqueue(), limited, limited]) == 3  # under a depth limit: never packed


def test_only_one_jobs_refusal_sends_the_run_again_one_by_one() -> None:
    assert per_job(InvalidArgumentError("jobs[3].priority", "above the queue's max_priority"))
    assert not per_job(InvalidArgumentError("queue", "bad name"))  # every job's: one answer
    assert not per_job(PermissionDeniedError("not this tenant's queue"))
    assert not per_job(ResourceExhaustedError("the tenant holds its limit of queues"))


def test_a_run_holds_one_job_enqueues_and_at_most_the_batch_limit() -> None:
    assert run_start([enqueue(jobs=2), enqueue(), enqueue()]) == 1  # a batch is not packed
    assert run_start([enqueue(), enqueue(jobs=2)]) == 2
    many = [enqueue() for _ in range(limits.MAX_BATCH_JOBS + 5)]
    assert run_start(many) == 5  # the last MAX_BATCH_JOBS of them


def test_a_packed_command_keeps_the_stamps_and_every_job_in_order() -> None:
    run = [enqueue(payload=b"a", tenant="t"), enqueue(payload=b"b", tenant="t")]
    one = packed(run)
    assert one.caller == run[0].caller
    assert one.enqueue.queue == "q"
    assert [j.payload for j in one.enqueue.jobs] == [b"a", b"b"]
    assert len(run[0].enqueue.jobs) == 1  # the originals are untouched (proposed alone if refused)
