"""Packing a ``Submit``'s trailing single-job enqueues into one command (pure).

The SDK batches concurrent ``enqueue()`` calls into one ``Submit``, one
one-job operation each, and each used to become a command of its own in the log:
at 16 producers a Submit carries 16 one-job enqueues, and every replica
paid a command's fixed cost (dispatch, checks, result, event) per job. The
run of operations that ends the Submit and enqueues into one queue with the
same stamps (caller and tenant limits: the same principal's, read at the
same moment) is proposed as one ``EnqueueBatch`` command instead, its
result split back, one ``EnqueueResponse`` per operation, in order. When
it applies, the jobs get the ids, order and entry they would have got as
separate commands in one entry, and idempotency keys behave the same (a key
met twice in the run is a duplicate of its first job, as in two commands).
A run under a tenant's depth limit is not packed: that limit may take some
of its jobs and not the rest.

An ``EnqueueBatch`` is atomic where separate commands are not: one job the
machine refuses (over a queue's ``max_priority``, a tenant's payload limit)
refuses the whole run, and nothing of it changes. The servicer then
proposes each operation of the run alone, so each gets the answer its
single call gets (``QueueService.run_ops``), in a later entry (its own log
index and time; the rest of the cluster's commands may come between). Only
the *trailing* run is packed, so that second proposal still applies a
Submit's operations in request order (as its contract says): nothing of the
Submit comes after them. Its log bytes are not charged to the tenant again.
A refusal that is the same for every job (the queue's or the caller's:
permission, the tenant's queue count) is every operation's answer, as is an
error of the log itself (commit unknown, leadership lost), as they would be
for separate commands of one entry.
"""

from __future__ import annotations

from collections.abc import Sequence

from pqueue.core import limits
from pqueue.errors import InvalidArgumentError, PQueueError
from pqueue.v1 import log_pb2 as logpb


def run_start(commands: Sequence[logpb.Command]) -> int:
    """Where the packable run that ends ``commands`` starts: consecutive
    one-job enqueues into one queue with equal stamps, two or more, at most
    ``MAX_BATCH_JOBS``; ``len(commands)`` when there is none."""
    end = len(commands)
    last = commands[-1] if commands else None
    if last is None or not _single_enqueue(last) or last.limits.max_queue_depth:
        # (A tenant's depth limit may take some of a run's jobs and not the
        # rest: separate commands get that, so none is packed.)
        return end
    start = end - 1
    while start > 0 and end - start < limits.MAX_BATCH_JOBS:
        command = commands[start - 1]
        if not (
            _single_enqueue(command)
            and command.enqueue.queue == last.enqueue.queue
            and command.caller == last.caller
            and command.limits == last.limits
        ):
            break
        start -= 1
    return start if end - start >= 2 else end


def per_job(error: PQueueError) -> bool:
    """Whether the machine refused a packed command for one job's sake (a
    field of ``jobs[i]``), which separate commands would not all share;
    a refusal of the queue or the caller is the same for every job."""
    return isinstance(error, InvalidArgumentError) and error.field.startswith("jobs[")


def _single_enqueue(command: logpb.Command) -> bool:
    return command.WhichOneof("kind") == "enqueue" and len(command.enqueue.jobs) == 1


def packed(run: Sequence[logpb.Command]) -> logpb.Command:
    """The one command proposed for ``run`` (one-job enqueues into one queue
    with equal stamps): the first's stamps and queue, every job in order
    (its result answers them in that order, one each)."""
    out = logpb.Command()
    out.CopyFrom(run[0])
    for command in run[1:]:
        out.enqueue.jobs.extend(command.enqueue.jobs)
    return out
