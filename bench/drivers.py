"""Each system's producers and consumers, as its users write them.

- pqueue: ``Client.enqueue`` / ``enqueue_batch``; single jobs are consumed by
  ``Worker`` (a no-op handler that records the job), batches by
  ``Client.lease(max_jobs=100)`` and one ``ack_many``.
- PostgreSQL: ``bench.pg.Pgmq`` through asyncpg pools (one statement, one
  transaction, per enqueue, per fetch-and-lock and per completion).
- NATS JetStream: ``js.publish`` (waits for the publish ack) or 100
  ``publish_async`` and their acks; a pull subscription per consumer task on
  one durable consumer, explicit acks confirmed by the server (``ack_sync``).

Run inside the agent processes (``bench.agent``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import asyncpg
import nats
import nats.errors
from nats.aio.client import Client as NatsConnection
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from bench.pg import Pgmq, deleted
from bench.spec import CellSpec
from pqueue.client import Client, job_spec
from pqueue.errors import LeaseLostError
from pqueue.v1 import queue_pb2 as pb
from pqueue.worker import Worker, WorkerConfig

#: The handler's record of one delivery: (job id, lease id, payload).
OnJob = Callable[[int, int, bytes], None]
LEASE_MS = 30_000
#: How long an idle fetch waits before asking again (long poll, pull expiry).
IDLE_WAIT_S = 1.0


@dataclass
class Settled:
    """A consumer's completions, as the system answered them."""

    acks_ok: int = 0
    acks_refused: int = 0
    errors: int = 0
    first_error: str = ""

    def error(self, exc: BaseException) -> None:
        self.errors += 1
        self.first_error = self.first_error or f"{type(exc).__name__}: {exc}"


class Producer(Protocol):
    async def open(self) -> list[int]:
        """Connect; the server-side process ids serving us, where the system has them."""
        ...

    async def enqueue(self, client: int, payloads: list[bytes]) -> list[int]:
        """Enqueue on connection ``client`` (modulo their number); the jobs' ids."""
        ...

    async def close(self) -> None: ...


class Consumer(Protocol):
    settled: Settled

    async def open(self) -> list[int]: ...

    async def run(self, on_job: OnJob) -> None:
        """Consume until ``stop``."""
        ...

    def stop(self) -> None: ...

    async def close(self) -> None: ...


def producer_for(spec: CellSpec) -> Producer:
    kinds: dict[str, Callable[[CellSpec], Producer]] = {
        "pqueue": PqProducer,
        "postgres": PgProducer,
        "nats": NatsProducer,
    }
    return kinds[spec.system](spec)


def consumer_for(spec: CellSpec) -> Consumer:
    kinds: dict[str, Callable[[CellSpec], Consumer]] = {
        "pqueue": PqConsumer,
        "postgres": PgConsumer,
        "nats": NatsConsumer,
    }
    return kinds[spec.system](spec)


# ------------------------------------------------------------------ pqueue


async def _pq_clients(spec: CellSpec, n: int) -> list[Client]:
    clients = [
        Client(
            spec.target,
            timeout_s=60,
            look_aside=spec.look_aside,
            stream_submits=spec.stream_submits,
        )
        for _ in range(n)
    ]
    # Connected before the clock starts (a read through the same channel).
    await asyncio.gather(*(c.stats(spec.queue) for c in clients))
    return clients


class PqProducer:
    def __init__(self, spec: CellSpec) -> None:
        self.spec = spec
        self.clients: list[Client] = []

    async def open(self) -> list[int]:
        self.clients = await _pq_clients(self.spec, self.spec.producer_clients)
        return []

    async def enqueue(self, client: int, payloads: list[bytes]) -> list[int]:
        c = self.clients[client % len(self.clients)]
        if len(payloads) == 1:
            return [(await c.enqueue(self.spec.queue, payloads[0])).job_id]
        done = await c.enqueue_batch(self.spec.queue, [job_spec(p) for p in payloads])
        return [r.job_id for r in done]

    async def close(self) -> None:
        for c in self.clients:
            await c.close()


