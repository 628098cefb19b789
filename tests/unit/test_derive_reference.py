"""``events.derive`` against its first, plainer form, over random entries
(several commands each, as the single-job cell's log holds): the events of
every entry must be the same, in the same order."""

from __future__ import annotations

import random
from dataclasses import replace
from typing import Any

import pytest

from pqueue.core import events
from pqueue.core.effects import Effects
from pqueue.core.events import _QUEUE_KINDS, WAITING, Event, K
from pqueue.core.jobs import COMPLETED, DEAD, Job
from pqueue.core.machine import QueueMachine
from pqueue.v1 import log_pb2 as logpb
from pqueue.v1 import queue_pb2 as pb


def reference(entry: logpb.LogEntry, effects: Effects, jobs: QueueMachine) -> list[Event]:
    """``derive`` as it was written first: every job looked up among the
    touched queues (the specification the faster one must match)."""
    index, now = effects.index, jobs.time_ms
    events: list[Event] = [Event._make((index, *e[1:])) for e in effects.advanced]
    explained: set[int] = set(e.job_id for e in events)
    touched = effects.touched

    changed = effects.changed

    def job(job_id: int) -> Job | None:
        return jobs.find_job(job_id, touched) if job_id in changed else None

    def add(kind: int, job_id: int, result_bytes: int = 0, reason: str = "") -> bool:
        """The job's event, if it is still there (False: it is gone)."""
        brief = jobs.job_brief(job_id, touched) if job_id in changed else None
        if brief is None:
            return False
        queue, state, attempt, priority = brief
        events.append(
            Event(index, now, queue, job_id, kind, state, attempt, priority, result_bytes, reason)
        )
        explained.add(job_id)
        return True

    for cmd, result in zip(entry.commands, effects.results, strict=False):
        if isinstance(result, Exception):
            continue  # refused: nothing changed
        what = cmd.WhichOneof("kind")
        if what == "enqueue" and isinstance(result, pb.EnqueueBatchResponse):
            for one in result.results:
                if not one.duplicate:
                    add(K.ENQUEUED, one.job_id)
        elif what == "lease" and isinstance(result, pb.LeaseResponse):
            for leased in result.jobs:
                add(K.LEASED, leased.job_id)
        elif what == "ack":
            for lease in cmd.ack.leases:
                size = len(lease.result)
                if not add(K.COMPLETED, lease.job_id, result_bytes=size):
                    # Acked and not kept (no records: before LIFECYCLE, completed_max 0).
                    events.append(
                        Event(
                            index, now, cmd.ack.queue, lease.job_id, K.COMPLETED, COMPLETED,
                            result_bytes=size,
                        )
                    )  # fmt: skip
                    explained.add(lease.job_id)
        elif what == "nack" and isinstance(result, pb.NackResponse):
            dead = result.state == DEAD
            add(K.DEAD if dead else K.NACKED, cmd.nack.job_id, reason=cmd.nack.reason)
        elif what == "complete_job":
            add(K.COMPLETED, cmd.complete_job.job_id, result_bytes=len(cmd.complete_job.result))
        elif what == "cancel_job":
            add(K.CANCELLED, cmd.cancel_job.job_id)
        elif what == "requeue_job":
            add(K.REQUEUED, cmd.requeue_job.job_id)
        elif what == "reprioritize_job":
            add(K.REPRIORITIZED, cmd.reprioritize_job.job_id)
        elif what in _QUEUE_KINDS:
            queue = getattr(cmd, what).queue
            events.append(Event(index, now, queue, 0, _QUEUE_KINDS[what]))
    for job_id in sorted(effects.changed - explained - effects.advanced_ids):
        found = job(job_id)
        if found is None or found.state not in WAITING:
            continue
        fresh = found.attempts == 0 and found.enqueued_at_ms == now and not found.errors
        kind = K.ENQUEUED if fresh else K.REQUEUED
        state, attempts, priority = found.state, found.attempts, found.priority
        events.append(Event(index, now, found.queue, job_id, kind, state, attempts, priority))
    return events


