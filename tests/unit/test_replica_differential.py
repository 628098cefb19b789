"""Replicas agree, whatever their history: random entries of every command
kind (the job lifecycle's included, with its switch at a random point)
applied to four machines — a plain follower; a "leader" that also makes the
reads a leader makes between entries (``next_due_ms``, ``has_ready``,
``next_dispatch_ms``, which drop stale heap entries); and two that replace
themselves now and then by a restore of their own snapshot — must give the
same results, effects and snapshot bytes after every entry.

(First written by a review of the lifecycle work, where it found a restored
replica counting records against a tenant's depth, and a stale dead-
retention look dropping a queue on some replicas only.)
"""

from __future__ import annotations

import random
from typing import Any

import pytest

from pqueue.core import features
from pqueue.core.machine import QueueMachine, Result
from pqueue.core.snapshot import restore, snapshot_bytes
from pqueue.v1 import log_pb2 as logpb
from pqueue.v1 import queue_pb2 as pb

QUEUES = ("acme/a", "q", "r")
NEVER = 10**9
#: Config fields an update may name (the bounds and shares have their own tests).
MASKABLE = [
    f.name
    for f in pb.QueueConfig.DESCRIPTOR.fields
    if f.name not in ("shares", "min_priority", "max_priority")
]


class Replica:
    def __init__(self, name: str, leader: bool = False, restore_p: float = 0.0) -> None:
        self.m = QueueMachine()
        self.name = name
        self.leader = leader
        self.restore_p = restore_p

    def apply(self, entry: logpb.LogEntry, rng: random.Random) -> tuple[Any, ...]:
        effects = self.m.apply_entry(entry)
        if self.leader:
            self.m.next_due_ms()
            for name in list(self.m.queues):
                self.m.has_ready(name)
                self.m.next_dispatch_ms(name)
        if self.restore_p and rng.random() < self.restore_p:
            self.m = restore(snapshot_bytes(self.m))
        results = tuple(_result_key(r) for r in effects.results)
        return results, dict(effects.woken), effects.changed, effects.touched


def _result_key(result: Result) -> Any:
    if isinstance(result, Exception):
        return ("error", type(result).__name__, str(result))
    return result.SerializeToString(deterministic=True)


def _config(rng: random.Random, name: str) -> pb.QueueConfig:
    c = pb.QueueConfig(max_attempts=rng.choice([0, 1, 2]))
    if rng.random() < 0.3:
        c.aging_interval_ms = rng.choice([30, 1000])
    if rng.random() < 0.3:
        c.delete_when_idle = not name.startswith("acme/")
    if rng.random() < 0.4:
        c.dead_retention_ms = rng.choice([100, 1000, 5000])
    if rng.random() < 0.4:
        c.job_ttl_ms = rng.choice([50, 500, 3000])
    if rng.random() < 0.4:
        c.completed_retention_ms = rng.choice([100, 1000, 5000])
    if rng.random() < 0.4:
        c.completed_max = rng.choice([0, 1, 3, 10])
    if rng.random() < 0.3:
        c.max_inflight = rng.choice([1, 2, 5])
    if rng.random() < 0.3:
        c.max_dispatch_per_s = rng.choice([0.5, 1.0, 3.3, 100.0])
    if rng.random() < 0.2:
        c.min_priority, c.max_priority = 0, 5
    return c


