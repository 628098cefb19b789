"""Cron schedules in the state machine: put, replace, delete, pause, and the
idempotent ``ScheduleTick`` (docs/semantics.md "Cron schedules")."""

from __future__ import annotations

from typing import Any

import pytest

from pqueue.core import features
from pqueue.core.schedules import MAX_SCHEDULES, tick_key
from pqueue.core.snapshot import restore, snapshot_bytes, state_hash
from pqueue.errors import (
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
)
from pqueue.v1 import log_pb2 as logpb
from pqueue.v1 import queue_pb2 as pb
from tests.machine_driver import Driver

T0 = 1_000_000


def put(d: Driver, name: str = "s", queue: str = "q", **fields: Any) -> Any:
    fields.setdefault("cron", "* * * * *")
    fields.setdefault("job", pb.JobSpec(payload=b"tick", priority=2))
    return d.run(
        put_schedule=pb.PutScheduleRequest(schedule=pb.Schedule(queue=queue, name=name, **fields))
    )


def tick(d: Driver, tick_ms: int, name: str = "s", queue: str = "q", skip: bool = False) -> Any:
    return d.ok(
        schedule_tick=logpb.ScheduleTick(queue=queue, name=name, tick_ms=tick_ms, skip=skip)
    )


def pause(d: Driver, paused: bool, name: str = "s", queue: str = "q") -> Any:
    return d.run(pause_schedule=pb.PauseScheduleRequest(queue=queue, name=name, paused=paused))


def jobs(d: Driver, queue: str = "q") -> list[pb.Job]:
    q = d.m.queues[queue]
    return [q.jobs[i].to_proto() for i in sorted(q.jobs)]


@pytest.fixture
def d() -> Driver:
    d = Driver(now=T0, lifecycle=True)
    d.create("q", max_priority=5)
    return d


def test_put_creates_a_schedule_counted_from_now(d: Driver) -> None:
    r = put(d, timezone="Europe/Paris", missed=pb.MISSED_TICKS_ALL)
    assert isinstance(r, pb.PutScheduleResponse)
    assert r.created
    s = r.schedule
    assert (s.queue, s.name, s.cron, s.timezone, s.missed) == (
        "q",
        "s",
        "* * * * *",
        "Europe/Paris",
        pb.MISSED_TICKS_ALL,
    )
    assert (s.created_at_ms, s.last_tick_ms, s.next_tick_ms) == (T0, 0, 0)
    assert s.job == pb.JobSpec(payload=b"tick", priority=2)
    assert d.m.list_schedules(["q"]) == [s]


def test_put_needs_the_lifecycle_feature() -> None:
    cmd = logpb.Command(put_schedule=pb.PutScheduleRequest(schedule=pb.Schedule(queue="q")))
    assert features.LIFECYCLE in features.required_by([cmd])


def test_a_tick_enqueues_the_job_keyed_by_its_tick(d: Driver) -> None:
    put(d)
    d.now += 60_000
    r = tick(d, T0 + 60_000)
    assert r == logpb.ScheduleTick(queue="q", name="s", tick_ms=T0 + 60_000)
    [job] = jobs(d)
    assert (job.payload, job.priority, job.idempotency_key) == (
        b"tick",
        2,
        tick_key("s", T0 + 60_000),
    )
    assert job.idempotency_key == f"schedule:s:{T0 + 60_000}"
    assert d.m.queues["q"].schedules["s"].last_tick_ms == T0 + 60_000
    assert d.m.queues["q"].counters.enqueued == 1


def test_a_tick_is_applied_once_and_in_order(d: Driver) -> None:
    put(d)
    d.now = T0 + 10_000
    tick(d, T0 + 5_000)
    before = d.state()
    for stale in (T0 + 5_000, T0 + 4_000, T0, T0 - 1):  # duplicate, older, at/before creation
        assert tick(d, stale) == logpb.ScheduleTick()
        assert d.state() == before
    assert tick(d, T0 + 10_001) == logpb.ScheduleTick()  # after the entry's time: not yet due
    assert d.state() == before
    assert len(jobs(d)) == 1


def test_ticks_of_a_missing_or_paused_schedule_change_nothing(d: Driver) -> None:
    put(d)
    d.now += 5_000
    before = d.state()
    for queue, name in (("q", "other"), ("nope", "s")):
        assert tick(d, T0 + 1_000, name=name, queue=queue) == logpb.ScheduleTick()
    pause(d, True)
    before = d.state()
    assert tick(d, T0 + 1_000) == logpb.ScheduleTick()
    assert tick(d, T0 + 1_000, skip=True) == logpb.ScheduleTick()
    assert d.state() == before
    assert jobs(d) == []


def test_a_skip_tick_records_the_tick_without_a_job(d: Driver) -> None:
    put(d)
    d.now += 10_000
    r = tick(d, T0 + 3_000, skip=True)
    assert r == logpb.ScheduleTick(queue="q", name="s", tick_ms=T0 + 3_000, skip=True)
    assert jobs(d) == []
    assert d.m.queues["q"].schedules["s"].last_tick_ms == T0 + 3_000
    assert tick(d, T0 + 2_000) == logpb.ScheduleTick()  # covered by the skip


