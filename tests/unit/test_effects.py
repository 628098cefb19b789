"""``apply_entry`` reports what an entry did (``Effects``), with no side channel."""

from __future__ import annotations

from pqueue.core.effects import Effects
from pqueue.core.snapshot import snapshot_bytes
from pqueue.v1 import log_pb2 as logpb
from pqueue.v1 import queue_pb2 as pb
from tests.machine_driver import Driver


def _apply(d: Driver, *commands: logpb.Command, advance_ms: int = 0) -> Effects:
    d.now += advance_ms
    entry = logpb.LogEntry(index=d.m.applied_index + 1, time_ms=d.now, commands=commands)
    return d.m.apply_entry(entry)


def _enqueue(queue: str, n: int, **spec: object) -> logpb.Command:
    jobs = [pb.JobSpec(payload=b"x", **spec) for _ in range(n)]  # type: ignore[arg-type]
    return logpb.Command(enqueue=pb.EnqueueBatchRequest(queue=queue, jobs=jobs))


def test_enqueue_reports_its_queue_woken_with_the_count_and_the_new_ids() -> None:
    d = Driver()
    d.create("a")
    d.create("b")
    eff = _apply(d, _enqueue("a", 3), _enqueue("b", 1))
    assert eff.index == d.m.applied_index
    assert len(eff.results) == 2
    assert eff.woken == {"a": 3, "b": 1}
    ids = {r.job_id for res in eff.results for r in res.results}  # type: ignore[union-attr]
    assert eff.changed == ids
    assert len(ids) == 4


def test_delayed_jobs_wake_nobody_until_due_then_the_entry_that_promotes_them() -> None:
    d = Driver()
    d.create("q")
    eff = _apply(d, _enqueue("q", 2, delay_ms=1_000))
    assert eff.woken == {}
    assert len(eff.changed) == 2
    later = _apply(d, advance_ms=1_000)  # an empty entry advances time
    assert later.results == []
    assert later.woken == {"q": 2}
    assert later.changed == eff.changed


def test_ack_reports_changed_ids_and_wakes_nobody() -> None:
    d = Driver()
    d.create("q")
    first = d.enqueue()
    d.enqueue()
    job = d.lease()[0]
    assert job.job_id == first
    leases = [pb.JobLease(job_id=job.job_id, lease_id=job.lease_id)]
    eff = _apply(d, logpb.Command(ack=pb.AckRequest(queue="q", leases=leases)))
    assert eff.changed == {first}
    assert eff.touched == {"q"}  # where the mirror finds them
    assert eff.woken == {}
    assert d.m.find_job(first) is None  # removed: the mirror deletes its row


def test_a_failed_command_changes_nothing_and_each_entry_reports_only_its_own() -> None:
    d = Driver()
    d.create("q")
    _apply(d, _enqueue("q", 1))
    eff = _apply(d, logpb.Command(nack=pb.NackRequest(queue="q", job_id=99, lease_id=99)))
    assert isinstance(eff.results[0], Exception)
    assert eff.woken == {}
    assert eff.changed == frozenset()


def test_expired_lease_wakes_its_queue_and_reports_the_job() -> None:
    d = Driver()
    d.create("q", max_attempts=5)
    job_id = d.enqueue()
    d.lease(lease_ms=100)
    eff = _apply(d, advance_ms=100)
    assert eff.woken == {"q": 1}
    assert eff.changed == {job_id}


def test_effects_leave_no_trace_in_the_snapshot() -> None:
    a, b = Driver(), Driver()
    for d in (a, b):
        d.create("q")
        d.enqueue()
    _apply(a)  # a's effects are taken; b's too, but never looked at
    _apply(b)
    assert snapshot_bytes(a.m) == snapshot_bytes(b.m)
