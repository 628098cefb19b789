"""A waiting lease rides behind the enqueue that serves it: the leader
proposes the waiter's lease right after the enqueue, so group commit packs
both into one log entry (one entry for enqueue + lease, not two), and the
lease is still the log's own ``lease`` command: priorities, fencing, pauses
and refused enqueues behave as for any lease."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from pqueue.client import Client
from pqueue.core.effects import Effects
from pqueue.errors import LeaseLostError
from pqueue.node.server import NodeServer
from pqueue.v1 import log_pb2 as logpb
from pqueue.v1 import queue_pb2 as pb
from tests.consume_raw import RawStream

LONG_WAIT_MS = 30_000

Entries = list[list[str | None]]


@pytest.fixture
def entries(server: NodeServer) -> Entries:
    """The command kinds of each entry applied from now on."""
    seen: Entries = []
    apply = server.node.apply

    def recording_apply(entry: logpb.LogEntry, respond: bool = True) -> Effects:
        seen.append([command.WhichOneof("kind") for command in entry.commands])
        return apply(entry, respond)

    server.node.apply = recording_apply  # type: ignore[method-assign]
    return seen


async def parked(server: NodeServer, queue: str, n: int = 1) -> None:
    """Until ``n`` long polls wait on ``queue``."""
    for _ in range(500):
        if server.node.long_polls.lines().get(queue, 0) >= n:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{n} long poll(s) never parked on {queue!r}")


def leases(seen: Entries) -> int:
    return sum(kinds.count("lease") for kinds in seen)


@pytest.mark.parametrize("batched", [True, False], ids=["submit", "enqueue-batch"])
async def test_a_waiting_lease_lands_in_the_enqueues_entry(
    server: NodeServer, client: Client, entries: Entries, batched: bool
) -> None:
    await client.create_queue("q")
    poll = asyncio.create_task(client.lease("q", wait_ms=LONG_WAIT_MS, lease_ms=60_000))
    await parked(server, "q")
    entries.clear()
    if batched:  # Submit: QueueNode.propose_many
        job_id = (await client.enqueue("q", b"x")).job_id
    else:  # EnqueueBatch: QueueNode.propose_indexed
        [r] = await client.enqueue_batch("q", [pb.JobSpec(payload=b"x")])
        job_id = r.job_id
    [job] = await asyncio.wait_for(poll, timeout=10)
    assert job.job_id == job_id
    # One entry: the enqueue, then the lease that found its job.
    assert entries == [["enqueue", "lease"]]
    # Fenced like any lease: its own lease id acks; a made-up one does not.
    with pytest.raises(LeaseLostError):
        await client.ack("q", job.job_id, job.lease_id + 1)
    await client.ack("q", job.job_id, job.lease_id)
    assert server.node.long_polls.lines() == {}


async def test_the_riding_lease_takes_the_most_urgent_job(
    server: NodeServer, client: Client, entries: Entries
) -> None:
    await client.create_queue("q")
    poll = asyncio.create_task(client.lease("q", wait_ms=LONG_WAIT_MS))
    await parked(server, "q")
    entries.clear()
    # Enqueued first but less urgent (lower numbers are served first).
    later, urgent = await client.enqueue_batch(
        "q", [pb.JobSpec(payload=b"later", priority=9), pb.JobSpec(payload=b"urgent", priority=1)]
    )
    [job] = await asyncio.wait_for(poll, timeout=10)
    assert job.job_id == urgent.job_id  # the lease's own order, as in any lease
    assert entries == [["enqueue", "lease"]]
    [rest] = await client.lease("q")
    assert rest.job_id == later.job_id


async def test_waiters_ride_in_line_order_and_as_many_as_the_jobs(
    server: NodeServer, client: Client, entries: Entries
) -> None:
    await client.create_queue("q")
    polls = []
    for _ in range(3):
        polls.append(asyncio.create_task(client.lease("q", wait_ms=3_000)))
        await parked(server, "q", len(polls))
    entries.clear()
    a, b = await client.enqueue_batch("q", [pb.JobSpec(payload=b"a"), pb.JobSpec(payload=b"b")])
    first, second, third = await asyncio.gather(*polls)
    assert [j.job_id for j in first + second] == [a.job_id, b.job_id]  # no job twice
    assert third == []  # the third waited on, and its wait ran out
    assert entries[0] == ["enqueue", "lease", "lease"]
    assert leases(entries) == 2  # nobody woke to propose an empty lease


async def test_a_duplicate_enqueue_leaves_the_waiter_waiting_in_its_place(
    server: NodeServer, client: Client, entries: Entries
) -> None:
    await client.create_queue("q")
    await client.enqueue("q", b"first", idempotency_key="k")
    [taken] = await client.lease("q", lease_ms=60_000)
    first = asyncio.create_task(client.lease("q", wait_ms=LONG_WAIT_MS))
    await parked(server, "q", 1)
    second = asyncio.create_task(client.lease("q", wait_ms=LONG_WAIT_MS))
    await parked(server, "q", 2)
    entries.clear()
    dup = await client.enqueue("q", b"again", idempotency_key="k")
    assert dup.duplicate
    assert dup.job_id == taken.job_id
    # Its lease rode along and found nothing: back in line, at the front.
    await parked(server, "q", 2)
    assert leases(entries) == 1
    fresh = await client.enqueue("q", b"new")
    [job] = await asyncio.wait_for(first, timeout=10)
    assert job.job_id == fresh.job_id
    assert not second.done()
    second.cancel()
    await asyncio.gather(second, return_exceptions=True)


async def test_a_paused_queue_lets_no_lease_ride(
    server: NodeServer, client: Client, entries: Entries
) -> None:
    await client.create_queue("q")
    poll = asyncio.create_task(client.lease("q", wait_ms=LONG_WAIT_MS))
    await parked(server, "q")
    await client.pause_queue("q")
    entries.clear()
    r = await client.enqueue("q", b"x")
    await asyncio.sleep(0.1)
    assert not poll.done()
    assert leases(entries) == 0  # no lease proposed for a paused queue
    await client.resume_queue("q")
    [job] = await asyncio.wait_for(poll, timeout=10)
    assert job.job_id == r.job_id


async def test_a_consume_streams_lease_lands_in_the_enqueues_entry(
    server: NodeServer, client: Client, entries: Entries, raw: Callable[[], RawStream]
) -> None:
    await client.create_queue("q")
    stream = raw()
    await stream.start("q", credits=5, consumer_id="w1", lease_ms=60_000)
    await parked(server, "q")
    entries.clear()
    r = await client.enqueue_batch("q", [pb.JobSpec(payload=b"%d" % i) for i in range(3)])
    jobs = await stream.take(3)
    assert [j.job_id for j in jobs] == [x.job_id for x in r]
    assert entries[0] == ["enqueue", "lease"]  # one lease for the three, in one entry
    assert leases(entries) == 1
