"""``Worker``: long-poll a queue and run a handler on each job.

- Leases up to ``prefetch`` jobs per call, never more than free slots, so the
  worker holds no job it is not working on.
- Extends each lease while its handler runs (every third of the lease).
- Acks on success, batching acks that finish together into one call;
  nacks with the exception text on failure (the queue's backoff applies).
- ``stop()`` (or SIGTERM/SIGINT under ``run_until_signal``) stops leasing,
  lets running handlers finish within ``shutdown_grace_s``, and releases the
  rest (a release: no attempt counted, no error recorded) so another worker
  can take them at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from pqueue.client import Client
from pqueue.errors import LeaseLostError, NotFoundError, PQueueError
from pqueue.v1 import queue_pb2 as pb
from pqueue.wire.logs import describe

logger = logging.getLogger(__name__)

Handler = Callable[[pb.LeasedJob], Awaitable[None]]


@dataclass(frozen=True)
class WorkerConfig:
    """How a worker leases and shuts down."""

    concurrency: int = 4
    #: Jobs per lease call; 0 means ``concurrency``.
    prefetch: int = 0
    lease_ms: int = 30_000
    wait_ms: int = 20_000
    shutdown_grace_s: float = 30.0
    consumer_id: str = ""

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if self.prefetch < 0 or self.lease_ms < 3 or self.wait_ms < 0:
            raise ValueError("prefetch, lease_ms and wait_ms must be positive")


@dataclass
class WorkerStats:
    """What a worker has done so far."""

    leased: int = 0
    acked: int = 0
    failed: int = 0
    released: int = 0
    lost: int = 0


class Worker:
    """Runs ``handler`` on jobs of ``queue`` with bounded concurrency."""

    def __init__(
        self,
        client: Client,
        queue: str,
        handler: Handler,
        concurrency: int = 4,
        *,
        config: WorkerConfig | None = None,
    ) -> None:
        self.client = client
        self.queue = queue
        self.handler = handler
        self.config = config or WorkerConfig(concurrency=concurrency)
        self.stats = WorkerStats()
        self._active: set[asyncio.Task[None]] = set()
        self._slot_free = asyncio.Event()
        self._stopping = asyncio.Event()
        self._acks: list[tuple[pb.LeasedJob, asyncio.Future[bool]]] = []
        self._ack_flush: asyncio.Task[None] | None = None

    def stop(self) -> None:
        """Ask the worker to stop; ``run`` returns once it has."""
        self._stopping.set()

    async def run_until_signal(self) -> None:
        """``run`` until SIGTERM or SIGINT."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        try:
            await self.run()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)

    async def run(self) -> None:
        """Lease and process until ``stop``; then finish or release what is held."""
        try:
            while not self._stopping.is_set():
                free = self.config.concurrency - len(self._active)
                if free <= 0:
                    await self._wait_for(self._slot_free)
                    self._slot_free.clear()
                    continue
                jobs = await self._lease(min(self.config.prefetch or free, free))
                for job in jobs:
                    task = asyncio.create_task(self._process(job), name=f"pq-job-{job.job_id}")
                    self._active.add(task)
                    task.add_done_callback(self._on_done)
        finally:
            await self._shutdown()

    async def _wait_for(self, event: asyncio.Event) -> None:
        """Wait for ``event`` or a stop request, whichever comes first."""
        waiter = asyncio.create_task(event.wait())
        await self._race_stop(waiter)
        waiter.cancel()

    async def _race_stop(self, task: asyncio.Task[Any]) -> None:
        """Return when ``task`` is done or a stop is requested. Cancelled
        meanwhile, it cancels ``task`` too: nothing is left pending."""
        stop = asyncio.create_task(self._stopping.wait())
        try:
            await asyncio.wait([task, stop], return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            task.cancel()
            raise
        finally:
            stop.cancel()

    async def _lease(self, n: int) -> list[pb.LeasedJob]:
        call = asyncio.create_task(
            self.client.lease(
                self.queue,
                max_jobs=n,
                lease_ms=self.config.lease_ms,
                wait_ms=self.config.wait_ms,
                consumer_id=self.config.consumer_id,
            )
        )
        await self._race_stop(call)
        if not call.done():
            # Stopping mid-poll: anything the server leased meanwhile comes
            # back to the queue when its lease expires.
            call.cancel()
            await asyncio.wait([call])
            return []
        try:
            jobs = call.result()
        except NotFoundError:
            # Not created yet (or dropped when idle): producers create it on
            # their first enqueue. Poll again after the wait a long poll takes.
            logger.debug("queue %s does not exist yet", self.queue)
            pause = asyncio.create_task(asyncio.sleep(self.config.wait_ms / 1000))
            await self._race_stop(pause)
            pause.cancel()  # a stop came first: no sleep left pending
            return []
        except PQueueError as exc:
            logger.warning("lease on %s failed: %s", self.queue, describe(exc))
            if not exc.retriable:
                raise
            await asyncio.sleep(getattr(exc, "retry_after_s", 0.0) or 0.5)
            return []
        self.stats.leased += len(jobs)
        return jobs

    def _on_done(self, task: asyncio.Task[None]) -> None:
        self._active.discard(task)
        self._slot_free.set()
        if not task.cancelled() and (exc := task.exception()) is not None:
            logger.error("job task failed: %s", describe(exc), exc_info=exc)

    async def _process(self, job: pb.LeasedJob) -> None:
        heartbeat = asyncio.create_task(self._heartbeat(job), name=f"pq-heartbeat-{job.job_id}")
        try:
            try:
                await self.handler(job)
            except asyncio.CancelledError:
                await self._give_back(job, None, "", release=True)
                self.stats.released += 1
                raise
            except Exception as exc:
                self.stats.failed += 1
                # The reason names the type, as a traceback's last line does.
                reason = f"{type(exc).__name__}: {exc}" if str(exc) else describe(exc)
                await self._give_back(job, None, reason)
            else:
                if await self._ack(job):
                    self.stats.acked += 1
        finally:
            heartbeat.cancel()

    async def _give_back(
        self, job: pb.LeasedJob, delay_ms: int | None, reason: str, *, release: bool = False
    ) -> None:
        """Nack (a failed attempt), or release (not an attempt: we are stopping)."""
        try:
            await asyncio.shield(
                self.client.nack(
                    self.queue,
                    job.job_id,
                    job.lease_id,
                    delay_ms=delay_ms,
                    reason=reason,
                    release=release,
                )
            )
        except LeaseLostError:
            self.stats.lost += 1
        except PQueueError as exc:
            logger.warning("nack of job %d failed: %s", job.job_id, describe(exc))

    async def _heartbeat(self, job: pb.LeasedJob) -> None:
        interval_s = self.config.lease_ms / 3000
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.client.extend(self.queue, job.job_id, job.lease_id, self.config.lease_ms)
            except LeaseLostError:
                logger.warning("lease of job %d lost while its handler ran", job.job_id)
                return
            except PQueueError as exc:
                logger.warning("extending job %d failed: %s", job.job_id, describe(exc))

    async def _ack(self, job: pb.LeasedJob) -> bool:
        """Queue an ack; acks queued in the same loop turn go out as one call."""
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._acks.append((job, fut))
        if self._ack_flush is None or self._ack_flush.done():
            self._ack_flush = asyncio.create_task(self._flush_acks(), name="pq-ack-flush")
        return await asyncio.shield(fut)

    async def _flush_acks(self) -> None:
        await asyncio.sleep(0)  # let handlers finishing in this turn join the batch
        batch, self._acks = self._acks, []
        leases = [(job.job_id, job.lease_id) for job, _ in batch]
        try:
            await self.client.ack_many(self.queue, leases)
            outcomes = [True] * len(batch)
        except PQueueError:
            # Ack is atomic: one stale lease refuses the batch, so ack one by one.
            outcomes = [await self._ack_one(job) for job, _ in batch]
        for (_, fut), ok in zip(batch, outcomes, strict=True):
            if not fut.done():
                fut.set_result(ok)

    async def _ack_one(self, job: pb.LeasedJob) -> bool:
        try:
            await self.client.ack(self.queue, job.job_id, job.lease_id)
            return True
        except LeaseLostError:
            self.stats.lost += 1
            logger.warning("ack of job %d refused: lease lost", job.job_id)
        except PQueueError as exc:
            logger.warning("ack of job %d failed: %s", job.job_id, describe(exc))
        return False

    async def _shutdown(self) -> None:
        if not self._active:
            return
        logger.info("worker on %s finishing %d jobs", self.queue, len(self._active))
        _, pending = await asyncio.wait(set(self._active), timeout=self.config.shutdown_grace_s)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)
        if self._ack_flush is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._ack_flush
