"""Which of a Submit's enqueues go in as one command (``pqueue.node.packing``)."""

from __future__ import annotations

from pqueue.core import limits
from pqueue.node.packing import packed, trailing_run
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
    assert trailing_run([enqueue(), enqueue(), enqueue()]) == 0
    assert trailing_run([enqueue(), ack(), enqueue(), enqueue()]) == 2
    assert trailing_run([enqueue("a"), enqueue("b"), enqueue("b")]) == 1  # another queue ends it
    assert trailing_run([enqueue(tenant="t1"), enqueue(tenant="t2")]) == 2  # other stamps: none
    assert trailing_run([enqueue(), enqueue(), ack()]) == 3  # ends with an ack: none
    assert trailing_run([enqueue()]) == 1  # one alone is not a run
    assert trailing_run([]) == 0
    limited = logpb.Command()
    limited.CopyFrom(enqueue())
    limited.limits.max_queue_depth = 5
    assert trailing_run([limited, enqueue(), enqueue()]) == 1  # other tenant limits


def test_a_run_holds_one_job_enqueues_and_at_most_the_batch_limit() -> None:
    assert trailing_run([enqueue(jobs=2), enqueue(), enqueue()]) == 1  # a batch is not packed
    assert trailing_run([enqueue(), enqueue(jobs=2)]) == 2
    many = [enqueue() for _ in range(limits.MAX_BATCH_JOBS + 5)]
    assert trailing_run(many) == 5  # the last MAX_BATCH_JOBS of them


def test_a_packed_command_keeps_the_stamps_and_every_job_in_order() -> None:
    run = [enqueue(payload=b"a", tenant="t"), enqueue(payload=b"b", tenant="t")]
    one = packed(run)
    assert one.caller == run[0].caller
    assert one.enqueue.queue == "q"
    assert [j.payload for j in one.enqueue.jobs] == [b"a", b"b"]
    assert len(run[0].enqueue.jobs) == 1  # the originals are untouched (proposed alone if refused)
