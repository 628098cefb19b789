"""Test your workers and producers against a real pqueue node, in process.

A real node (the same consensus, state machine and gRPC service as
``pq node``), alone, on ``127.0.0.1`` at a free port, with SQLite in a
temporary directory, stopped (and its directory removed) on the way out.
No mock: what passes here passes against a cluster, time aside. It starts
in well under a second::

    import pqueue.testing
    from pqueue.worker import Worker

    async def test_my_worker_sends_the_email() -> None:
        sent = asyncio.Event()

        async def handle(job):
            sent.set()

        async with pqueue.testing.local_node() as client:
            await client.enqueue("emails", b"hello")
            worker = Worker(client, "emails", handle)
            run = asyncio.create_task(worker.run())
            await asyncio.wait_for(sent.wait(), 10)
            worker.stop()
            await run
            [stats] = await client.stats("emails")
            assert stats.acked_total == 1

With pytest (and pytest-asyncio), the fixtures ``pqueue_client`` (a
``Client`` connected to a fresh node per test) and ``pqueue_node`` (its
``NodeServer``, for ``.address``) come with one line in your
``conftest.py``::

    pytest_plugins = ["pqueue.testing.pytest_plugin"]

``started_node`` yields the ``NodeServer`` itself, for more ``ServerConfig``
(a ``Verifier`` to test with auth on, ``Quotas``...).

This module loads the node's code: import it from tests, never from the
code it tests (the SDK itself never imports it).
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from pqueue.client import Client
from pqueue.core import features
from pqueue.node.server import NodeServer, ServerConfig
from pqueue.storage.sqlite import SqliteStorage

__all__ = ["lifecycle_on", "local_node", "started_node"]

#: How long a node alone may take to switch its log features on.
START_TIMEOUT_S = 10.0


@contextlib.asynccontextmanager
async def started_node(root: Path | None = None, **config: Any) -> AsyncIterator[NodeServer]:
    """A node alone on 127.0.0.1 (a free port: ``.address``), with SQLite
    under ``root`` (default: a temporary directory, removed after).

    ``config``: more ``ServerConfig`` fields (``verifier``, ``quotas``...).
    Yields once the node serves as a cluster would (its log features on);
    stops it on the way out.
    """
    with contextlib.ExitStack() as stack:
        if root is None:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pqueue-")))
        config = {"listen": "127.0.0.1:0", "grace_s": 0.5, **config}
        srv = NodeServer(SqliteStorage(root / "n1"), ServerConfig(**config))
        await srv.start()
        try:
            await lifecycle_on(srv)
            yield srv
        finally:
            await srv.stop()


@contextlib.asynccontextmanager
async def local_node(
    root: Path | None = None, *, token: str | None = None, **config: Any
) -> AsyncIterator[Client]:
    """``started_node``, and a ``Client`` connected to it (closed on the way
    out, before the node stops). ``token``: the client's bearer token, with
    a ``verifier`` in ``config``."""
    async with (
        started_node(root, **config) as srv,
        Client(srv.address, timeout_s=10.0, token=token) as client,
    ):
        yield client


async def lifecycle_on(srv: NodeServer, timeout_s: float = START_TIMEOUT_S) -> None:
    """Wait until a node alone has switched the lifecycle feature on (its
    first entry), so a test sees the semantics a cluster's users see, and
    its own entries are the ones it counts."""
    if features.LIFECYCLE not in srv.node.config.features:
        return
    deadline = time.monotonic() + timeout_s
    while not srv.node.machine.lifecycle:
        if time.monotonic() > deadline:
            raise AssertionError("the node never switched the lifecycle feature on")
        await asyncio.sleep(0.02)
