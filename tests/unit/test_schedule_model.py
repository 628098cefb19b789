"""Cron schedules in the state machine against a naive reference model
(hypothesis stateful test, beside tests/unit/test_machine_model.py).

The model reads docs/semantics.md "Cron schedules" plainly: a schedule's ticks are
counted from its mark (the later of its last tick and its creation); a tick
after the mark and not after the entry's time, on an unpaused schedule,
moves the mark and (unless it skips) enqueues the job keyed by its tick,
as an enqueue with that key would; anything else changes nothing. Replacing
the timing or resuming moves the mark to now. Puts, pauses, deletes, ticks
duplicated, late and early, enqueues colliding with a tick's key, queue
deletion and restores from snapshots are mixed at random; after every step
the machine's schedules and jobs must be the model's.
"""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from pqueue.core.schedules import tick_key
from pqueue.core.snapshot import restore, snapshot_bytes, state_hash
from pqueue.errors import InvalidArgumentError, NotFoundError, PQueueError
from pqueue.v1 import log_pb2 as logpb
from pqueue.v1 import queue_pb2 as pb
from tests.machine_driver import Driver

NAMES = ("a", "b")
CRONS = ("* * * * *", "*/5 * * * * *")
WINDOW_MS = 500
MAX_PRIORITY = 5


@dataclass
class MSchedule:
    cron: str
    timezone: str
    payload: bytes
    priority: int
    paused: bool
    created: int
    last: int = 0

    @property
    def mark(self) -> int:
        return max(self.last, self.created)


class Model:
    def __init__(self) -> None:
        self.schedules: dict[str, MSchedule] = {}
        #: job id -> (idempotency key, payload, priority)
        self.jobs: dict[int, tuple[str, bytes, int]] = {}
        #: key -> expiry
        self.dedup: dict[str, int] = {}

    def advance(self, now: int) -> None:
        self.dedup = {k: at for k, at in self.dedup.items() if at > now}

    def enqueue(self, job_id: int, key: str, payload: bytes, priority: int, now: int) -> bool:
        """Whether a new job was made (False: the key is taken)."""
        if key and key in self.dedup:
            return False
        self.jobs[job_id] = (key, payload, priority)
        if key:
            self.dedup[key] = now + WINDOW_MS
        return True


class SchedulesVsModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.d = Driver(now=1_000_000, lifecycle=True)
        self.model = Model()
        self.seen_ticks: list[int] = []

    @initialize()
    def setup(self) -> None:
        self._create()

    def _create(self) -> None:
        self.d.ok(
            create_queue=pb.CreateQueueRequest(
                queue="q",
                config=pb.QueueConfig(max_priority=MAX_PRIORITY, dedup_window_ms=WINDOW_MS),
            )
        )

    def _step(self, **command: object) -> object:
        self.model.advance(self.d.now)
        return self.d.run(**command)

    @rule(
        name=st.sampled_from(NAMES),
        cron=st.sampled_from(CRONS),
        timezone=st.sampled_from(["", "UTC"]),
        payload=st.sampled_from([b"x", b"y"]),
        priority=st.integers(0, MAX_PRIORITY + 1),
        paused=st.booleans(),
    )
    def put(
        self, name: str, cron: str, timezone: str, payload: bytes, priority: int, paused: bool
    ) -> None:
        schedule = pb.Schedule(
            queue="q",
            name=name,
            cron=cron,
            timezone=timezone,
            job=pb.JobSpec(payload=payload, priority=priority),
            paused=paused,
            last_tick_ms=123,  # read-only: ignored
        )
        r = self._step(put_schedule=pb.PutScheduleRequest(schedule=schedule))
        now = self.d.now
        if priority > MAX_PRIORITY:
            assert isinstance(r, InvalidArgumentError)
            assert r.field == "schedule.job.priority"
            return
        old = self.model.schedules.get(name)
        new = MSchedule(cron, timezone, payload, priority, paused, created=now)
        if old is not None:
            new.created, new.last = old.created, old.last
            if (old.cron, old.timezone) != (cron, timezone) or (old.paused and not paused):
                new.last = max(old.last, now)
        self.model.schedules[name] = new
        assert isinstance(r, pb.PutScheduleResponse)
        assert r.created == (old is None)
        assert (r.schedule.last_tick_ms, r.schedule.created_at_ms) == (new.last, new.created)

    @rule(name=st.sampled_from(NAMES))
    def delete(self, name: str) -> None:
        r = self._step(delete_schedule=pb.DeleteScheduleRequest(queue="q", name=name))
        if self.model.schedules.pop(name, None) is None:
            assert isinstance(r, NotFoundError)
        else:
            assert r == pb.DeleteScheduleResponse()

    @rule(name=st.sampled_from(NAMES), paused=st.booleans())
    def pause(self, name: str, paused: bool) -> None:
        r = self._step(pause_schedule=pb.PauseScheduleRequest(queue="q", name=name, paused=paused))
        s = self.model.schedules.get(name)
        if s is None:
            assert isinstance(r, NotFoundError)
            return
        if s.paused and not paused:
            s.last = max(s.last, self.d.now)
        s.paused = paused
        assert isinstance(r, pb.PauseScheduleResponse)
        assert r.schedule.paused == paused

    @rule(
        name=st.sampled_from(NAMES),
        from_mark=st.booleans(),
        delta=st.sampled_from([-1000, -100, -1, 0, 1, 100, 1000]),
        again=st.integers(0, 30),
        skip=st.booleans(),
    )
    def tick(self, name: str, from_mark: bool, delta: int, again: int, skip: bool) -> None:
        s = self.model.schedules.get(name)
        if again < len(self.seen_ticks) and again % 3 == 0:
            tick_ms = self.seen_ticks[again]  # one seen before: a duplicate, or a stale one
        elif from_mark and s is not None:
            tick_ms = s.mark + delta
        else:
            tick_ms = self.d.now + delta
        r = self._step(
            schedule_tick=logpb.ScheduleTick(queue="q", name=name, tick_ms=tick_ms, skip=skip)
        )
        next_id = self.d.m.next_job_id - 1  # the id a job made by this tick got
        if s is None or s.paused or tick_ms <= s.mark or tick_ms > self.d.now:
            assert r == logpb.ScheduleTick()
            return
        made = False
        if not skip:
            made = self.model.enqueue(
                next_id, tick_key(name, tick_ms), s.payload, s.priority, self.d.now
            )
        s.last = tick_ms
        self.seen_ticks.append(tick_ms)
        assert r == logpb.ScheduleTick(queue="q", name=name, tick_ms=tick_ms, skip=not made)

    @rule(which=st.integers(0, 30), plain=st.booleans())
    def enqueue_by_hand(self, which: int, plain: bool) -> None:
        """A producer's job, its key perhaps one a tick will use."""
        key = ""
        if not plain:
            name = NAMES[which % 2]
            recent = [t + 1 for t in self.seen_ticks[-5:]] or [self.d.now + 1]
            key = tick_key(name, recent[which % len(recent)])
        r = self._step(
            enqueue=pb.EnqueueBatchRequest(
                queue="q", jobs=[pb.JobSpec(payload=b"hand", idempotency_key=key)]
            )
        )
        assert isinstance(r, pb.EnqueueBatchResponse)
        made = self.model.enqueue(r.results[0].job_id, key, b"hand", 0, self.d.now)
        assert r.results[0].duplicate == (not made)

    @rule(ms=st.sampled_from([1, 99, 100, 400, 1000, 5000]))
    def advance(self, ms: int) -> None:
        self.d.now += ms
        self._step(tick=logpb.Tick())

    @rule()
    def delete_queue(self) -> None:
        r = self._step(delete_queue=pb.DeleteQueueRequest(queue="q"))
        assert not isinstance(r, PQueueError)
        self.model = Model()
        self._create()

    @rule()
    def snapshot_and_restore(self) -> None:
        before = state_hash(self.d.m)
        self.d.m = restore(snapshot_bytes(self.d.m))
        assert state_hash(self.d.m) == before

    @invariant()
    def same_schedules_and_jobs(self) -> None:
        got = {
            s.name: (
                s.cron,
                s.timezone,
                s.job.payload,
                s.job.priority,
                s.paused,
                s.created_at_ms,
                s.last_tick_ms,
                s.next_tick_ms,
            )
            for s in self.d.m.list_schedules(["q"])
        }
        want = {
            n: (s.cron, s.timezone, s.payload, s.priority, s.paused, s.created, s.last, 0)
            for n, s in self.model.schedules.items()
        }
        assert got == want
        q = self.d.m.queues["q"]
        jobs = {j.job_id: (j.idempotency_key, j.payload, j.priority) for j in q.jobs.values()}
        assert jobs == self.model.jobs
        assert q.counters.enqueued == len(self.model.jobs)


TestSchedulesVsModel = SchedulesVsModel.TestCase
TestSchedulesVsModel.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