class PqConsumer:
    """``Worker``s for single jobs (the slots split over the clients); for
    batches, tasks leasing up to ``batch`` jobs and acking them in one call."""

    def __init__(self, spec: CellSpec) -> None:
        self.spec = spec
        self.settled = Settled()
        self.clients: list[Client] = []
        self.workers: list[Worker] = []
        self.stopping = False

    async def open(self) -> list[int]:
        self.clients = await _pq_clients(self.spec, self.spec.consumer_clients)
        return []

    async def run(self, on_job: OnJob) -> None:
        if self.spec.batch == 1:
            await self._workers(on_job)
        else:
            tasks = range(self.spec.consumers)
            await asyncio.gather(*(self._leaser(k, on_job) for k in tasks))

    async def _workers(self, on_job: OnJob) -> None:
        async def handler(job: pb.LeasedJob) -> None:
            on_job(job.job_id, job.lease_id, job.payload)

        slots = max(1, self.spec.consumers // len(self.clients))
        config = WorkerConfig(concurrency=slots, lease_ms=LEASE_MS)
        self.workers = [Worker(c, self.spec.queue, handler, config=config) for c in self.clients]
        if self.stopping:
            return
        await asyncio.gather(*(w.run() for w in self.workers))
        self.settled.acks_ok = sum(w.stats.acked for w in self.workers)
        self.settled.acks_refused = sum(w.stats.lost for w in self.workers)
        self.settled.errors += sum(w.stats.failed for w in self.workers)

    async def _leaser(self, k: int, on_job: OnJob) -> None:
        c = self.clients[k % len(self.clients)]
        queue = self.spec.queue
        while not self.stopping:
            jobs: list[pb.LeasedJob] = []
            try:
                jobs = await c.lease(
                    queue,
                    max_jobs=self.spec.batch,
                    lease_ms=LEASE_MS,
                    wait_ms=int(IDLE_WAIT_S * 1000),
                )
                for job in jobs:
                    on_job(job.job_id, job.lease_id, job.payload)
                if jobs:
                    acked = await c.ack_many(queue, [(j.job_id, j.lease_id) for j in jobs])
                    self.settled.acks_ok += acked  # not `+= await`: other tasks add meanwhile
            except LeaseLostError:
                self.settled.acks_refused += len(jobs)
            except Exception as exc:
                self.settled.error(exc)
                await asyncio.sleep(0.05)

    def stop(self) -> None:
        self.stopping = True
        for w in self.workers:
            w.stop()

    async def close(self) -> None:
        for c in self.clients:
            await c.close()


# -------------------------------------------------------------- PostgreSQL


async def _pg_pool(spec: CellSpec, tasks: int) -> tuple[asyncpg.Pool, list[int]]:
    """A pool of ``min(tasks, pg_max_conns)`` connections, all open; their backends' pids."""
    n = max(1, min(tasks, spec.pg_max_conns))
    pool = await asyncpg.create_pool(spec.target, min_size=n, max_size=n)
    held = [await pool.acquire() for _ in range(n)]
    pids = [c.get_server_pid() for c in held]
    for c in held:
        await pool.release(c)
    return pool, pids


class PgProducer:
    def __init__(self, spec: CellSpec) -> None:
        self.spec = spec
        self.q = Pgmq(spec.queue)
        notify = spec.pg_wakeup == "notify"
        self.send, self.send_batch = self.q.send(notify), self.q.send_batch(notify)
        self.pool: asyncpg.Pool | None = None

    async def open(self) -> list[int]:
        self.pool, pids = await _pg_pool(self.spec, self.spec.producers)
        return pids

    async def enqueue(self, client: int, payloads: list[bytes]) -> list[int]:
        assert self.pool is not None
        if len(payloads) == 1:
            return [int(await self.pool.fetchval(self.send, payloads[0]))]
        return [int(r[0]) for r in await self.pool.fetch(self.send_batch, payloads)]

    async def close(self) -> None:
        if self.pool is not None:
            await self.pool.close()


class PgConsumer:
    """Tasks that fetch-and-lock, run the handler, then complete (fenced); idle,
    they wait for a producer's NOTIFY (one wakes one task) or poll."""

    def __init__(self, spec: CellSpec) -> None:
        self.spec = spec
        self.q = Pgmq(spec.queue)
        self.settled = Settled()
        self.pool: asyncpg.Pool | None = None
        self.listener: asyncpg.Connection | None = None
        self.bell: asyncio.Queue[None] = asyncio.Queue()
        self.stopping = False

    async def open(self) -> list[int]:
        self.pool, pids = await _pg_pool(self.spec, self.spec.consumers)
        if self.spec.pg_wakeup == "notify":
            self.listener = await asyncpg.connect(self.spec.target)
            await self.listener.add_listener(self.q.channel, self._ring)
            pids.append(self.listener.get_server_pid())
        return pids

    def _ring(self, *_: object) -> None:
        if self.bell.qsize() < self.spec.consumers:  # a wake-up per idle task at most
            self.bell.put_nowait(None)

    async def _idle(self) -> None:
        if self.spec.pg_wakeup != "notify":
            await asyncio.sleep(self.spec.pg_poll_ms / 1000)
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.bell.get(), IDLE_WAIT_S)

    async def run(self, on_job: OnJob) -> None:
        await asyncio.gather(*(self._loop(on_job) for _ in range(self.spec.consumers)))

    async def _loop(self, on_job: OnJob) -> None:
        assert self.pool is not None
        read, delete, delete_batch = self.q.read(), self.q.delete(), self.q.delete_batch()
        while not self.stopping:
            try:
                rows = await self.pool.fetch(read, self.spec.batch)
                if not rows:
                    await self._idle()
                    continue
                for r in rows:
                    on_job(r["msg_id"], r["read_ct"], r["message"])
                if len(rows) == 1:
                    r = rows[0]
                    status = await self.pool.execute(delete, r["msg_id"], r["read_ct"])
                else:
                    ids = [r["msg_id"] for r in rows]
                    status = await self.pool.execute(
                        delete_batch, ids, [r["read_ct"] for r in rows]
                    )
                n = deleted(status)
                self.settled.acks_ok += n
                self.settled.acks_refused += len(rows) - n
            except Exception as exc:
                self.settled.error(exc)
                await asyncio.sleep(0.05)

    def stop(self) -> None:
        self.stopping = True
        for _ in range(self.spec.consumers):
            self.bell.put_nowait(None)

    async def close(self) -> None:
        if self.listener is not None:
            await self.listener.close()
        if self.pool is not None:
            await self.pool.close()


