"""When the disk fails: nothing hangs, nothing unacknowledged is claimed, the node says so."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pqueue.client import Client
from pqueue.errors import UnavailableError
from pqueue.node.queue_node import NodeConfig
from pqueue.node.server import NodeServer, ServerConfig
from pqueue.storage.sqlite import SqliteStorage
from tests.disk import FaultyDisk


async def _health(address: str) -> int:
    async with grpc.aio.insecure_channel(address) as ch:
        r = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
    return int(r.status)


async def test_a_failed_append_stops_the_node_and_loses_nothing_acknowledged(
    tmp_path: Path,
) -> None:
    disk = FaultyDisk(tmp_path)
    server = NodeServer(disk, ServerConfig(listen="127.0.0.1:0", grace_s=0.5))
    await server.start()
    try:
        async with Client(server.address, max_retries=0) as c:
            acked = (await c.enqueue("q", b"safe")).job_id
            disk.fail_append = True
            with pytest.raises(UnavailableError, match="no space"):
                await c.enqueue("q", b"lost")
            assert server.node.log.failed.is_set()
            with pytest.raises(UnavailableError):  # no retry can sneak through
                await c.enqueue("q", b"later")
            assert await _health(server.address) == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        await server.stop()
    server = NodeServer(SqliteStorage(tmp_path), ServerConfig(listen="127.0.0.1:0"))
    await server.start()
    try:
        async with Client(server.address, max_retries=0) as c:
            [stats] = await c.stats("q")
            assert stats.enqueued_total == 1
            assert (await c.get_job("q", acked)).payload == b"safe"
    finally:
        await server.stop()


async def test_a_failed_snapshot_only_delays_the_next_one(tmp_path: Path) -> None:
    disk = FaultyDisk(tmp_path)
    disk.fail_snapshot = True
    server = NodeServer(
        disk, ServerConfig(listen="127.0.0.1:0"), NodeConfig(snapshot_every_entries=4)
    )
    await server.start()
    try:
        async with Client(server.address, max_retries=0) as c:
            for i in range(20):
                await c.enqueue("q", f"{i}".encode())
            assert not server.node.log.failed.is_set()
            assert server.node.log.status().snapshot_index > 0  # a later one succeeded
    finally:
        await server.stop()
