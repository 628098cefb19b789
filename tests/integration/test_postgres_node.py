"""A node keeping its log in PostgreSQL: the API, the jobs table, restarts, an outage."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pqueue.client import Client
from pqueue.errors import NotTakenError, PQueueError
from pqueue.node.server import NodeServer, ServerConfig
from pqueue.storage.postgres import PostgresStorage
from tests import pg
from tests.faults.proxy import Proxy


@pytest.fixture
async def schema() -> AsyncIterator[str]:
    pg.dsn()  # skips without PostgreSQL
    name = pg.new_schema("pq_node")
    try:
        yield name
    finally:
        await pg.drop_schemas(name)


def node(dsn: str, schema: str) -> NodeServer:
    return NodeServer(PostgresStorage(dsn, schema, retry_max_s=0.2), ServerConfig(grace_s=0.5))


async def jobs_table(schema: str, at_least: int) -> list[tuple[int, str, str]]:
    """(id, queue, state) rows once the table reflects index ``at_least``."""
    conn = await asyncpg.connect(pg.dsn())
    try:
        for _ in range(200):
            applied = await conn.fetchval(f"SELECT applied_index FROM {schema}.applied")
            if applied is not None and applied >= at_least:
                rows = await conn.fetch(f"SELECT id, queue, state FROM {schema}.jobs ORDER BY id")
                return [(r["id"], r["queue"], r["state"]) for r in rows]
            await asyncio.sleep(0.05)
        raise AssertionError(f"the jobs table never reached index {at_least}")
    finally:
        await conn.close()


async def test_a_node_on_postgres_serves_restarts_and_shows_its_jobs(schema: str) -> None:
    server = node(pg.dsn(), schema)
    await server.start()
    try:
        async with Client(server.address, max_retries=0) as c:
            await c.create_queue("mail")
            for i in range(5):
                await c.enqueue("mail", f"m{i}", priority=i)
            [first] = await c.lease("mail")
            await c.ack("mail", first.job_id, first.lease_id)
            [second] = await c.lease("mail")
        applied = server.node.machine.applied_index
    finally:
        await server.stop()
    rows = await jobs_table(schema, applied)
    assert [(r[0], r[2]) for r in rows] == [
        (1, "completed"),
        (2, "leased"),
        (3, "ready"),
        (4, "ready"),
        (5, "ready"),
    ]

    server = node(pg.dsn(), schema)  # a restart on the same schema
    await server.start()
    try:
        async with Client(server.address, max_retries=0) as c:
            [stats] = await c.stats("mail")
            assert (stats.ready, stats.leased, stats.acked_total) == (3, 1, 1)
            await c.ack("mail", second.job_id, second.lease_id)  # its lease survived
        rows = await jobs_table(schema, server.node.machine.applied_index)
        assert [(r[0], r[2]) for r in rows] == [
            (1, "completed"),
            (2, "completed"),
            (3, "ready"),
            (4, "ready"),
            (5, "ready"),
        ]
    finally:
        await server.stop()


async def test_postgres_going_away_stops_writes_until_it_returns(schema: str) -> None:
    async with pg.through_a_proxy() as (proxy, via_proxy):
        await _ride_out_an_outage(proxy, node(via_proxy, schema))


async def _ride_out_an_outage(proxy: Proxy, server: NodeServer) -> None:
    await server.start()
    try:
        async with (
            Client(server.address, max_retries=0, timeout_s=2) as c,
            grpc.aio.insecure_channel(server.address) as channel,
        ):
            health = health_pb2_grpc.HealthStub(channel)
            await c.create_queue("q")
            await c.enqueue("q", b"before")
            acked, tried = {b"before"}, {b"before"}
            proxy.cut()  # PostgreSQL goes away
            refused = False
            for i in range(50):
                payload = f"during-{i}".encode()
                tried.add(payload)
                try:
                    await c.enqueue("q", payload, idempotency_key=payload.decode())
                    acked.add(payload)
                except NotTakenError:  # refused at once, cleanly: UNAVAILABLE
                    refused = True
                    break
                except PQueueError:
                    pass  # timed out while held: its outcome is unknown
            assert refused
            for _ in range(40):  # health follows within a watch interval
                status = await health.Check(health_pb2.HealthCheckRequest())
                if status.status == health_pb2.HealthCheckResponse.NOT_SERVING:
                    break
                await asyncio.sleep(0.05)
            assert status.status == health_pb2.HealthCheckResponse.NOT_SERVING
            proxy.heal()  # it comes back
            for _ in range(100):
                try:
                    await c.enqueue("q", b"after")
                    acked.add(b"after")
                    tried.add(b"after")
                    break
                except NotTakenError:
                    await asyncio.sleep(0.05)
            assert b"after" in acked
            payloads = {job.payload for job in await c.lease("q", max_jobs=100)}
            assert acked <= payloads <= tried  # nothing acknowledged was lost
            for _ in range(40):
                status = await health.Check(health_pb2.HealthCheckRequest())
                if status.status == health_pb2.HealthCheckResponse.SERVING:
                    break
                await asyncio.sleep(0.05)
            assert status.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await server.stop()


async def test_no_job_a_client_can_send_breaks_the_node_or_its_table(schema: str) -> None:
    server = node(pg.dsn(), schema)
    await server.start()
    try:
        async with Client(server.address, max_retries=0) as c:
            await c.enqueue("q", b"x", group="a\x00b")  # text in PostgreSQL cannot hold NUL
            await c.enqueue("q", b"y", not_before_ms=2**62)  # beyond any timestamptz
            await c.enqueue("q", b"z")
            [stats] = await c.stats("q")
            assert stats.ready + stats.delayed == 3  # it kept serving
        rows = await jobs_table(schema, server.node.machine.applied_index)
        assert [r[0] for r in rows] == [1, 2, 3]
    finally:
        await server.stop()
