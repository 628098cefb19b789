"""The compact form of waiting jobs (pqueue/core/jobs.py): what a job costs,
and that the form never changes what the machine does."""

from __future__ import annotations

import gc
import tracemalloc

import pytest

from pqueue.core import jobs, snapshot
from pqueue.core.machine import QueueMachine
from pqueue.core.snapshot import (
    freeze,
    restore,
    restore_chunks,
    snapshot_bytes,
    state_hash,
    take_snapshot,
)
from pqueue.v1 import log_pb2 as logpb
from pqueue.v1 import queue_pb2 as pb
from tests.machine_driver import Driver

PAYLOAD = 100


def _fill(machine: QueueMachine, count: int, priorities: int = 10) -> None:
    for batch in range(count // 1000):
        entry = logpb.LogEntry(index=machine.applied_index + 1, time_ms=1_000 + batch)
        req = entry.commands.add().enqueue
        req.queue = "q"
        for i in range(1000):
            req.jobs.add(payload=bytes([i % 256]) * PAYLOAD, priority=i % priorities)
        machine.apply_entry(entry)


def _bytes_per_job(count: int, build: object) -> float:
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        kept = build()  # type: ignore[operator]
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    del kept
    return (after - before) / count


def test_a_waiting_job_costs_under_150_bytes_beyond_its_payload() -> None:
    """Counted by tracemalloc (allocations, not time): the dict slot, the id,
    the row's header and a deque slot; 127 bytes when written. The figure
    the "Capacity" section of docs/operations.md builds on; an object per job (before
    the compact form) cost 493."""
    count = 20_000

    def build() -> QueueMachine:
        machine = QueueMachine()
        _fill(machine, count)
        return machine

    overhead = _bytes_per_job(count, build) - PAYLOAD
    assert overhead < 150, f"{overhead:.0f} bytes per waiting job beyond its payload"


def test_a_restored_job_costs_the_same() -> None:
    machine = QueueMachine()
    _fill(machine, 20_000)
    data = snapshot_bytes(machine)
    del machine
    overhead = _bytes_per_job(20_000, lambda: restore(data)) - PAYLOAD
    assert overhead < 150, f"{overhead:.0f} bytes per restored job beyond its payload"


def test_a_job_ready_after_a_delay_keeps_its_place_after_a_restore() -> None:
    """A delayed job that came due is packable, and its id is older than a
    fresh job with an earlier ready time: a restore must not put it ahead."""
    d = Driver()
    late = d.enqueue(delay_ms=200)  # ready at +200
    d.now += 100
    early = d.enqueue()  # ready at +100, a greater id
    d.tick(200)
    d.m = restore(snapshot_bytes(d.m))
    assert [j.job_id for j in d.lease(n=2)] == [early, late]


@pytest.mark.parametrize("fifos", [0, 1, 32])
def test_the_form_changes_neither_the_order_nor_the_snapshot(
    fifos: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same commands with every job an object (0), a mix (1) and the
    compact form (32): same leases, same snapshot bytes."""

    def run() -> tuple[list[int], str]:
        d = Driver()
        d.create(aging_interval_ms=50, max_attempts=2)
        order = []
        for step in range(300):
            d.now += 7
            d.enqueue(priority=step % 5, delay_ms=(step % 3) * 20)
            if step % 4 == 0:
                for job in d.lease(n=2):
                    order.append(job.job_id)
                    if job.job_id % 3:
                        d.ack(job)
                    else:
                        d.nack(job, delay_ms=0)
        return order, state_hash(d.m)

    reference = run()
    monkeypatch.setattr(jobs, "MAX_FIFO_PRIORITIES", fifos)
    assert run() == reference


def test_a_frozen_view_is_the_state_when_frozen() -> None:
    """``freeze`` then more entries: the view's bytes are those of the state
    at the freeze (the shell writes them while the machine goes on)."""
    d = Driver()
    for i in range(50):
        d.enqueue(priority=i % 3)
    for job in d.lease(n=5):
        d.ack(job)
    leased = d.lease(n=3)
    expected = snapshot_bytes(d.m)
    view = freeze(d.m)
    d.ack(leased[0])
    d.nack(leased[1], delay_ms=10)
    d.enqueue(priority=1)
    d.lease(n=10)
    assert b"".join(view.chunks()) == expected
    assert view.index + 4 == d.m.applied_index


def test_snapshots_keep_the_compact_form_and_old_records_still_restore() -> None:
    d = Driver()
    ids = [d.enqueue(priority=i % 2) for i in range(10)]
    snap = take_snapshot(d.m)
    assert not snap.queues[0].jobs  # every job is packable: all in rows
    assert [b.queue for b in snap.packed] == ["q"]
    # The same state written the old way (a record per job) restores to it.
    old = logpb.Snapshot()
    old.CopyFrom(snap)
    del old.packed[:]
    for job in d.m.queues["q"].jobs.values():
        old.queues[0].jobs.add(**job.record_fields())
    again = restore(old.SerializeToString())
    assert snapshot_bytes(again) == snapshot_bytes(d.m)
    assert [j.job_id for j in Driver(again).lease(n=10)] == [
        *[i for n, i in enumerate(ids) if n % 2 == 0],
        *[i for n, i in enumerate(ids) if n % 2 == 1],
    ]


def test_a_lease_promotes_the_job_and_reads_never_do() -> None:
    d = Driver()
    first = d.enqueue()
    second = d.enqueue()
    table = d.m.queues["q"].jobs
    assert d.m.get_job("q", first).state == pb.JOB_STATE_READY
    assert table.row(first) is not None  # a read leaves it compact
    d.lease()
    assert table.row(first) is None  # leased: an object now
    assert table.row(second) is not None


def test_a_snapshot_restores_from_pieces_of_any_size() -> None:
    """The shell reads a snapshot file in pieces; fields span them."""
    d = Driver()
    d.create(max_attempts=1)
    for i in range(40):
        d.enqueue(priority=i % 4, idempotency_key=f"k{i}" if i % 5 == 0 else "")
    d.enqueue(group="g")
    d.nack(d.lease()[0])  # one dead job: a record beside the rows
    data = snapshot_bytes(d.m)
    for size in (1, 7, 1000, len(data)):
        pieces = [data[i : i + size] for i in range(0, len(data), size)]
        assert snapshot_bytes(restore_chunks(pieces)) == data


def test_a_truncated_snapshot_is_refused() -> None:
    d = Driver()
    for _ in range(10):
        d.enqueue()
    data = snapshot_bytes(d.m)
    with pytest.raises(ValueError, match="snapshot ends inside"):
        restore(data[:-3])


def test_a_view_read_while_the_machine_changes_is_the_state_when_frozen(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Pieces taken one at a time between commands that lease (a row leaves
    the form), ack (a row leaves the table), purge, enqueue, and compact the
    table's id list: the joined pieces are the state at the freeze."""
    monkeypatch.setattr(snapshot, "PACKED_BLOCK_JOBS", 3)
    monkeypatch.setattr(snapshot, "CHUNK_BYTES", 64)
    d = Driver()
    for i in range(60):
        d.enqueue(priority=i % 3, delay_ms=100 if i % 7 == 0 else 0)
    d.enqueue("other")
    for job in d.lease(n=4):
        d.ack(job)
    expected = snapshot_bytes(d.m)
    view = freeze(d.m)
    other = freeze(d.m)  # a second view open at the same time
    pieces = []
    chunks = view.chunks()
    for step, piece in enumerate(chunks):
        pieces.append(piece)
        if step % 2:
            for job in d.lease(n=2):
                d.ack(job)
        else:
            d.enqueue(priority=step % 3)
        if step == 5:
            d.ok(purge=pb.PurgeQueueRequest(queue="other"))
    assert b"".join(pieces) == expected
    assert b"".join(other.chunks()) == expected
    assert not d.m.queues["q"].jobs._frozen  # both views let go when read


def test_a_view_dropped_before_it_is_read_through_lets_go(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A reader that stops early (a ``StateDigest`` call cancelled between
    pieces, a snapshot task cancelled) must not leave the queues it had not
    reached yet keeping every row that leaves them, for ever."""
    monkeypatch.setattr(snapshot, "PACKED_BLOCK_JOBS", 1)
    monkeypatch.setattr(snapshot, "CHUNK_BYTES", 16)
    d = Driver()
    for name in ("a", "b"):
        for _ in range(20):
            d.enqueue(name, payload=b"x" * 1000)
    chunks = freeze(d.m).chunks()
    next(chunks)  # the first piece, then the reader goes away
    del chunks
    gc.collect()
    for _ in range(20):
        for job in d.lease("b"):
            d.ack(job, "b")
    table = d.m.queues["b"].jobs
    assert not table._frozen, f"{sum(len(f.kept) for f in table._frozen)} rows kept for nobody"


def test_a_lane_forgets_the_priorities_it_no_longer_holds() -> None:
    """``Lane.last`` is soft state for the FIFOs a lane has: with priorities
    that keep changing (a deadline as the priority), it must not grow with
    every priority ever seen."""
    d = Driver()
    for priority in range(200):
        d.enqueue(priority=priority)
        for job in d.lease():
            d.ack(job)
    lane = d.m.queues["q"].lanes[""]
    assert len(lane.last) <= jobs.MAX_FIFO_PRIORITIES, f"{len(lane.last)} priorities remembered"


def test_an_enqueue_mixing_both_forms_counts_each_compact_job_ready_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Heaps are sized by ``counts[READY] - jobs.compact`` (``push_ready``,
    ``note_ready``): within one enqueue, a job the compact form took is
    counted READY before the next job is indexed, so a grouped or expiring
    job after many plain ones finds the count right (else its heaps were
    rebuilt, and its token bumped, for nothing)."""
    seen: list[int] = []
    note_ready = jobs.QueueState.note_ready

    def checked(self: jobs.QueueState, job: jobs.Job) -> None:
        seen.append(self.counts[jobs.READY] - self.jobs.compact)
        note_ready(self, job)

    monkeypatch.setattr(jobs.QueueState, "note_ready", checked)
    d = Driver(lifecycle=True)
    specs = [pb.JobSpec(payload=b"x") for _ in range(40)]
    specs += [
        pb.JobSpec(payload=b"g", group="g"),
        pb.JobSpec(payload=b"e", expires_at_ms=d.now + 9),
    ]
    d.ok(enqueue=pb.EnqueueBatchRequest(queue="q", jobs=specs))
    assert seen == [1, 2]  # each object job, counted itself, and none of the 40 rows
    grouped = d.m.queues["q"].jobs[41]
    alone = Driver(lifecycle=True)
    alone.ok(enqueue=pb.EnqueueBatchRequest(queue="q", jobs=specs[40:41]))
    assert grouped.token == alone.m.queues["q"].jobs[1].token  # pushed once, not rebuilt


def test_a_frozen_head_is_the_state_when_frozen_whatever_changes_in_place() -> None:
    """The head is copied at the freeze and serialized later (on another
    thread, in a node): a schedule's tick mark, a record's errors, the
    counters, a lane's clock and a dedup key changed after the freeze do
    not reach the view."""
    d = Driver(lifecycle=True)
    d.create()
    d.ok(
        put_schedule=pb.PutScheduleRequest(
            schedule=pb.Schedule(queue="q", name="s", cron="* * * * *", job=pb.JobSpec())
        )
    )
    d.enqueue(idempotency_key="k")
    [job] = d.lease()
    d.nack(job, delay_ms=0)  # an error in its history: a full Job, not packable
    d.enqueue()
    expected = snapshot_bytes(d.m)
    view = freeze(d.m)
    d.now += 60_000
    tick = logpb.ScheduleTick(queue="q", name="s", tick_ms=d.now - d.now % 60_000)
    assert not d.ok(schedule_tick=tick).skip  # the mark moved, a job was made
    for leased in d.lease(n=5):
        d.ack(leased)
    d.enqueue(idempotency_key="k2")
    assert view.head_bytes() + b"".join(view.chunks(b"")) == expected
    assert b"".join(freeze(d.m).chunks()) == snapshot_bytes(d.m)
