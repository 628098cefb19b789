"""Keeping a store's ``jobs`` table in step with the applied state machine.

PostgreSQL keeps a ``jobs`` table for operators' SQL. The node hands the
mirror each applied entry's ``Effects``; the mirror gathers the ids of jobs
changed or removed and hands the store those rows since its last write,
with the applied index, to be written in one transaction (joining the
store's next group commit). After a start or a restore from a snapshot it
replaces the whole table once. Clients are never
made to wait for it: the table trails the log by a group commit or so, and
says to which index (``applied.applied_index``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Protocol, runtime_checkable

from pqueue.core.effects import Effects
from pqueue.core.machine import QueueMachine
from pqueue.errors import PQueueError
from pqueue.storage.jobrow import JobRow
from pqueue.wire.logs import describe
from pqueue.wire.serving import log_failure

logger = logging.getLogger(__name__)


@runtime_checkable
class MirrorStore(Protocol):
    """A store with a ``jobs`` table."""

    def record_applied(
        self, applied_index: int, upserts: list[JobRow], deleted: list[int], replace_all: bool
    ) -> asyncio.Future[None]:
        """Bring the table to ``applied_index``; the future resolves at commit."""


#: Table writes in flight before the mirror waits for one (backpressure).
MAX_IN_FLIGHT = 64


class JobsMirror:
    """One per node whose store is a ``MirrorStore``. ``start``/``stop``."""

    def __init__(self, store: MirrorStore, machine: Callable[[], QueueMachine]) -> None:
        self.store = store
        self.machine = machine
        self._wake = asyncio.Event()
        self._full = True
        #: Ids of jobs changed or removed since the last write (from ``Effects``).
        self._changed: set[int] = set()
        #: The queues those jobs are (or were) in.
        self._touched: set[str] = set()
        self._failed = False
        self._in_flight: list[asyncio.Future[None]] = []
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Begin with a full copy of the recovered state."""
        self._full = True
        self._wake.set()
        self._task = asyncio.create_task(self._mirror_loop(), name="pq-jobs-mirror")
        self._task.add_done_callback(log_failure)

    def observe(self, effects: Effects) -> None:
        """An entry was applied: its changed jobs go into the next write
        (none while a full copy is due: it covers them, and a replay at
        start would otherwise gather the id of every job it applies)."""
        if not self._full:
            self._changed |= effects.changed
            self._touched |= effects.touched
        self._wake.set()

    def notify_restored(self) -> None:
        """The whole state was replaced (a snapshot): copy all of it next."""
        self._full = True
        self._wake.set()

    async def stop(self, flush_timeout_s: float = 5.0) -> None:
        """Write what is left and stop. Whatever misses the table here (the
        store is away) is rewritten in full on the next start."""
        if self._task is None:
            return
        self._task.cancel()
        await asyncio.wait([self._task])
        self._task = None
        try:
            async with asyncio.timeout(flush_timeout_s):
                await self._flush()
        except (TimeoutError, PQueueError) as exc:
            logger.warning("jobs table left behind on stop (rebuilt on start): %s", describe(exc))

    def _flush(self) -> asyncio.Future[None]:
        machine = self.machine()
        full, self._full = self._full, False
        changed, self._changed = self._changed, set()  # a full copy covers them
        touched, self._touched = self._touched, set()
        if full:
            upserts = [job.to_proto() for job in machine.all_jobs()]
            deleted: list[int] = []
        else:
            found = {i: machine.find_job(i, touched) for i in sorted(changed)}
            upserts = [job.to_proto() for job in found.values() if job is not None]
            deleted = [i for i, job in found.items() if job is None]
        rows = [JobRow.of(job) for job in upserts]
        fut = self.store.record_applied(machine.applied_index, rows, deleted, full)
        fut.add_done_callback(self._written)
        return fut

    def _written(self, fut: asyncio.Future[None]) -> None:
        if fut.cancelled() or fut.exception() is not None:
            # What that write carried is lost: copy everything next time.
            exc = None if fut.cancelled() else fut.exception()
            error = "cancelled" if exc is None else describe(exc)
            logger.error("jobs table write failed (a full copy follows): %s", error)
            self._full = self._failed = True
            self._wake.set()

    async def _mirror_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._failed:
                self._failed = False
                await asyncio.sleep(1.0)  # not a tight loop on a lasting failure
            self._in_flight = [f for f in self._in_flight if not f.done()]
            self._in_flight.append(self._flush())
            if len(self._in_flight) > MAX_IN_FLIGHT:
                await asyncio.wait([self._in_flight[-1]])