def test_a_job_the_queue_no_longer_takes_is_skipped_and_the_tick_recorded(d: Driver) -> None:
    put(d, job=pb.JobSpec(payload=b"x" * 100))
    d.m.queues["q"].config.max_payload_bytes = 10  # as an UpdateQueue would
    d.now += 2_000
    r = tick(d, T0 + 1_000)
    assert r.skip
    assert jobs(d) == []
    assert d.m.queues["q"].schedules["s"].last_tick_ms == T0 + 1_000


def test_a_tick_key_taken_by_another_job_makes_no_twin(d: Driver) -> None:
    put(d)
    d.enqueue("q", b"by hand", idempotency_key=tick_key("s", T0 + 1_000))
    d.now += 2_000
    assert tick(d, T0 + 1_000).skip
    assert len(jobs(d)) == 1


def test_the_job_is_the_queue_owners(d: Driver) -> None:
    d.create("acme/q")
    put(d, queue="acme/q")
    d.now += 2_000
    tick(d, T0 + 1_000, queue="acme/q")
    [job] = jobs(d, "acme/q")
    assert job.tenant == "acme"


def test_replace_keeps_the_ticks_unless_the_timing_changes(d: Driver) -> None:
    put(d)
    d.now = T0 + 60_000
    tick(d, T0 + 60_000)
    d.now = T0 + 90_000
    r = put(d, job=pb.JobSpec(payload=b"new"), missed=pb.MISSED_TICKS_SKIP)
    assert not r.created
    assert (r.schedule.created_at_ms, r.schedule.last_tick_ms) == (T0, T0 + 60_000)
    assert r.schedule.job.payload == b"new"
    d.now = T0 + 100_000
    r = put(d, cron="*/5 * * * *")
    assert (r.schedule.created_at_ms, r.schedule.last_tick_ms) == (T0, T0 + 100_000)
    assert tick(d, T0 + 99_000) == logpb.ScheduleTick()  # the old timing's tick: not owed
    d.now = T0 + 110_000
    r = put(d, cron="*/5 * * * *", timezone="Asia/Tokyo")
    assert r.schedule.last_tick_ms == T0 + 110_000


def test_pause_and_resume_skip_the_ticks_that_fell_meanwhile(d: Driver) -> None:
    put(d)
    d.now = T0 + 10_000
    r = pause(d, True)
    assert isinstance(r, pb.PauseScheduleResponse)
    assert r.schedule.paused
    assert r.schedule.last_tick_ms == 0
    d.now = T0 + 20_000
    assert pause(d, True).schedule.last_tick_ms == 0  # pausing again changes nothing
    r = pause(d, False)
    assert not r.schedule.paused
    assert r.schedule.last_tick_ms == T0 + 20_000
    assert tick(d, T0 + 15_000) == logpb.ScheduleTick()
    d.now = T0 + 30_000
    assert pause(d, False).schedule.last_tick_ms == T0 + 20_000  # resuming again: nothing
    assert tick(d, T0 + 25_000).tick_ms == T0 + 25_000


def test_put_paused_then_resumed_by_a_put(d: Driver) -> None:
    assert put(d, paused=True).schedule.paused
    d.now = T0 + 5_000
    r = put(d)
    assert not r.schedule.paused
    assert r.schedule.last_tick_ms == T0 + 5_000


def test_delete(d: Driver) -> None:
    put(d)
    put(d, name="t")
    assert d.ok(delete_schedule=pb.DeleteScheduleRequest(queue="q", name="s")) == (
        pb.DeleteScheduleResponse()
    )
    assert [s.name for s in d.m.list_schedules(["q"])] == ["t"]
    d.now += 5_000
    assert tick(d, T0 + 1_000) == logpb.ScheduleTick()
    r = d.run(delete_schedule=pb.DeleteScheduleRequest(queue="q", name="s"))
    assert isinstance(r, NotFoundError)
    assert "'s'" in r.message


def test_deleting_the_queue_deletes_its_schedules(d: Driver) -> None:
    put(d)
    d.ok(delete_queue=pb.DeleteQueueRequest(queue="q"))
    d.create("q", max_priority=5)
    assert d.m.list_schedules(["q"]) == []


