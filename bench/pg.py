"""The PostgreSQL ``SKIP LOCKED`` queues the benches set pqueue beside.

``Pgmq``: the end-to-end bench's queue (``make bench``), laid out as pgmq
lays out a queue and used as River and pgmq users write it: one statement
(one transaction) per enqueue, a consumer's fetch-and-lock in one
transaction (``FOR UPDATE SKIP LOCKED``, the row hidden for 30 s, its read
count bumped) and its completion, a ``DELETE`` fenced by that read count, in
another. Producers ring a ``NOTIFY`` in the enqueue's statement; idle
consumers wait for it (River's wake-up) or poll (pgmq's ``read_with_poll``).

``PostgresBackend``: the batched lease+ack queue ``make bench-shared`` uses.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import asyncpg

DEFAULT_PG_DSN = "postgresql://postgres@127.0.0.1:5432/test"
#: How long a fetched job stays hidden (pgmq's visibility timeout; our lease).
VISIBILITY_S = 30


class Pgmq:
    """The SQL of one queue table; ``channel`` is its NOTIFY channel."""

    def __init__(self, table: str) -> None:
        if not table.replace("_", "").isalnum():
            raise ValueError(f"not a plain table name: {table!r}")
        self.table = table
        self.channel = f"{table}_ready"

    def create(self) -> str:
        t = self.table
        return f"""
            DROP TABLE IF EXISTS {t};
            CREATE TABLE {t} (
                msg_id bigserial PRIMARY KEY,
                read_ct int NOT NULL DEFAULT 0,
                enqueued_at timestamptz NOT NULL DEFAULT now(),
                vt timestamptz NOT NULL DEFAULT now(),
                message bytea NOT NULL
            );
            CREATE INDEX ON {t} (vt);
        """

    def drop(self) -> str:
        return f"DROP TABLE IF EXISTS {self.table}"

    def send(self, notify: bool) -> str:
        """One job: ``$1`` the message; its id."""
        ring = f", pg_notify('{self.channel}', '')" if notify else ""
        return (
            f"WITH j AS (INSERT INTO {self.table} (message) VALUES ($1) RETURNING msg_id) "
            f"SELECT msg_id{ring} FROM j"
        )

    def send_batch(self, notify: bool) -> str:
        """Many jobs in one statement: ``$1`` the messages; their ids."""
        ring = f", pg_notify('{self.channel}', '')" if notify else ""
        return (
            f"WITH j AS (INSERT INTO {self.table} (message) "
            f"SELECT unnest($1::bytea[]) RETURNING msg_id) SELECT msg_id{ring} FROM j"
        )

    def read(self) -> str:
        """Fetch and lock up to ``$1`` visible jobs: (msg_id, read_ct, message)."""
        t = self.table
        return f"""
            WITH cte AS (
                SELECT msg_id FROM {t}
                WHERE vt <= clock_timestamp()
                ORDER BY msg_id
                LIMIT $1
                FOR UPDATE SKIP LOCKED
            )
            UPDATE {t} m
            SET vt = clock_timestamp() + interval '{VISIBILITY_S} seconds',
                read_ct = m.read_ct + 1
            FROM cte WHERE m.msg_id = cte.msg_id
            RETURNING m.msg_id, m.read_ct, m.message
        """

    def delete(self) -> str:
        """Complete one job, fenced: ``$1`` msg_id, ``$2`` the read count it was fetched at."""
        return f"DELETE FROM {self.table} WHERE msg_id = $1 AND read_ct = $2"

    def delete_batch(self) -> str:
        """Complete many, each fenced: ``$1`` ids, ``$2`` read counts."""
        return (
            f"DELETE FROM {self.table} t USING unnest($1::bigint[], $2::int[]) AS d(id, ct) "
            "WHERE t.msg_id = d.id AND t.read_ct = d.ct"
        )

    def count(self) -> str:
        return f"SELECT count(*) FROM {self.table}"


def deleted(status: str) -> int:
    """Rows a ``DELETE`` removed, from its command tag (``DELETE 3``)."""
    return int(status.rsplit(" ", 1)[-1])


class PostgresBackend:
    """A ``SKIP LOCKED`` queue with batched lease and ack (``make bench-shared``)."""

    name = "postgres SKIP LOCKED"

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def reset(self) -> None:
        await self.pool.execute(
            """
            DROP TABLE IF EXISTS pq_bench_jobs;
            CREATE TABLE pq_bench_jobs (
                id bigserial PRIMARY KEY,
                priority int NOT NULL DEFAULT 0,
                payload bytea NOT NULL,
                ready_at timestamptz NOT NULL DEFAULT now(),
                leased_until timestamptz
            );
            CREATE INDEX ON pq_bench_jobs (priority, id) WHERE leased_until IS NULL;
            """
        )

    async def enqueue(self, payloads: Sequence[bytes]) -> None:
        await self.pool.execute(
            "INSERT INTO pq_bench_jobs (payload) SELECT unnest($1::bytea[])", list(payloads)
        )

    async def lease(self, n: int) -> list[tuple[int, int, bytes]]:
        """(job id, lease token, payload)"""
        rows = await self.pool.fetch(
            """
            UPDATE pq_bench_jobs SET leased_until = now() + interval '30 seconds'
            WHERE id IN (
                SELECT id FROM pq_bench_jobs
                WHERE leased_until IS NULL AND ready_at <= now()
                ORDER BY priority, id
                FOR UPDATE SKIP LOCKED LIMIT $1
            )
            RETURNING id, payload
            """,
            n,
        )
        if not rows:
            await asyncio.sleep(0.005)  # what a poller does between empty polls
        return [(r["id"], 0, r["payload"]) for r in rows]

    async def ack(self, leases: Sequence[tuple[int, int]]) -> None:
        await self.pool.execute(
            "DELETE FROM pq_bench_jobs WHERE id = ANY($1::bigint[])", [i for i, _ in leases]
        )
