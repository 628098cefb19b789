"""Group commit for PostgreSQL: one task, one transaction per batch of waiting writes.

Each write is an idempotent function of a connection. The writer takes
every write waiting at that moment, runs them in one transaction, and
resolves their futures once it has committed. When PostgreSQL cannot be
reached (a connection error, a shutdown, a read-only standby mid-failover,
an attempt that hangs past ``attempt_timeout_s``) it retries the same batch
with backoff until it can, and says so through ``available``. Any other
error fails the batch with ``StorageError``; the writer lives on.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import asyncpg

from pqueue.errors import StorageError
from pqueue.wire.logs import describe

logger = logging.getLogger(__name__)

#: A connection from the pool (asyncpg hands out proxies of connections).
Conn = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy
Write = Callable[[Conn], Awaitable[None]]
Pending = tuple[Write, "asyncio.Future[None]"]

#: SQLSTATE classes and codes after which the same transaction may be retried.
_TRANSIENT_CLASSES = ("08", "57P")  # connection exceptions; operator intervention
_TRANSIENT_CODES = {"53300", "25006", "40001", "40P01"}  # too many connections;
# read-only transaction (a standby mid-failover); serialization failure; deadlock


def transient(exc: BaseException) -> bool:
    """Whether ``exc`` means "PostgreSQL is away for now", not "this write is wrong"."""
    if isinstance(exc, (OSError, TimeoutError, asyncpg.exceptions.ConnectionDoesNotExistError)):
        return True
    if isinstance(exc, asyncpg.exceptions.TargetServerAttributeNotMatched):
        return True  # reconnected to a standby during a failover
    if isinstance(exc, asyncpg.PostgresError):
        state = exc.sqlstate or ""
        return state.startswith(_TRANSIENT_CLASSES) or state in _TRANSIENT_CODES
    return False


class GroupWriter:
    """Runs writes in group-committed transactions on connections from ``acquire``."""

    def __init__(
        self,
        name: str,
        run: Callable[[list[Write]], Awaitable[None]],
        describe: str,
        retry_max_s: float = 2.0,
        attempt_timeout_s: float = 10.0,
    ) -> None:
        self.name = name
        self._run = run
        self._describe = describe
        self.retry_max_s = retry_max_s
        self.attempt_timeout_s = attempt_timeout_s
        #: False while PostgreSQL cannot be reached (writes wait and retry).
        self.available = True
        #: Transactions committed (each holds every write that waited for it).
        self.transactions = 0
        self._queue: asyncio.Queue[Pending] = asyncio.Queue()
        self._batch: list[Pending] = []
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start the writer task."""
        self._task = asyncio.create_task(self._writer_loop(), name=f"pq-pg-{self.name}")
        self._task.add_done_callback(self._on_done)

    def submit(self, op: Write) -> asyncio.Future[None]:
        """Queue ``op`` for the next transaction; the future resolves at its commit."""
        if self._task is None or self._task.done():
            raise StorageError(f"{self._describe}: the {self.name} writer is not running")
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((op, fut))
        return fut

    async def stop(self) -> None:
        """Stop; writes not yet committed fail with ``StorageError``."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task])
            self._task = None
        self._fail_all(StorageError(f"{self._describe}: storage closed"))

    def _on_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and (exc := task.exception()) is not None:
            logger.error("%s writer died: %s", self.name, describe(exc), exc_info=exc)
            self._fail_all(StorageError(f"{self._describe}: writer died: {describe(exc)}"))

    def _fail_all(self, error: StorageError) -> None:
        pending, self._batch = self._batch, []
        while not self._queue.empty():
            pending.append(self._queue.get_nowait())
        for _, fut in pending:
            if not fut.done():
                fut.set_exception(error)

    async def _writer_loop(self) -> None:
        while True:
            self._batch = [await self._queue.get()]
            while not self._queue.empty():
                self._batch.append(self._queue.get_nowait())
            error = await self._commit([op for op, _ in self._batch])
            batch, self._batch = self._batch, []
            for _, fut in batch:
                if fut.done():
                    continue
                if error is None:
                    fut.set_result(None)
                else:
                    fut.set_exception(error)

    async def _commit(self, ops: list[Write]) -> StorageError | None:
        """Commit ``ops`` in one transaction, retrying while PostgreSQL is away."""
        backoff_s = 0.05
        while True:
            try:
                async with asyncio.timeout(self.attempt_timeout_s):
                    await self._run(ops)
            except StorageError as exc:
                return exc
            except Exception as exc:
                if not transient(exc):
                    return StorageError(f"{self._describe}: {describe(exc)}")
                if self.available:
                    logger.error(
                        "postgresql unavailable (%s), retrying: %s", self.name, describe(exc)
                    )
                self.available = False
                await asyncio.sleep(backoff_s)
                backoff_s = min(self.retry_max_s, backoff_s * 2)
                continue
            self.transactions += 1
            if not self.available:
                logger.info("postgresql is back (%s): writes resume", self.name)
            self.available = True
            return None