def test_an_idle_queue_with_a_schedule_stays_until_the_schedule_goes(d: Driver) -> None:
    d.create("idle", delete_when_idle=True)
    put(d, queue="idle")
    d.now += 2_000
    tick(d, T0 + 1_000, queue="idle")
    [job] = d.lease("idle")
    d.ack(job, queue="idle")
    d.now += 10 * 60_000  # past the dedup window: the tick's key is forgotten
    d.tick()
    assert "idle" in d.m.queues
    d.ok(delete_schedule=pb.DeleteScheduleRequest(queue="idle", name="s"))
    assert "idle" not in d.m.queues


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"queue": ""}, "schedule.queue"),
        ({"queue": "bad name"}, "schedule.queue"),
        ({"name": ""}, "schedule.name"),
        ({"name": "a/b"}, "schedule.name"),
        ({"name": "x" * 200}, "schedule.name"),
        ({"cron": "  "}, "schedule.cron"),
        ({"cron": "*" * 300}, "schedule.cron"),
        ({"timezone": "Z" * 100}, "schedule.timezone"),
        ({"missed": 7}, "schedule.missed"),
        ({"job": pb.JobSpec(delay_ms=5)}, "schedule.job.delay_ms"),
        ({"job": pb.JobSpec(not_before_ms=5)}, "schedule.job.not_before_ms"),
        ({"job": pb.JobSpec(idempotency_key="k")}, "schedule.job.idempotency_key"),
        ({"job": pb.JobSpec(expires_at_ms=5)}, "schedule.job.expires_at_ms"),
        ({"job": pb.JobSpec(priority=9)}, "schedule.job.priority"),
        ({"job": pb.JobSpec(group="g" * 300)}, "schedule.job.group"),
    ],
)
def test_refusals_name_the_field_and_change_nothing(
    d: Driver, fields: dict[str, Any], field: str
) -> None:
    before = d.state()
    queue = fields.pop("queue", "q")
    name = fields.pop("name", "s")
    r = put(d, name=name, queue=queue, **fields)
    assert isinstance(r, InvalidArgumentError), r
    assert r.field == field
    assert d.state() == before


def test_a_schedule_needs_its_queue(d: Driver) -> None:
    r = put(d, queue="nope")
    assert isinstance(r, NotFoundError)
    assert "nope" not in d.m.queues
    for cmd in (
        {"delete_schedule": pb.DeleteScheduleRequest(queue="nope", name="s")},
        {"pause_schedule": pb.PauseScheduleRequest(queue="nope", name="s")},
        {"pause_schedule": pb.PauseScheduleRequest(queue="q", name="s")},
    ):
        assert isinstance(d.run(**cmd), NotFoundError)
    r = d.run(pause_schedule=pb.PauseScheduleRequest(queue="q", name="a/b"))
    assert isinstance(r, InvalidArgumentError)
    assert r.field == "name"


def test_the_cluster_holds_a_bounded_number_of_schedules(
    d: Driver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("pqueue.core.schedules.MAX_SCHEDULES", 2)
    put(d, name="a")
    put(d, name="b")
    assert isinstance(put(d, name="c"), ResourceExhaustedError)
    assert put(d, name="b", cron="@daily").schedule.cron == "@daily"  # a replace still goes
    assert MAX_SCHEDULES == 10_000


def test_a_tick_job_is_enqueued_as_an_enqueue_would_be(d: Driver) -> None:
    """The tick goes through the enqueue command: a stamped caller that may
    not produce here is refused, and the tick recorded as skipped."""
    put(d)
    d.now += 2_000
    r = d.ok(
        schedule_tick=logpb.ScheduleTick(queue="q", name="s", tick_ms=T0 + 1_000),
        caller=logpb.Caller(tenant="intruder"),
    )
    assert r.skip
    assert jobs(d) == []
    # Unstamped (as the leader proposes it), the owner produces.
    assert not tick(d, T0 + 1_500).skip


def test_snapshot_round_trip_keeps_schedules(d: Driver) -> None:
    put(d, timezone="UTC", missed=pb.MISSED_TICKS_ALL)
    put(d, name="t", paused=True, cron="*/2 * * * * *")
    d.now += 3_000
    tick(d, T0 + 2_000)
    restored = restore(snapshot_bytes(d.m))
    assert state_hash(restored) == state_hash(d.m)
    assert restored.list_schedules() == d.m.list_schedules()
    # ...and it goes on as the original does.
    d2 = Driver(restored, now=d.now)
    for each in (d, d2):
        assert tick(each, T0 + 2_000) == logpb.ScheduleTick()
        assert tick(each, T0 + 3_000).tick_ms == T0 + 3_000
    assert state_hash(restored) == state_hash(d.m)


def test_list_schedules(d: Driver) -> None:
    d.create("a")
    put(d, name="z")
    put(d, name="b")
    put(d, name="x", queue="a")
    assert [(s.queue, s.name) for s in d.m.list_schedules()] == [
        ("a", "x"),
        ("q", "b"),
        ("q", "z"),
    ]
    assert [s.name for s in d.m.list_schedules(["q"])] == ["b", "z"]
    with pytest.raises(NotFoundError):
        d.m.list_schedules(["nope"])
    listed = d.m.list_schedules(["q"])[0]
    listed.paused = True  # a copy: the machine's is untouched
    assert not d.m.queues["q"].schedules["b"].paused


def test_a_tick_names_no_job_for_events_though_it_enqueues_one(d: Driver) -> None:
    """``Effects.named`` is the enqueue's own; a tick enqueues through the
    same handler and must not leave its jobs named as the tick's."""
    put(d)
    d.now += 60_000
    tick_ms = T0 + 60_000
    command = logpb.Command(schedule_tick=logpb.ScheduleTick(queue="q", name="s", tick_ms=tick_ms))
    entry = logpb.LogEntry(index=d.m.applied_index + 1, time_ms=d.now, commands=[command])
    effects = d.m.apply_entry(entry)
    assert len(jobs(d)) == 1
    assert effects.named == (None,)
