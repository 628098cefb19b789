"""Real gRPC servers on 127.0.0.1:0, stopped in ``finally``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from pqueue.client import Client
from pqueue.node.server import NodeServer, ServerConfig
from pqueue.storage.sqlite import SqliteStorage
from tests.inproc import Cluster, lifecycle_on


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[NodeServer]:
    srv = NodeServer(
        SqliteStorage(tmp_path / "n1"), ServerConfig(listen="127.0.0.1:0", grace_s=1.0)
    )
    await srv.start()
    try:
        await lifecycle_on(srv)
        yield srv
    finally:
        await srv.stop()


@pytest.fixture
async def client(server: NodeServer) -> AsyncIterator[Client]:
    c = Client(server.address, timeout_s=10.0, max_retries=0)
    try:
        yield c
    finally:
        await c.close()


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    """Three nodes in this process (``tests.inproc.Cluster``), on SQLite."""
    c = Cluster(tmp_path)
    await c.start()
    try:
        yield c
    finally:
        await c.stop()
