"""Waiting for SIGTERM or SIGINT in an asyncio program (servers' entry points)."""

from __future__ import annotations

import asyncio
import signal


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
