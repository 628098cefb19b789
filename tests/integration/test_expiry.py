"""Expiry and dead retention on a real 3-node cluster: decided in the log, so
every replica (and each node's PostgreSQL jobs table) agrees; the CLI flags."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import pytest

from pqueue.client import Client
from pqueue.errors import InvalidArgumentError, NotFoundError
from pqueue.node.server import NodeServer
from pqueue.storage.postgres import PostgresStorage
from pqueue.v1 import queue_pb2 as pb
from tests import pg
from tests.inproc import Cluster
from tests.integration.test_cli import pq, pq_json

T = TypeVar("T")


async def eventually(probe: Callable[[], Awaitable[T | None]], timeout_s: float = 10.0) -> T:
    """The first non-None answer of ``probe``, polled until ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = await probe()
        if got is not None:
            return got
        if time.monotonic() > deadline:
            raise AssertionError("not reached in time")
        await asyncio.sleep(0.05)


def now_ms() -> int:
    return int(time.time() * 1000)


async def dead_job(c: Client, queue: str, job_id: int) -> pb.Job:
    async def probe() -> pb.Job | None:
        job = await c.get_job(queue, job_id, consistent=True)
        return job if job.state == pb.JOB_STATE_DEAD else None

    return await eventually(probe)


async def gone(c: Client, queue: str, job_id: int) -> bool:
    async def probe() -> bool | None:
        try:
            await c.get_job(queue, job_id, consistent=True)
        except NotFoundError:
            return True
        return None

    return await eventually(probe)


async def test_expiry_and_retention_are_decided_in_the_log(cluster: Cluster) -> None:
    leader = await cluster.leader()
    follower = next(i for i in cluster.servers if i != leader)
    async with Client(cluster.addresses[follower], max_retries=0) as c:
        await c.create_queue("ttl", pb.QueueConfig(job_ttl_ms=300))
        await c.create_queue("keep", pb.QueueConfig(max_attempts=1, dead_retention_ms=800))
        held = (await c.enqueue("ttl", "leased in time", expires_at_ms=now_ms() + 60_000)).job_id
        [leased] = await c.lease("ttl", lease_ms=30_000)
        assert leased.job_id == held
        enqueued = await c.enqueue("ttl", "never leased")
        job = await dead_job(c, "ttl", enqueued.job_id)
        assert job.reason == "expired"
        assert job.finished_at_ms >= job.expires_at_ms == job.enqueued_at_ms + 300
        # A leased job is not cut off: its lease decides, and its ack holds.
        assert (await c.get_job("ttl", held, consistent=True)).state == pb.JOB_STATE_LEASED
        await c.ack("ttl", leased.job_id, leased.lease_id)

        doomed = (await c.enqueue("keep", "fails once")).job_id
        [fails] = await c.lease("keep")
        await c.nack("keep", fails.job_id, fails.lease_id, reason="boom")
        died = await dead_job(c, "keep", doomed)
        assert died.reason == "attempts exhausted"
        assert await gone(c, "keep", doomed)  # 800 ms after it died

        with pytest.raises(InvalidArgumentError) as bad:
            await c.enqueue("ttl", "x", expires_at_ms=-1)
        assert bad.value.field == "job.expires_at_ms"
        with pytest.raises(InvalidArgumentError) as bad:
            await c.create_queue("bad", pb.QueueConfig(dead_retention_ms=-1))
        assert bad.value.field == "config.dead_retention_ms"
    await cluster.same_state()
    for server in cluster.servers.values():
        [keep, ttl] = server.node.machine.stats("", 0)  # by name
        assert (ttl.ttl_expired_total, ttl.dead, ttl.dead_total) == (1, 1, 1)
        assert (keep.ttl_expired_total, keep.dead, keep.dead_total) == (0, 0, 1)


# ----------------------------------------------------------- PostgreSQL


@pytest.fixture
async def pg_cluster(tmp_path: Path) -> AsyncIterator[tuple[Cluster, dict[int, str]]]:
    pg.dsn()  # skips without PostgreSQL
    schemas = {i: pg.new_schema("pq_expiry") for i in (1, 2, 3)}
    c = Cluster(tmp_path, storage=lambda i: PostgresStorage(pg.dsn(), schemas[i], retry_max_s=0.2))
    try:
        await c.start()
        yield c, schemas
    finally:
        await c.stop()
        await pg.drop_schemas(*schemas.values())


