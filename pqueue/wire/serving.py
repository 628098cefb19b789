"""Serving until SIGTERM or SIGINT, the shared shell of the node's and the
balancer's servers, and a done-callback for background tasks."""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Any, Self

from pqueue.wire.logs import describe

logger = logging.getLogger(__name__)


async def until_signal_or(*events: asyncio.Event) -> bool:
    """Wait for SIGTERM, SIGINT or any of ``events``; True if a signal came."""
    loop = asyncio.get_running_loop()
    signalled = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, signalled.set)
    waits = [asyncio.create_task(e.wait()) for e in (signalled, *events)]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()
        await asyncio.wait(waits)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    return signalled.is_set()


class Serving:
    """``async with``, ``start``/``stop`` and ``serve_until_signal`` for a server
    (the node's and the balancer's): a subclass writes ``start`` and ``stop``,
    and names the events that end serving besides a signal (``stop_events``)."""

    async def start(self) -> None:
        """Begin serving."""
        raise NotImplementedError

    async def stop(self) -> None:
        """Stop serving (drain first where the server has something to drain)."""
        raise NotImplementedError

    def stop_events(self) -> tuple[asyncio.Event, ...]:
        """Events that end ``serve_until_signal`` as a failure (none by default)."""
        return ()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def serve_until_signal(self) -> bool:
        """Run until SIGTERM or SIGINT (True), or until a stop event (False); then stop."""
        events = self.stop_events()
        try:
            await until_signal_or(*events)
        finally:
            await self.stop()
        return not any(e.is_set() for e in events)


def log_failure(task: asyncio.Task[Any]) -> None:
    """A done-callback: a background task that died of an error says so in the log
    (else its exception is only "never retrieved" at garbage collection)."""
    if not task.cancelled() and (exc := task.exception()) is not None:
        logger.error("task %s failed: %s", task.get_name(), describe(exc), exc_info=exc)