class Run:
    """One seeded run: commands drawn from what the follower's state holds."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.now = 1_000_000
        self.leased: list[tuple[str, int, int]] = []
        self.lifecycle_at = self.rng.choice([1, 1, 20, NEVER])

    def commands(self, step: int, follower: QueueMachine) -> list[logpb.Command]:
        rng = self.rng
        if step == 0:
            return [
                logpb.Command(
                    create_queue=pb.CreateQueueRequest(
                        queue=name, config=pb.QueueConfig(max_attempts=rng.choice([1, 2]))
                    )
                )
                for name in QUEUES
            ]
        if step == self.lifecycle_at:
            return [logpb.Command(tick=logpb.Tick(lifecycle=True))]
        self.now += rng.choice([0, 0, 1, 5, 50, 500, 1500, 4000, -30])  # stamps may go back
        return [self._command(step, follower) for _ in range(rng.choice([1, 1, 2, 3]))]

    def _command(self, step: int, follower: QueueMachine) -> logpb.Command:
        rng, now, on = self.rng, self.now, step > self.lifecycle_at
        name = rng.choice(QUEUES)
        job_id = rng.randrange(1, max(1, follower.next_job_id) + 1)
        k = rng.random()
        if k < 0.25:
            specs = []
            for _ in range(rng.choice([1, 1, 3])):
                spec = pb.JobSpec(payload=b"p" * rng.randrange(3), priority=rng.randrange(4))
                if rng.random() < 0.15:
                    spec.delay_ms = rng.choice([10, 100, 1000])
                if rng.random() < 0.15:
                    spec.group = rng.choice(["g1", "g2"])
                if rng.random() < 0.15:
                    spec.idempotency_key = f"k{rng.randrange(10)}"
                if on and rng.random() < 0.2:
                    spec.expires_at_ms = now + rng.choice([-5, 20, 300, 2000])
                specs.append(spec)
            cmd = logpb.Command(enqueue=pb.EnqueueBatchRequest(queue=name, jobs=specs))
            if rng.random() < 0.4:
                cmd.limits.max_queue_depth = rng.choice([2, 5, 8])
            return cmd
        if k < 0.4:
            lease = pb.LeaseRequest(
                queue=name, max_jobs=rng.choice([1, 3]), lease_ms=rng.choice([0, 100, 1000])
            )
            return logpb.Command(lease=lease)
        if k < 0.5 and self.leased:
            queue, job, lease_id = self.leased.pop(rng.randrange(len(self.leased)))
            result = b"r" if on and rng.random() < 0.5 else b""
            held = pb.JobLease(job_id=job, lease_id=lease_id, result=result)
            return logpb.Command(ack=pb.AckRequest(queue=queue, leases=[held]))
        if k < 0.57 and self.leased:
            queue, job, lease_id = self.leased.pop(rng.randrange(len(self.leased)))
            nack = pb.NackRequest(queue=queue, job_id=job, lease_id=lease_id)
            if rng.random() < 0.5:
                nack.delay_ms = rng.choice([0, 10, 200])
            nack.release = rng.random() < 0.3
            return logpb.Command(nack=nack)
        if k < 0.6 and self.leased:
            queue, job, lease_id = rng.choice(self.leased)
            extend = pb.ExtendLeaseRequest(queue=queue, job_id=job, lease_id=lease_id, lease_ms=500)
            return logpb.Command(extend=extend)
        if k < 0.62:
            return logpb.Command(purge=pb.PurgeQueueRequest(queue=name))
        if k < 0.63:
            return logpb.Command(delete_queue=pb.DeleteQueueRequest(queue=name))
        if k < 0.66:
            config = (
                _config(rng, name)
                if on
                else pb.QueueConfig(
                    max_attempts=1, delete_when_idle=rng.random() < 0.3 and name != "acme/a"
                )
            )
            return logpb.Command(create_queue=pb.CreateQueueRequest(queue=name, config=config))
        if k < 0.68:
            return logpb.Command(redrive=pb.RedriveRequest(queue=name))
        if k < 0.7:
            return logpb.Command(delete_dead=pb.DeleteDeadRequest(queue=name))
        if not on:
            return logpb.Command(tick=logpb.Tick())
        if k < 0.74:
            complete = pb.CompleteJobRequest(queue=name, job_id=job_id, result=b"f")
            return logpb.Command(complete_job=complete)
        if k < 0.78:
            return logpb.Command(cancel_job=pb.CancelJobRequest(queue=name, job_id=job_id))
        if k < 0.82:
            requeue = pb.RequeueJobRequest(
                queue=name, job_id=job_id, delay_ms=rng.choice([0, 0, 100])
            )
            return logpb.Command(requeue_job=requeue)
        if k < 0.86:
            move = pb.ReprioritizeJobRequest(queue=name, job_id=job_id)
            if rng.random() < 0.7:
                move.priority = rng.randrange(4)
            if rng.random() < 0.5:
                move.ready_at_ms = now + rng.choice([-100, 0, 200])
            return logpb.Command(reprioritize_job=move)
        if k < 0.91:
            mask = [] if rng.random() < 0.2 else rng.sample(MASKABLE, rng.choice([1, 2, 3]))
            update = pb.UpdateQueueRequest(queue=name, config=_config(rng, name), update_mask=mask)
            return logpb.Command(update_queue=update)
        if k < 0.94:
            if rng.random() < 0.5:
                return logpb.Command(pause_queue=pb.PauseQueueRequest(queue=name))
            return logpb.Command(resume_queue=pb.ResumeQueueRequest(queue=name))
        return logpb.Command(tick=logpb.Tick())

    def note_leases(self, commands: list[logpb.Command], results: tuple[Any, ...]) -> None:
        for cmd, result in zip(commands, results, strict=True):
            if cmd.WhichOneof("kind") == "lease" and isinstance(result, bytes):
                leased = pb.LeaseResponse.FromString(result).jobs
                self.leased += [(cmd.lease.queue, j.job_id, j.lease_id) for j in leased]


def check(seed: int, steps: int) -> None:
    run = Run(seed)
    replicas = [
        Replica("follower"),
        Replica("leader", leader=True),
        Replica("restored", restore_p=0.15),
        Replica("restored leader", leader=True, restore_p=0.3),
    ]
    for step in range(steps):
        commands = run.commands(step, replicas[0].m)
        entry = logpb.LogEntry(
            index=replicas[0].m.applied_index + 1,
            time_ms=run.now,
            commands=commands,
            required_features=features.required_by(commands),
        )
        outs = [replica.apply(entry, run.rng) for replica in replicas]
        for replica, out in zip(replicas[1:], outs[1:], strict=True):
            assert out == outs[0], f"seed {seed} step {step}: {replica.name} diverged on {entry}"
        state = snapshot_bytes(replicas[0].m)
        for replica in replicas[1:]:
            assert snapshot_bytes(replica.m) == state, (
                f"seed {seed} step {step}: {replica.name}'s state diverged after {entry}"
            )
        run.note_leases(commands, outs[0][0])


@pytest.mark.parametrize("seed", range(12))
def test_replicas_agree_whatever_their_history(seed: int) -> None:
    check(seed, 150)


@pytest.mark.slow
@pytest.mark.parametrize("block", range(10))
def test_replicas_agree_over_many_seeds(block: int) -> None:
    for seed in range(1000 + 50 * block, 1050 + 50 * block):
        check(seed, 400)
