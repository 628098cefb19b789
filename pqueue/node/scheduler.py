"""The leader's cron loop: propose each schedule's ticks as they come due.

Every round (at most ``poll_ms`` apart, sooner when a tick is due sooner)
the leader reads every unpaused schedule from the applied state, computes
the ticks owed after its mark (``pqueue.node.cron.due_ticks``: the missed
ones by the schedule's policy) up to its own clock, and proposes them as
``ScheduleTick`` commands, in order, awaiting them all before the next
round. The machine applies a tick only if it is after the schedule's mark,
so a tick proposed twice (by a leader that had not yet applied the first,
or by two leaders across a failover) makes one job, and a new leader
simply starts from the mark it applied. Followers do nothing.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from typing import TYPE_CHECKING

from pqueue.errors import PQueueError
from pqueue.node.cron import MISSED_GRACE_MS, Cron, compile_cron, due_ticks, mark
from pqueue.v1 import log_pb2 as logpb
from pqueue.v1 import queue_pb2 as pb
from pqueue.wire.logs import describe

if TYPE_CHECKING:
    from pqueue.node.queue_node import QueueNode

logger = logging.getLogger(__name__)

#: The longest wait between rounds (a new or resumed schedule is seen by then).
POLL_MS = 200
#: The shortest: rounds never run back to back.
MIN_WAIT_MS = 10
#: Ticks proposed in one round at most (the rest go in the next).
MAX_ROUND_TICKS = 1_000

#: Outcomes counted per queue (``pq_schedule_ticks``).
ENQUEUED, SKIPPED = "enqueued", "skipped"

_Key = tuple[str, str]


class Scheduler:
    """Proposes the ticks of every schedule while ``node`` leads."""

    def __init__(
        self, node: QueueNode, poll_ms: int = POLL_MS, grace_ms: int = MISSED_GRACE_MS
    ) -> None:
        self.node = node
        self.poll_ms = poll_ms
        self.grace_ms = grace_ms
        #: (stored queue name, outcome) -> ticks this node applied while it
        #: led: a job enqueued, or the tick recorded without one.
        self.ticks: Counter[tuple[str, str]] = Counter()
        #: (queue, name) -> ((cron, timezone, mark), first tick after the mark).
        self._next: dict[_Key, tuple[tuple[str, str, int], int | None]] = {}
        #: Schedules whose cron no longer parses here, logged once each.
        self._bad: set[_Key] = set()
        #: Schedules catching up after missed ticks (logged once).
        self._late: set[_Key] = set()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="pq-scheduler")
        self._task.add_done_callback(self._on_done)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task])
            self._task = None

    def _on_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and (exc := task.exception()) is not None:
            logger.error("scheduler failed: %s", describe(exc), exc_info=exc)

    async def _loop(self) -> None:
        while True:
            wait_ms = self.poll_ms
            if self.node.log.is_leader and not self.node.draining:
                wait_ms = await self.round()
            await asyncio.sleep(max(MIN_WAIT_MS, min(wait_ms, self.poll_ms)) / 1000)

    async def round(self) -> int:
        """Propose what is due now and wait for it; how long until the next
        tick comes due (ms)."""
        now = self.node.clock_ms()
        ticks, next_due = self.plan(now)
        if ticks:
            if not await self._propose(ticks):
                return self.poll_ms  # refused whole (an upgrade under way): not a spin
            return 0  # the marks moved: look again at once
        return self.poll_ms if next_due is None else next_due - now

    def plan(self, now: int) -> tuple[list[logpb.ScheduleTick], int | None]:
        """The ticks owed at ``now``, each schedule's in order; and the
        earliest time a schedule not due now comes due (None: none)."""
        ticks: list[logpb.ScheduleTick] = []
        next_due: int | None = None
        live: set[_Key] = set()
        for schedule in self.node.machine.all_schedules():
            key = (schedule.queue, schedule.name)
            live.add(key)
            if schedule.paused:
                continue
            cron = self._cron(key, schedule)
            if cron is None:
                continue
            first = self._first_after(key, cron, schedule)
            if first is None:
                continue
            if first > now or len(ticks) >= MAX_ROUND_TICKS:
                next_due = first if next_due is None else min(next_due, first)
                continue
            due = due_ticks(cron, mark(schedule), now, schedule.missed, self.grace_ms)
            late = now - self.grace_ms
            if not (due and due[0].tick_ms < late):
                self._late.discard(key)
            elif key not in self._late:  # once per catch-up (a tick a round)
                self._late.add(key)
                logger.info(
                    "schedule %s/%s: ticks missed (no leader to propose them) from %d ms ago; "
                    "policy %s",
                    schedule.queue,
                    schedule.name,
                    now - first,
                    pb.MissedTicks.Name(schedule.missed),
                )
            # One tick of a schedule per round, the next once it applied: two
            # in flight could land in two slots, and a failover that fills
            # the first with a no-op would let the second skip it for good.
            ticks += [
                logpb.ScheduleTick(
                    queue=schedule.queue, name=schedule.name, tick_ms=d.tick_ms, skip=d.skip
                )
                for d in due[:1]
            ]
        for key in self._next.keys() - live:
            del self._next[key]
        self._bad &= live
        self._late &= live
        return ticks, next_due

    def _cron(self, key: _Key, schedule: pb.Schedule) -> Cron | None:
        try:
            return compile_cron(schedule.cron, schedule.timezone)
        except PQueueError as exc:  # checked when put: only a change of release could do it
            if key not in self._bad:
                self._bad.add(key)
                logger.error(
                    "schedule %s/%s is not run: %s", schedule.queue, schedule.name, describe(exc)
                )
            return None

    def _first_after(self, key: _Key, cron: Cron, schedule: pb.Schedule) -> int | None:
        """The schedule's first tick after its mark (kept until the mark or
        the timing changes: most rounds compute nothing)."""
        state = (schedule.cron, schedule.timezone, mark(schedule))
        known = self._next.get(key)
        if known is not None and known[0] == state:
            return known[1]
        first = cron.next_after(state[2])
        self._next[key] = (state, first)
        return first

    async def _propose(self, ticks: list[logpb.ScheduleTick]) -> bool:
        """Propose ``ticks`` in order and wait for every one; False when
        they could not be proposed at all."""
        commands = [logpb.Command(schedule_tick=t) for t in ticks]
        try:
            for command in commands:
                self.node.prepare(command)
        except PQueueError as exc:  # a member lacks the feature (an upgrade under way)
            logger.debug("schedule ticks not proposed: %s", describe(exc))
            return False
        for tick, future in zip(ticks, self.node.propose_many(commands), strict=True):
            try:
                result, _ = await future
            except PQueueError as exc:  # lost the lead, draining: the next leader goes on
                logger.debug("schedule tick not committed: %s", describe(exc))
                continue
            if not isinstance(result, logpb.ScheduleTick):
                logger.warning(
                    "schedule %s/%s: tick %d refused: %s",
                    tick.queue,
                    tick.name,
                    tick.tick_ms,
                    describe(result) if isinstance(result, BaseException) else result,
                )
                continue
            if not result.queue:
                continue  # not owed any more (applied already, paused, deleted)
            self.ticks[result.queue, SKIPPED if result.skip else ENQUEUED] += 1
            if result.skip and not tick.skip:
                logger.warning(
                    "schedule %s/%s: tick %d made no job: the queue refuses the schedule's "
                    "job now (its bounds changed?) or another job holds the tick's key",
                    tick.queue,
                    tick.name,
                    tick.tick_ms,
                )
        return True