async def table_row(schema: str, job_id: int, at_least: int) -> dict[str, Any] | None:
    """The job's row in a node's jobs table once it reflects ``at_least``
    (None: no row)."""
    conn = await asyncpg.connect(pg.dsn())
    try:

        async def probe() -> tuple[dict[str, Any] | None] | None:
            applied = await conn.fetchval(f"SELECT applied_index FROM {schema}.applied")
            if applied is None or applied < at_least:
                return None
            row = await conn.fetchrow(
                "SELECT state, reason, result, "
                "(extract(epoch FROM finished_at) * 1000)::bigint AS finished_at_ms, "
                "(extract(epoch FROM expires_at) * 1000)::bigint AS expires_at_ms "
                f"FROM {schema}.jobs WHERE id = $1",
                job_id,
            )
            return (None if row is None else dict(row),)

        return (await eventually(probe))[0]
    finally:
        await conn.close()


async def test_every_nodes_jobs_table_shows_the_expired_job_until_it_is_pruned(
    pg_cluster: tuple[Cluster, dict[int, str]],
) -> None:
    cluster, schemas = pg_cluster
    await cluster.leader()
    async with Client(cluster.addresses[1], max_retries=0) as c:
        await c.create_queue("q", pb.QueueConfig(job_ttl_ms=200, dead_retention_ms=1500))
        job_id = (await c.enqueue("q", "too late")).job_id
        job = await dead_job(c, "q", job_id)
    await cluster.same_state()
    applied = cluster.servers[1].node.machine.applied_index
    for schema in schemas.values():
        row = await table_row(schema, job_id, applied)
        assert row == {
            "state": "dead",
            "reason": "expired",
            "result": b"",
            "finished_at_ms": job.finished_at_ms,
            "expires_at_ms": job.expires_at_ms,
        }, schema
    async with Client(cluster.addresses[1], max_retries=0) as c:
        assert await gone(c, "q", job_id)
    await cluster.same_state()
    applied = cluster.servers[1].node.machine.applied_index
    for schema in schemas.values():
        assert await table_row(schema, job_id, applied) is None, schema


# ------------------------------------------------------------------ CLI


async def test_cli_expiry_flags(server: NodeServer) -> None:
    a = server.address
    created = await pq_json(
        a, "queue", "create", "q", "--job-ttl-ms", "60000", "--dead-retention-ms", "3600000"
    )
    assert created["created"]
    async with Client(a, max_retries=0) as c:
        [info] = await c.list_queues()
    assert (info.config.job_ttl_ms, info.config.dead_retention_ms) == (60_000, 3_600_000)
    sooner = await pq_json(a, "enqueue", "q", "soon", "--ttl-ms", "100")
    later = await pq_json(a, "enqueue", "q", "later", "--expires-at", "2100-01-01T00:00:00Z")
    job = await eventually(lambda: _dead_in_cli(a, sooner["job_id"]))
    assert (job["state"], job["reason"]) == ("dead", "expired")
    assert job["expires_at_ms"] - job["enqueued_at_ms"] <= 100
    other = await pq_json(a, "job", "q", str(later["job_id"]))
    # The queue's TTL comes sooner than 2100: it wins.
    assert other["expires_at_ms"] == other["enqueued_at_ms"] + 60_000
    [stats] = await pq_json(a, "stats", "q")
    assert stats["ttl_expired_total"] == 1

    code, _, err = await pq(a, "enqueue", "q", "x", "--expires-at", "tomorrow")
    assert code != 0
    assert "tomorrow" in err
    code, _, err = await pq(a, "enqueue", "q", "x", "--ttl-ms", "0")
    assert (code, err.strip()) == (2, "error: INVALID_ARGUMENT: --ttl-ms: must be positive")
    code, _, err = await pq(a, "queue", "create", "r", "--job-ttl-ms", "-1")
    assert code == 2  # refused by pq itself
    assert "--job-ttl-ms" in err  # the flag, not the field config.job_ttl_ms


async def _dead_in_cli(address: str, job_id: int) -> dict[str, Any] | None:
    job: dict[str, Any] = await pq_json(address, "job", "q", str(job_id))
    return job if job["state"] == "dead" else None
