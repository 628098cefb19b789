"""Keeping a worker's leases alive: one timer for all the jobs it holds.

A worker holds a job from the moment it is leased (or pushed) until its
handler ends. Each held lease is extended every ``interval_s`` (a third of
the lease) while it is held. ``Heartbeats`` keeps the held leases in one
dict ordered by when each is next due (every lease has the same interval,
so a lease held or extended later is due later: insertion order is
deadline order) and one timer on the event loop for the first of them;
only an extension that falls due starts a task. A job that finishes
within a third of its lease (most do) costs a dict entry and its removal,
not a task created and cancelled.

An extension that fails with ``LeaseLostError`` marks the lease ``lost``
(the job is someone else's now) and stops extending it; any other failure
is logged and tried again at the next interval. Releasing a lease cancels
its extension if one is under way.

Imports only the kernel, the errors and the generated code (an SDK module).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from pqueue.errors import LeaseLostError, PQueueError
from pqueue.v1 import queue_pb2 as pb
from pqueue.wire.logs import describe

#: The worker's logger: one name to configure for everything a worker says.
logger = logging.getLogger("pqueue.worker")

#: Extends one held job's lease; raises ``LeaseLostError`` once it is lost.
Extend = Callable[[pb.LeasedJob], Awaitable[None]]


class Held:
    """One lease held: its job, whether it was lost, its extension under way."""

    __slots__ = ("extending", "job", "lost")

    def __init__(self, job: pb.LeasedJob) -> None:
        self.job = job
        #: An extension was refused: the lease expired, or another took the job.
        self.lost = False
        self.extending: asyncio.Task[None] | None = None


class Heartbeats:
    """The leases one worker holds, each extended every ``interval_s``."""

    def __init__(self, interval_s: float, extend: Extend) -> None:
        if interval_s <= 0:
            raise ValueError("interval_s must be positive")
        self.interval_s = interval_s
        self._extend = extend
        #: Held leases by when each is next due (loop time), earliest first.
        self._due: dict[Held, float] = {}
        self._timer: asyncio.TimerHandle | None = None
        #: Extensions started so far (for tests and stats).
        self.extensions = 0

    def __len__(self) -> int:
        return len(self._due)

    def hold(self, job: pb.LeasedJob) -> Held:
        """Start keeping ``job``'s lease alive; ``release`` it when done."""
        held = Held(job)
        loop = asyncio.get_running_loop()
        self._due[held] = loop.time() + self.interval_s
        if self._timer is None:
            self._timer = loop.call_at(self._due[held], self._fire)
        return held

    def release(self, held: Held) -> None:
        """Stop extending ``held`` (its handler ended, or it is given back)."""
        self._due.pop(held, None)
        if held.extending is not None:
            held.extending.cancel()
            held.extending = None

    def close(self) -> None:
        """Release every lease and stop the timer (the worker has stopped)."""
        for held in list(self._due):
            self.release(held)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _fire(self) -> None:
        loop = asyncio.get_running_loop()
        self._timer = None
        now = loop.time()
        # Due leases move to the back: their next turn is an interval away,
        # later than every lease still waiting, so the order stays by deadline.
        while self._due:
            held, at = next(iter(self._due.items()))
            if at > now:
                self._timer = loop.call_at(at, self._fire)
                return
            del self._due[held]
            self._due[held] = now + self.interval_s
            if held.extending is None or held.extending.done():  # none doubled
                self.extensions += 1
                held.extending = asyncio.create_task(
                    self._extend_one(held), name=f"pq-extend-{held.job.job_id}"
                )

    async def _extend_one(self, held: Held) -> None:
        try:
            await self._extend(held.job)
        except LeaseLostError:
            logger.warning("lease of job %d lost (it expired, or was taken)", held.job.job_id)
            held.lost = True
            self._due.pop(held, None)
        except PQueueError as exc:
            logger.warning("extending job %d failed: %s", held.job.job_id, describe(exc))
        except Exception:  # not the node's answer (a closed client...): tried again too
            logger.warning("extending job %d failed", held.job.job_id, exc_info=True)
        finally:
            if held.extending is asyncio.current_task():
                held.extending = None
