"""A seeded random differential test of the compact form (from the issue-14
review): the same entries applied to replicas holding waiting jobs compact
(32 FIFOs), as objects (0), mixed (2), and two that snapshot and restore
from pieces of random sizes at random: every result, woken and changed set
and the snapshot bytes agree at every step; frozen views read a piece at a
time while the machine goes on are the state at their freeze."""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest

from pqueue.core import jobs, snapshot
from pqueue.core.effects import Effects, Result
from pqueue.core.machine import QueueMachine
from pqueue.core.snapshot import freeze, restore_chunks, snapshot_bytes
from pqueue.v1 import log_pb2 as logpb
from pqueue.v1 import queue_pb2 as pb

QUEUES = ["acme/a", "acme/b", "q"]
TENANTS = ["acme", "beta", "gamma"]


class Replica:
    def __init__(self, fifos: int, restore_every: int = 0, name: str = "") -> None:
        self.m = QueueMachine()
        self.fifos = fifos
        self.restore_every = restore_every
        self.name = name

    def apply(self, entry: logpb.LogEntry, rng: random.Random) -> Effects:
        default, jobs.MAX_FIFO_PRIORITIES = jobs.MAX_FIFO_PRIORITIES, self.fifos
        try:
            eff = self.m.apply_entry(entry)
            if self.restore_every and rng.random() < 1 / self.restore_every:
                data = snapshot_bytes(self.m)
                size = rng.choice([1, 5, 17, 100, 4096, len(data)])
                self.m = restore_chunks(data[i : i + size] for i in range(0, len(data), size))
            return eff
        finally:
            jobs.MAX_FIFO_PRIORITIES = default


def res_key(r: Result) -> object:
    if isinstance(r, Exception):
        return ("E", type(r).__name__, str(r))
    return r.SerializeToString(deterministic=True)