# -------------------------------------------------------------------- NATS


async def _nats(spec: CellSpec, n: int) -> list[NatsConnection]:
    servers = spec.target.split(",")
    return list(await asyncio.gather(*(nats.connect(servers=servers) for _ in range(n))))


def subject(stream: str) -> str:
    return f"{stream}.jobs"


class NatsProducer:
    def __init__(self, spec: CellSpec) -> None:
        self.spec = spec
        self.conns: list[NatsConnection] = []
        self.js: list[JetStreamContext] = []
        self.subject = subject(spec.queue)

    async def open(self) -> list[int]:
        self.conns = await _nats(self.spec, self.spec.producer_clients)
        self.js = [c.jetstream(timeout=60) for c in self.conns]
        return []

    async def enqueue(self, client: int, payloads: list[bytes]) -> list[int]:
        js = self.js[client % len(self.js)]
        if len(payloads) == 1:
            return [(await js.publish(self.subject, payloads[0])).seq]
        acks = [await js.publish_async(self.subject, p) for p in payloads]
        return [a.seq for a in await asyncio.gather(*acks)]

    async def close(self) -> None:
        for c in self.conns:
            await c.close()


class NatsConsumer:
    DURABLE = "workers"

    def __init__(self, spec: CellSpec) -> None:
        self.spec = spec
        self.settled = Settled()
        self.conns: list[NatsConnection] = []
        self.subs: list[JetStreamContext.PullSubscription] = []
        self.stopping = False

    async def open(self) -> list[int]:
        self.conns = await _nats(self.spec, self.spec.consumer_clients)
        js = [c.jetstream(timeout=60) for c in self.conns]
        self.subs = [
            await js[k % len(js)].pull_subscribe_bind(durable=self.DURABLE, stream=self.spec.queue)
            for k in range(self.spec.consumers)
        ]
        return []

    async def run(self, on_job: OnJob) -> None:
        await asyncio.gather(*(self._loop(sub, on_job) for sub in self.subs))

    async def _loop(self, sub: JetStreamContext.PullSubscription, on_job: OnJob) -> None:
        while not self.stopping:
            try:
                msgs = await sub.fetch(self.spec.batch, timeout=IDLE_WAIT_S)
            except nats.errors.TimeoutError:
                continue
            except Exception as exc:
                self.settled.error(exc)
                await asyncio.sleep(0.05)
                continue
            for m in msgs:
                md = m.metadata
                on_job(md.sequence.stream, md.num_delivered, m.data)
            await self._ack(msgs)

    async def _ack(self, msgs: list[Msg]) -> None:
        results = await asyncio.gather(
            *(m.ack_sync(timeout=60) for m in msgs), return_exceptions=True
        )
        for r in results:
            if isinstance(r, BaseException):
                self.settled.error(r)
            else:
                self.settled.acks_ok += 1

    def stop(self) -> None:
        self.stopping = True

    async def close(self) -> None:
        for c in self.conns:
            await c.close()
