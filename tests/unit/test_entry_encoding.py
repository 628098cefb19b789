"""A leader's entry is made of its commands' bytes, encoded once as they were
queued: the bytes are exactly those of the ``LogEntry`` message."""

from __future__ import annotations

import random

import pytest

from pqueue.core import features
from pqueue.node.replicated import encode_entry
from pqueue.v1 import log_pb2 as logpb
from pqueue.v1 import queue_pb2 as pb


def _commands(rng: random.Random, n: int) -> list[logpb.Command]:
    out = []
    for k in range(n):
        spec = pb.JobSpec(
            payload=rng.randbytes(rng.randrange(0, 600)),
            priority=rng.randrange(-5, 5),
            idempotency_key=f"key-{k}" if k % 3 else "",
        )
        if k % 4 == 0:
            out.append(logpb.Command(ack=pb.AckRequest(queue="q", leases=[pb.JobLease(job_id=k)])))
        else:
            command = logpb.Command(caller=logpb.Caller(tenant="acme"))
            command.enqueue.queue = "acme/q"
            command.enqueue.jobs.append(spec)
            out.append(command)
    out.append(
        logpb.Command(
            create_queue=pb.CreateQueueRequest(
                queue="s", config=pb.QueueConfig(shares=[pb.TenantShare(tenant="b", weight=2)])
            )
        )
    )
    return out


@pytest.mark.parametrize("n", [0, 1, 7, 300])
def test_an_entry_of_encoded_commands_is_the_entry_message(n: int) -> None:
    rng = random.Random(n)
    commands = _commands(rng, n)
    needed = features.required_by(commands)
    assert needed  # the shares field: the tail is exercised too
    for index, time_ms in ((1, 0), (2**40, 1_790_000_000_000), (3, -5)):
        whole = logpb.LogEntry(
            index=index, time_ms=time_ms, commands=commands, required_features=needed
        )
        made = encode_entry(index, time_ms, [c.SerializeToString() for c in commands], needed)
        assert made == whole.SerializeToString()
        assert logpb.LogEntry.FromString(made) == whole