def run(seed: int, steps: int) -> None:
    rng = random.Random(seed)
    snapshot.PACKED_BLOCK_JOBS = rng.choice([1, 2, 3, 4096])
    snapshot.PACKED_BLOCK_BYTES = rng.choice([8, 256 << 10])
    snapshot.CHUNK_BYTES = rng.choice([16, 64, 1 << 20])
    reps = [
        Replica(32, name="compact"),
        Replica(0, name="objects"),
        Replica(2, name="mixed"),
        Replica(32, restore_every=10, name="restored"),
        Replica(1, restore_every=5, name="r1"),
    ]
    now = 1_000_000
    leased: list[tuple[str, int, int]] = []
    # (replica's name, its view's pieces, the pieces so far, the bytes expected)
    views: list[tuple[str, Iterator[bytes], list[bytes], bytes]] = []
    nprio = rng.choice([3, 40])
    for step in range(steps):
        if step == 0:
            entry = logpb.LogEntry(index=1, time_ms=now)
            for qn in QUEUES:
                cfg = pb.QueueConfig(
                    max_attempts=rng.choice([0, 1, 2]), aging_interval_ms=rng.choice([0, 30, 1000])
                )
                if qn.startswith("acme/"):
                    cfg.shares.extend(
                        [
                            pb.TenantShare(tenant="beta", weight=rng.choice([1, 3])),
                            pb.TenantShare(tenant="gamma", weight=1),
                        ]
                    )
                entry.commands.add().create_queue.CopyFrom(
                    pb.CreateQueueRequest(queue=qn, config=cfg)
                )
            for rep in reps:
                rep.apply(entry, rng)
            continue
        now += rng.choice([0, 0, 1, 5, 50, 500, 40_000, -30])
        cmds = []
        for _ in range(rng.choice([1, 1, 1, 2, 3])):
            k = rng.random()
            qn = rng.choice(QUEUES)
            caller = None
            if k < 0.35:
                specs = []
                for _ in range(rng.choice([1, 1, 3, 10])):
                    spec = pb.JobSpec(
                        payload=bytes([rng.randrange(256)]) * rng.randrange(0, 30),
                        priority=rng.randrange(nprio),
                    )
                    r = rng.random()
                    if r < 0.15:
                        spec.delay_ms = rng.choice([1, 10, 100, 1000])
                    elif r < 0.2:
                        spec.not_before_ms = now + rng.choice([-100, 0, 50])
                    if rng.random() < 0.15:
                        spec.group = rng.choice(["g1", "g2"])
                    if rng.random() < 0.2:
                        spec.idempotency_key = f"k{rng.randrange(20)}"
                    specs.append(spec)
                if qn.startswith("acme/") and rng.random() < 0.7:
                    caller = logpb.Caller(tenant=rng.choice(TENANTS), admin=rng.random() < 0.1)
                cmd = logpb.Command(enqueue=pb.EnqueueBatchRequest(queue=qn, jobs=specs))
            elif k < 0.55:
                cmd = logpb.Command(
                    lease=pb.LeaseRequest(
                        queue=qn,
                        max_jobs=rng.choice([1, 2, 5]),
                        lease_ms=rng.choice([0, 100, 1000]),
                    )
                )
            elif k < 0.7 and leased:
                q, j, lid = leased.pop(rng.randrange(len(leased)))
                cmd = logpb.Command(
                    ack=pb.AckRequest(queue=q, leases=[pb.JobLease(job_id=j, lease_id=lid)])
                )
            elif k < 0.8 and leased:
                q, j, lid = leased.pop(rng.randrange(len(leased)))
                nack = pb.NackRequest(queue=q, job_id=j, lease_id=lid)
                if rng.random() < 0.5:
                    nack.delay_ms = rng.choice([0, 10, 200])
                if rng.random() < 0.3:
                    nack.release = True
                cmd = logpb.Command(nack=nack)
            elif k < 0.83 and leased:
                q, j, lid = rng.choice(leased)
                cmd = logpb.Command(
                    extend=pb.ExtendLeaseRequest(queue=q, job_id=j, lease_id=lid, lease_ms=500)
                )
            elif k < 0.85:
                cmd = logpb.Command(purge=pb.PurgeQueueRequest(queue=qn))
            elif k < 0.865:
                cmd = logpb.Command(delete_queue=pb.DeleteQueueRequest(queue=qn))
            elif k < 0.9:
                cfg = pb.QueueConfig(
                    max_attempts=rng.choice([0, 1, 2]),
                    aging_interval_ms=rng.choice([0, 0, 30]),
                    delete_when_idle=rng.random() < 0.2,
                )
                if qn.startswith("acme/"):
                    cfg.shares.extend(
                        [
                            pb.TenantShare(tenant="beta", weight=rng.choice([1, 3])),
                            pb.TenantShare(tenant="gamma", weight=1),
                        ]
                    )
                cmd = logpb.Command(create_queue=pb.CreateQueueRequest(queue=qn, config=cfg))
            elif k < 0.93:
                cmd = logpb.Command(redrive=pb.RedriveRequest(queue=qn))
            elif k < 0.94:
                cmd = logpb.Command(delete_dead=pb.DeleteDeadRequest(queue=qn))
            else:
                cmd = logpb.Command(tick=logpb.Tick())
            if caller is not None:
                cmd.caller.CopyFrom(caller)
            cmds.append(cmd)
        entry = logpb.LogEntry(index=reps[0].m.applied_index + 1, time_ms=now, commands=cmds)
        outcomes = []
        effects = []
        for rep in reps:
            eff = rep.apply(entry, rng)
            effects.append(eff)
            outcomes.append(
                ([res_key(r) for r in eff.results], eff.woken, eff.changed, eff.touched)
            )
        for i, outcome in enumerate(outcomes[1:], 1):
            if outcome != outcomes[0]:
                raise AssertionError(f"seed {seed} step {step}: {reps[i].name} diverged: {entry}")
        for cmd, result in zip(cmds, effects[0].results, strict=True):
            if cmd.WhichOneof("kind") == "lease" and isinstance(result, pb.LeaseResponse):
                leased.extend((cmd.lease.queue, j.job_id, j.lease_id) for j in result.jobs)
        # reads on some replicas (they mutate lazily)
        if rng.random() < 0.3:
            for rep in reps[::2]:
                rep.m.list_queues(now)
                for q in list(rep.m.queues):
                    rep.m.has_ready(q)
        hashes = [snapshot_bytes(rep.m) for rep in reps]
        for i, h in enumerate(hashes[1:], 1):
            if h != hashes[0]:
                raise AssertionError(f"seed {seed} step {step}: {reps[i].name}'s snapshot")
        # views
        if rng.random() < 0.1:
            rep = rng.choice(reps)
            views.append((rep.name, freeze(rep.m).chunks(), [], hashes[0]))
        for v in list(views):
            name, it, pieces, expected = v
            for _ in range(rng.choice([0, 1, 2])):
                piece = next(it, None)
                if piece is None:
                    if b"".join(pieces) != expected:
                        raise AssertionError(f"seed {seed} step {step}: a view of {name}")
                    views.remove(v)
                    break
                pieces.append(piece)


@pytest.mark.parametrize("seed", range(6))
def test_every_form_and_every_restore_agree(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("PACKED_BLOCK_JOBS", "PACKED_BLOCK_BYTES", "CHUNK_BYTES"):
        monkeypatch.setattr(snapshot, name, getattr(snapshot, name))
    monkeypatch.setattr(jobs, "MAX_FIFO_PRIORITIES", jobs.MAX_FIFO_PRIORITIES)
    run(seed, 300)
