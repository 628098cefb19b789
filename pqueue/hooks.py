"""What a ``Worker`` tells about each handler's outcome: its hooks, and the
rate-limited log of failing handlers (an SDK module).

A handler that raises is logged at ERROR with its traceback (a
``JobFailed``: its message, at WARNING), at most once
per ``WorkerConfig.failure_log_interval_s`` per worker (a worker serves one
queue); the failures in between are counted, and the next traceback says
how many were left out (each is also logged at DEBUG, one line). A
poison job that fails a thousand times a minute thus costs one traceback
a minute, not a thousand, and its first failure is never silent.

Hooks are callables the worker calls after it settled each job, on the
worker's event loop, sync or async::

    async def failed(job: pb.LeasedJob, exc: BaseException) -> None:
        sentry_sdk.capture_exception(exc)

    def done(job: pb.LeasedJob, result: bytes | str | None) -> None:
        metrics.jobs_done.inc()

    Worker(client, "emails", handle, on_error=failed, on_success=done)

``on_success(job, result)`` gets what the handler returned, once its ack
was sent; ``on_error(job, exc)`` the exception it raised, once its nack was
sent (a ``JobFailed`` too; a handler cancelled at shutdown is neither: its
job is released). A hook that raises is logged and changes nothing: the
job stays acked or nacked.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from pqueue.v1 import queue_pb2 as pb

#: The worker's logger: one name to configure for everything a worker says.
logger = logging.getLogger("pqueue.worker")

#: Called after a job's handler returned and its ack was sent: the job, and
#: what the handler returned.
OnSuccess = Callable[[pb.LeasedJob, Any], Awaitable[None] | None]
#: Called after a job's handler raised and its nack was sent: the job, and
#: the exception.
OnError = Callable[[pb.LeasedJob, BaseException], Awaitable[None] | None]


class JobFailed(Exception):
    """Raised by a handler: nack the job with this message as its reason, as
    it is (other exceptions' reasons are prefixed with their type's name),
    and log it as one line, without a traceback. Also ``pqueue.worker.JobFailed``."""


class FailureLog:
    """Logs failing handlers: one traceback per ``interval_s``, the rest counted.

    ``clock`` (seconds, monotonic) is a parameter so a test can step it.
    """

    def __init__(self, queue: str, interval_s: float, clock: Callable[[], float]) -> None:
        self.queue = queue
        self.interval_s = interval_s
        self._clock = clock
        self._last_s: float | None = None
        #: Failures since the last traceback that were not logged with one.
        self.suppressed = 0

    def failed(self, job: pb.LeasedJob, exc: BaseException) -> bool:
        """Log ``exc``, a failure of ``job``'s handler; whether with its traceback."""
        now = self._clock()
        if self._last_s is not None and now - self._last_s < self.interval_s:
            self.suppressed += 1
            logger.debug(
                "handler failed on job %d of %s (attempt %d): %s",
                job.job_id,
                self.queue,
                job.attempt,
                _one_line(exc),
            )
            return False
        left_out = (
            f" ({self.suppressed} more failures since the last traceback, not shown)"
            if self.suppressed
            else ""
        )
        # A handler that chose its failure (``JobFailed``, as ``pq worker``'s
        # do) said all there is: a WARNING line; any other, the traceback.
        chosen = isinstance(exc, JobFailed)
        logger.log(
            logging.WARNING if chosen else logging.ERROR,
            "handler failed on job %d of %s (attempt %d): %s%s",
            job.job_id,
            self.queue,
            job.attempt,
            str(exc) if chosen else _one_line(exc),
            left_out,
            exc_info=None if chosen else exc,
        )
        self._last_s, self.suppressed = now, 0
        return True


async def call_hook(name: str, hook: Callable[..., Any] | None, *args: Any) -> None:
    """Call ``hook(*args)``, awaiting it if it is a coroutine; a hook that
    raises is logged (with its traceback), never raised."""
    if hook is None:
        return
    try:
        returned = hook(*args)
        if inspect.isawaitable(returned):
            await returned
    except Exception:
        logger.exception("the worker's %s hook raised", name)


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
