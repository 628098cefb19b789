"""Real gRPC servers on 127.0.0.1:0, stopped in ``finally``."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from pqueue.client import Client
from pqueue.node.server import NodeServer
from pqueue.testing import started_node
from tests.consume_raw import RawStream
from tests.inproc import Cluster


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[NodeServer]:
    """One node alone, as users test against (``pqueue.testing.started_node``)."""
    async with started_node(tmp_path, grace_s=1.0) as srv:
        yield srv


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


@pytest.fixture
async def raw(server: NodeServer) -> AsyncIterator[Callable[..., RawStream]]:
    """Opens raw ``Consume`` streams to ``server`` (optional metadata), all
    closed at the end."""
    opened: list[RawStream] = []

    def open_stream(metadata: tuple[tuple[str, str], ...] = ()) -> RawStream:
        stream = RawStream(server.address, metadata)
        opened.append(stream)
        return stream

    try:
        yield open_stream
    finally:
        for stream in opened:
            await stream.close()
