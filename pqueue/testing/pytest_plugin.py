"""pytest fixtures for testing against a real pqueue node (``pqueue.testing``).

Enable them in your ``conftest.py``::

    pytest_plugins = ["pqueue.testing.pytest_plugin"]

then ask for ``pqueue_client`` (a ``Client`` on a fresh node, one per test)
or ``pqueue_node`` (that node's ``NodeServer``)::

    async def test_enqueue(pqueue_client: Client) -> None:
        await pqueue_client.enqueue("emails", b"hello")
        [stats] = await pqueue_client.stats("emails")
        assert stats.ready == 1

The fixtures are async: they need pytest-asyncio (either mode).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest_asyncio

from pqueue.client import Client
from pqueue.node.server import NodeServer
from pqueue.testing import started_node


@pytest_asyncio.fixture
async def pqueue_node(tmp_path: Path) -> AsyncIterator[NodeServer]:
    """A node alone on 127.0.0.1 at a free port, SQLite under ``tmp_path``."""
    async with started_node(tmp_path / "pqueue") as node:
        yield node


@pytest_asyncio.fixture
async def pqueue_client(pqueue_node: NodeServer) -> AsyncIterator[Client]:
    """A ``Client`` connected to ``pqueue_node``."""
    async with Client(pqueue_node.address, timeout_s=10.0) as client:
        yield client
