"""The node's memory budget: refuse new jobs before the OS kills the node.

``pq node --memory-budget-mb N``: while the process's resident set is at
or above N MiB, ``Enqueue`` and ``EnqueueBatch`` are refused with
``RESOURCE_EXHAUSTED`` (the servicer asks ``check`` before it forwards or
proposes, so a refused call changed nothing). Everything else still works:
leases, acks and nacks are how the backlog, and the memory, shrink.

The RSS is read by a task of its own once a second (``interval_s``), never
on a request: a call reads the last figure.

RSS hardly falls when jobs leave: CPython keeps the freed memory for reuse
rather than return it to the OS. So the budget also counts jobs: when the
RSS first reaches the budget, the number of jobs held then is what fits
(``fits_jobs``), and enqueues are refused only while the node holds at
least that many. Consuming the backlog therefore reopens the door at once
(new jobs take the memory the old ones freed); if the RSS still grows past
the budget with fewer jobs, the figure comes down to that count. Under the
budget again (a restart), the figure is forgotten. A node's state is replicated,
so every node holds about the same backlog; each checks its own RSS, and a
follower refuses as the leader would, without a hop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import psutil

from pqueue.errors import ResourceExhaustedError
from pqueue.wire.serving import log_failure

logger = logging.getLogger(__name__)

MIB = 1 << 20
#: How often the RSS is read.
SAMPLE_INTERVAL_S = 1.0
#: The wait a refusal suggests: the next reading.
RETRY_AFTER_S = 1.0


def process_rss() -> int:
    """This process's resident set size, in bytes."""
    return int(psutil.Process().memory_info().rss)


class MemoryBudget:
    """The budget, the last RSS reading, and the refusals so far."""

    def __init__(
        self,
        budget_bytes: int,
        node: str = "",
        rss: Callable[[], int] = process_rss,
        interval_s: float = SAMPLE_INTERVAL_S,
        jobs: Callable[[], int] | None = None,
    ) -> None:
        if budget_bytes < 0:
            raise ValueError("the memory budget must not be negative")
        #: 0: no budget (nothing is read, nothing refused).
        self.budget_bytes = budget_bytes
        self.node = node
        self._rss = rss
        self.interval_s = interval_s
        #: The last reading (0 until the first).
        self.rss_bytes = 0
        #: Enqueue calls refused for memory since the start.
        self.refusals = 0
        #: How many jobs the node holds (None: refuse on the RSS alone).
        self._jobs = jobs
        #: Jobs held at the last reading.
        self.jobs_held = 0
        #: Jobs that fit in the budget (None: under it, no figure yet).
        self.fits_jobs: int | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Read the RSS now, then once every ``interval_s``, off the request path."""
        if not self.budget_bytes or self._task is not None:
            return
        self._read()
        self._task = asyncio.create_task(self._sample_loop(), name="pq-memory-budget")
        self._task.add_done_callback(log_failure)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _sample_loop(self) -> None:
        over = False
        while True:
            await asyncio.sleep(self.interval_s)
            self._read()
            if self.over != over:
                over = self.over
                log = logger.warning if over else logger.info
                log(
                    "node %s: RSS %s %s its memory budget of %s: enqueues %s",
                    self.node,
                    _mib(self.rss_bytes),
                    "is at or above" if over else "is back under",
                    _mib(self.budget_bytes),
                    "refused" if over else "accepted again",
                )

    def _read(self) -> None:
        rss = self._rss()
        grew = rss > self.rss_bytes
        self.rss_bytes = rss
        if self._jobs is None:
            return
        self.jobs_held = held = self._jobs()
        if rss < self.budget_bytes:
            self.fits_jobs = None
        elif self.fits_jobs is None or (grew and held < self.fits_jobs):
            self.fits_jobs = held

    @property
    def over(self) -> bool:
        """At or above the budget with as many jobs as fit, as of the last reading."""
        if not self.budget_bytes or self.rss_bytes < self.budget_bytes:
            return False
        return self.fits_jobs is None or self.jobs_held >= self.fits_jobs

    def check(self) -> None:
        """Refuse new jobs (``RESOURCE_EXHAUSTED``) while at or above the budget."""
        if not self.over:
            return
        self.refusals += 1
        raise ResourceExhaustedError(
            f"node {self.node} is out of memory for new jobs: its RSS is "
            f"{_mib(self.rss_bytes)}, at or above its memory budget of "
            f"{_mib(self.budget_bytes)} (pq node --memory-budget-mb); consume the "
            "backlog (lease and ack) to free memory, or raise the budget",
            retry_after_s=RETRY_AFTER_S,
        )


def _mib(n: int) -> str:
    return f"{n / MIB:,.0f} MiB"