class Both(QueueMachine):
    """A machine that derives each entry's events both ways."""

    def __init__(self) -> None:
        super().__init__()
        self.entries = 0
        self.events = 0

    def apply_entry(self, entry: logpb.LogEntry, respond: bool = True) -> Any:
        effects = super().apply_entry(entry, respond)
        got = events.derive(entry, effects, self)
        assert got == reference(entry, effects, self), entry
        # Plain tuples, which the cyclic collector stops tracking (see ``Row``).
        assert all(type(row) is tuple for row in got), entry
        # The jobs the handlers named are the ones the messages name.
        assert events.derive(entry, replace(effects, named=()), self) == got, entry
        self.entries += 1
        self.events += len(got)
        return effects


def drive(
    m: QueueMachine, seed: int, entries: int = 600, priorities: int = 3, retries: bool = True
) -> None:
    """Random entries of several commands each on two queues, jobs of
    ``priorities`` priorities; without ``retries``, no delays, nacks,
    requeues or lapsed leases (shared by tests/unit/test_take_ready_paths.py)."""
    rng = random.Random(seed)
    now = 1_000_000
    index = m.applied_index

    def apply(commands: list[logpb.Command]) -> list[Any]:
        nonlocal index
        index += 1
        entry = logpb.LogEntry(index=index, time_ms=now, commands=commands)
        return list(m.apply_entry(entry).results)

    apply([logpb.Command(tick=logpb.Tick(lifecycle=True))])
    queues = ["a", "b"]
    for name, kept in zip(queues, (20, 0), strict=True):  # "b" keeps no records
        config = pb.QueueConfig(max_attempts=2, backoff_base_ms=5, completed_max=kept)
        apply([logpb.Command(create_queue=pb.CreateQueueRequest(queue=name, config=config))])
    held: list[tuple[str, pb.LeasedJob]] = []
    made: list[tuple[str, int]] = []
    for _ in range(entries):
        now += rng.choice((0, 1, 3, 20))
        commands: list[logpb.Command] = []
        for _ in range(rng.randint(1, 4)):
            queue = rng.choice(queues)
            roll = rng.random()
            if roll < 0.35:
                specs = [
                    pb.JobSpec(
                        payload=b"x",
                        priority=rng.randrange(priorities),
                        delay_ms=rng.choice((0, 0, 0, 10)) if retries else 0,
                        idempotency_key=rng.choice(("", "", "", "k1", "k2")),
                    )
                    for _ in range(rng.randint(1, 5))
                ]
                commands.append(
                    logpb.Command(enqueue=pb.EnqueueBatchRequest(queue=queue, jobs=specs))
                )
            elif roll < 0.6:
                lease = pb.LeaseRequest(
                    queue=queue,
                    max_jobs=rng.randint(1, 4),
                    lease_ms=rng.choice((15, 500)) if retries else 60_000,
                )
                commands.append(logpb.Command(lease=lease))
            elif roll < 0.8 and held:
                name, job = held.pop(rng.randrange(len(held)))
                leases = [pb.JobLease(job_id=job.job_id, lease_id=job.lease_id, result=b"r")]
                commands.append(logpb.Command(ack=pb.AckRequest(queue=name, leases=leases)))
            elif roll < 0.9 and held and retries:
                name, job = held.pop(rng.randrange(len(held)))
                nack = pb.NackRequest(
                    queue=name, job_id=job.job_id, lease_id=job.lease_id, reason="boom"
                )
                commands.append(logpb.Command(nack=nack))
            elif roll < 0.93 and made:
                name, job_id = rng.choice(made)
                cancel = pb.CancelJobRequest(queue=name, job_id=job_id)
                commands.append(logpb.Command(cancel_job=cancel))
            elif roll < 0.96 and made and retries:
                name, job_id = rng.choice(made)
                requeue = pb.RequeueJobRequest(queue=name, job_id=job_id)
                commands.append(logpb.Command(requeue_job=requeue))
            else:
                commands.append(logpb.Command(tick=logpb.Tick()))
        for command, result in zip(commands, apply(commands), strict=True):
            if command.WhichOneof("kind") == "lease" and isinstance(result, pb.LeaseResponse):
                held.extend((command.lease.queue, job) for job in result.jobs)
            elif isinstance(result, pb.EnqueueBatchResponse):
                made.extend((command.enqueue.queue, one.job_id) for one in result.results)


@pytest.mark.parametrize("seed", range(4))
def test_derive_matches_its_reference(seed: int) -> None:
    m = Both()
    drive(m, seed)
    assert m.entries > 600
    assert m.events > 1000
