"""Watch events derived from applied entries (pqueue.core.events) and the
node's ring of recent ones (pqueue.node.watch)."""

from __future__ import annotations

import gc
from typing import Any

import pytest

from pqueue.core import events
from pqueue.core.machine import QueueMachine
from pqueue.errors import FailedPreconditionError, ResourceExhaustedError, UnavailableError
from pqueue.node.watch import Watchers
from pqueue.v1 import log_pb2 as logpb
from pqueue.v1 import queue_pb2 as pb
from tests.machine_driver import Driver

E = pb.WatchEvent


class Recording(QueueMachine):
    """A machine that keeps the events of every entry it applies."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[events.Event] = []

    def apply_entry(self, entry: logpb.LogEntry, respond: bool = True) -> Any:
        effects = super().apply_entry(entry, respond)
        self.events.extend(map(events.as_event, events.derive(entry, effects, self)))
        return effects


def driver(lifecycle: bool = True) -> tuple[Driver, Recording]:
    machine = Recording()
    return Driver(machine, lifecycle=lifecycle), machine


def kinds(machine: Recording) -> list[tuple[str, int, int]]:
    out = [(E.Kind.Name(e.kind), e.job_id, e.log_index) for e in machine.events]  # type: ignore[arg-type]
    machine.events.clear()
    return out


def test_a_job_life_in_events() -> None:
    d, m = driver()
    job_id = d.enqueue()
    index = m.applied_index
    assert kinds(m) == [("ENQUEUED", job_id, index)]
    [leased] = d.lease(lease_ms=1000)
    assert kinds(m) == [("LEASED", job_id, index + 1)]
    d.nack(leased, reason="boom", delay_ms=0)
    [event] = m.events
    assert (event.kind, event.state, event.attempt, event.reason) == (
        E.NACKED,
        pb.JOB_STATE_READY,
        1,
        "boom",
    )
    m.events.clear()
    [leased] = d.lease(lease_ms=1000)
    d.run(
        ack=pb.AckRequest(
            queue="q", leases=[pb.JobLease(job_id=job_id, lease_id=leased.lease_id, result=b"ok!")]
        )
    )
    done = m.events[-1]
    assert (done.kind, done.state, done.result_bytes, done.time_ms) == (
        E.COMPLETED,
        pb.JOB_STATE_COMPLETED,
        3,
        d.now,
    )


def test_ack_without_records_still_says_completed() -> None:
    d, m = driver(lifecycle=False)
    job_id = d.enqueue()
    [leased] = d.lease()
    m.events.clear()
    d.ack(leased)
    assert kinds(m) == [("COMPLETED", job_id, m.applied_index)]


def test_refused_commands_and_duplicates_have_no_events() -> None:
    d, m = driver()
    d.enqueue(idempotency_key="k")
    m.events.clear()
    d.enqueue(idempotency_key="k")  # a duplicate: the same job, nothing new
    d.run(ack=pb.AckRequest(queue="q", leases=[pb.JobLease(job_id=99, lease_id=1)]))
    assert kinds(m) == []


def test_expired_lease_nacks_then_kills() -> None:
    d, m = driver()
    d.create(max_attempts=2)
    job_id = d.enqueue()
    d.lease(lease_ms=1000)
    m.events.clear()
    d.tick(advance_ms=1000)
    [nacked] = m.events
    assert (nacked.kind, nacked.reason, nacked.log_index) == (
        E.NACKED,
        "lease expired",
        m.applied_index,
    )
    d.lease(lease_ms=1000)
    m.events.clear()
    d.tick(advance_ms=1000)
    assert kinds(m) == [("DEAD", job_id, m.applied_index)]


def test_a_delayed_job_coming_due_has_no_event() -> None:
    d, m = driver()
    d.enqueue(delay_ms=100)
    d.create("other")
    m.events.clear()
    d.tick(advance_ms=100)
    assert kinds(m) == []
    assert m.ready_jobs() == 1


def test_a_schedule_tick_enqueues() -> None:
    d, m = driver()
    d.create()
    schedule = pb.Schedule(queue="q", name="s", cron="* * * * *", job=pb.JobSpec(payload=b"t"))
    d.ok(put_schedule=pb.PutScheduleRequest(schedule=schedule))
    d.now += 60_000
    m.events.clear()
    d.ok(schedule_tick=logpb.ScheduleTick(queue="q", name="s", tick_ms=d.now))
    [(kind, job_id, index)] = kinds(m)
    assert kind == "ENQUEUED"
    assert job_id
    assert index == m.applied_index


def test_ttl_expiry_and_job_actions() -> None:
    d, m = driver()
    doomed = d.enqueue(expires_at_ms=d.now + 500)
    kept = d.enqueue(priority=5)
    m.events.clear()
    d.tick(advance_ms=500)
    assert kinds(m) == [("EXPIRED", doomed, m.applied_index)]
    d.ok(requeue_job=pb.RequeueJobRequest(queue="q", job_id=doomed))
    d.ok(reprioritize_job=pb.ReprioritizeJobRequest(queue="q", job_id=kept, priority=1))
    d.ok(cancel_job=pb.CancelJobRequest(queue="q", job_id=kept))
    d.ok(complete_job=pb.CompleteJobRequest(queue="q", job_id=doomed, result=b"r"))
    got = [k for k, _, _ in kinds(m)]
    assert got == ["REQUEUED", "REPRIORITIZED", "CANCELLED", "COMPLETED"]


def test_redrive_requeues_and_queue_events() -> None:
    d, m = driver()
    d.create(max_attempts=1)
    job_id = d.enqueue()
    [leased] = d.lease()
    d.nack(leased)
    assert kinds(m)[-1][0] == "DEAD"
    d.ok(redrive=pb.RedriveRequest(queue="q"))
    d.ok(pause_queue=pb.PauseQueueRequest(queue="q"))
    d.ok(resume_queue=pb.ResumeQueueRequest(queue="q"))
    d.ok(delete_queue=pb.DeleteQueueRequest(queue="q"))
    got = kinds(m)
    assert got[0][:2] == ("REQUEUED", job_id)
    assert [k for k, _, _ in got[1:]] == ["QUEUE_PAUSED", "QUEUE_RESUMED", "QUEUE_DELETED"]


def test_replicas_derive_the_same_events() -> None:
    a, ma = driver()
    b, mb = driver()
    for d in (a, b):
        d.create(max_attempts=2)
        for i in range(5):
            d.enqueue(priority=i)
        d.lease(n=3, lease_ms=100)
        d.tick(advance_ms=100)
        d.lease(n=5, lease_ms=100)
    assert ma.events == mb.events
    assert len(ma.events) > 10


def ev(index: int, queue: str = "q", job_id: int = 1) -> events.Row:
    """An event as ``derive`` gives it, a plain tuple (watchers get ``Event``s)."""
    return (index, 0, queue, job_id, E.ENQUEUED, 0, 0, 0, 0, "")


def test_the_ring_leaves_the_cyclic_collectors_scans() -> None:
    """What the ring keeps is plain tuples of atoms: after a few collections
    the collector no longer tracks them (a ``NamedTuple`` it would track for
    life, and a list too)."""
    w = Watchers()
    for index in range(1, 4):
        w.publish(index, [ev(index), ev(index, job_id=2)])
    gc.collect()
    assert w.covered_after == 0
    sub = w.subscribe(lambda e: True, 0)  # replayed from the ring as Events
    assert [(e.log_index, e.job_id) for e in sub.take()] == [
        (i, j) for i in (1, 2, 3) for j in (1, 2)
    ]
    for _ in range(3):  # a collection untracks one level of tuples
        gc.collect()
    assert not any(gc.is_tracked(kept) for kept in w._ring)


def test_ring_resumes_and_refuses_what_it_dropped() -> None:
    w = Watchers(ring_events=3, buffer=10)
    w.reset(10)
    for index in range(11, 16):
        w.publish(index, [ev(index)])
    assert w.covered_after == 12
    with pytest.raises(FailedPreconditionError, match="oldest it can resume from is 12"):
        w.subscribe(lambda e: True, 11)
    sub = w.subscribe(lambda e: True, 13)
    assert [e.log_index for e in sub.take()] == [14, 15]
    assert sub.resume_index == 15
    w.publish(16, [ev(16, queue="other"), ev(16)])
    sub_q = w.subscribe(lambda e: e.queue == "q", None)
    w.publish(17, [ev(17, queue="other")])
    assert sub_q.take() == []
    assert sub_q.resume_index == 17
    assert [e.log_index for e in sub.take()] == [16, 16, 17]


def test_slow_watcher_is_cut_off_with_its_resume_index() -> None:
    w = Watchers(ring_events=100, buffer=3)
    sub = w.subscribe(lambda e: True, None)
    w.publish(1, [ev(1)])
    sub.take()
    w.publish(2, [ev(2), ev(2)])
    w.publish(3, [ev(3), ev(3)])  # 4 unsent: over the bound
    assert w.subscriptions == {sub}  # publishing went on; the stream ends it
    assert isinstance(sub.error, ResourceExhaustedError)
    assert "from_index=1" in sub.error.message
    assert sub.ended.is_set()
    w.buffer = 10  # (a resume from the ring is held to the bound too)
    later = w.subscribe(lambda e: True, 1)  # resuming there misses nothing
    assert [e.log_index for e in later.take()] == [2, 2, 3, 3]
    w.reset(50)
    assert isinstance(later.error, UnavailableError)


def test_pq_watch_lines() -> None:
    from pqueue.cli.client import watch_line, watch_row

    event = E(
        log_index=7,
        time_ms=1_700_000_000_000,
        queue="q",
        job_id=3,
        kind=E.COMPLETED,
        state=pb.JOB_STATE_COMPLETED,
        attempt=1,
        result_bytes=5,
    )
    line = watch_line(watch_row(event))
    assert line == (
        "2023-11-14T22:13:20.000Z  #7  q  COMPLETED  job_id=3 state=completed attempt=1 "
        "priority=0 result_bytes=5"
    )
    stats = E(log_index=8, queue="q", kind=E.QUEUE_STATS, stats=pb.QueueStats(queue="q", ready=2))
    assert "QUEUE_STATS  ready=2 delayed=0" in watch_line(watch_row(stats))
