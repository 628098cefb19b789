"""Long polls wake on enqueue, on a delayed job coming due, and on lease expiry,
and end with an empty OK when the wait runs out (never DEADLINE_EXCEEDED).

Time bounds here are deliberately loose: they tell "woke on the event" from
"waited out a 30 s poll", not how fast anything is (that is bench/'s job).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import pytest

from pqueue.client import Client
from pqueue.core.effects import Effects
from pqueue.errors import InvalidArgumentError, NotFoundError, PermissionDeniedError
from pqueue.node.auth import Verifier, issue
from pqueue.node.server import NodeServer
from pqueue.v1 import log_pb2 as logpb
from pqueue.wire.roles import CONSUMER, PRODUCER
from tests.inproc import one_node

LONG_WAIT_MS = 30_000


async def _lease_in_background(client: Client, queue: str) -> asyncio.Task[list]:  # type: ignore[type-arg]
    task = asyncio.create_task(client.lease(queue, wait_ms=LONG_WAIT_MS))
    await asyncio.sleep(0.2)  # the poll is now parked on the server
    assert not task.done()
    return task


async def _parked(server: NodeServer, lines: dict[str, int]) -> None:
    """Wait until the node's waiter lines are ``lines`` (a loaded machine may
    take longer than a fixed sleep to park a poll)."""
    deadline = time.monotonic() + 10
    while server.node.long_polls.lines() != lines:
        assert time.monotonic() < deadline, server.node.long_polls.lines()
        await asyncio.sleep(0.02)


async def test_empty_wait_returns_ok_with_no_jobs(client: Client) -> None:
    await client.create_queue("q")
    started = time.monotonic()
    assert await client.lease("q", wait_ms=300) == []
    assert time.monotonic() - started >= 0.25


async def test_wakes_on_enqueue(client: Client) -> None:
    await client.create_queue("q")
    poll = await _lease_in_background(client, "q")
    r = await client.enqueue("q", b"now")
    [job] = await asyncio.wait_for(poll, timeout=10)
    assert job.job_id == r.job_id


async def test_wakes_when_a_delayed_job_comes_due(client: Client) -> None:
    r = await client.enqueue("q", b"later", delay_ms=500)
    poll = await _lease_in_background(client, "q")
    [job] = await asyncio.wait_for(poll, timeout=10)
    assert job.job_id == r.job_id


async def test_wakes_when_a_lease_expires(client: Client) -> None:
    r = await client.enqueue("q", b"x")
    [first] = await client.lease("q", lease_ms=500)
    poll = await _lease_in_background(client, "q")
    [again] = await asyncio.wait_for(poll, timeout=10)
    assert (again.job_id, again.attempt) == (r.job_id, 2)
    assert again.lease_id > first.lease_id


async def test_many_waiters_share_the_work_without_double_delivery(client: Client) -> None:
    await client.create_queue("q")
    polls = [asyncio.create_task(client.lease("q", wait_ms=3000)) for _ in range(5)]
    await asyncio.sleep(0.2)
    await client.enqueue("q", b"a")
    await client.enqueue("q", b"b")
    results = await asyncio.gather(*polls)
    got = sorted(j.job_id for jobs in results for j in jobs)
    assert got == [1, 2]


async def test_draining_ends_long_polls_empty(server: NodeServer, client: Client) -> None:
    await client.create_queue("q")
    poll = await _lease_in_background(client, "q")
    server.node.begin_drain()
    assert await asyncio.wait_for(poll, timeout=10) == []


async def test_one_job_wakes_one_waiter_not_all(server: NodeServer, client: Client) -> None:
    await client.create_queue("q")
    polls = [asyncio.create_task(client.lease("q", wait_ms=2000)) for _ in range(8)]
    await asyncio.sleep(0.3)
    applied: list[str | None] = []
    apply = server.node.apply

    def counting_apply(entry: logpb.LogEntry, respond: bool = True) -> Effects:
        applied.extend(command.WhichOneof("kind") for command in entry.commands)
        return apply(entry, respond)

    server.node.apply = counting_apply  # type: ignore[method-assign]
    await client.enqueue("q", b"one")
    results = await asyncio.gather(*polls)
    # One lease for one job in the log (however it was proposed: by the
    # woken waiter, or riding behind the enqueue): no herd of waiters each
    # proposing an empty lease.
    assert applied.count("lease") == 1
    assert sum(len(r) for r in results) == 1


async def test_timed_out_and_cancelled_waiters_leave_no_trace(
    server: NodeServer, client: Client
) -> None:
    await client.create_queue("q")
    assert await client.lease("q", wait_ms=100) == []
    poll = asyncio.create_task(client.lease("q", wait_ms=30_000))
    await asyncio.sleep(0.2)
    poll.cancel()
    await asyncio.sleep(0.2)
    assert server.node.long_polls.lines() == {}
    await client.enqueue("q", b"x")
    [job] = await client.lease("q", wait_ms=1000)  # nothing stranded it
    assert job.payload == b"x"


async def test_lease_without_a_wait_on_an_unknown_queue_is_not_found_without_a_log_entry(
    server: NodeServer, client: Client
) -> None:
    await client.create_queue("q")
    before = server.node.machine.applied_index
    with pytest.raises(NotFoundError, match="queue 'nope' not found"):
        await client.lease("nope")  # no wait: answered at once
    with pytest.raises(InvalidArgumentError):
        await client.lease("bad name!", wait_ms=5_000)  # the log's checks, in its order
    assert server.node.machine.applied_index == before  # no consensus round, no entry
    await client.enqueue("q", b"x")
    assert len(await client.lease("q", wait_ms=1_000)) == 1  # known queues still lease


async def test_a_long_poll_waits_for_a_queue_not_created_yet(
    server: NodeServer, client: Client
) -> None:
    before = server.node.machine.applied_index
    assert await client.lease("later", wait_ms=300) == []  # waited: empty, not NOT_FOUND
    assert server.node.machine.applied_index == before  # waiting wrote nothing
    poll = await _lease_in_background(client, "later")
    await _parked(server, {"later": 1})
    r = await client.enqueue("later", b"first")  # creates the queue: wakes the poll
    [job] = await asyncio.wait_for(poll, timeout=10)
    assert (job.job_id, job.payload) == (r.job_id, b"first")
    assert server.node.long_polls.lines() == {}


async def test_a_long_poll_on_a_deleted_queue_waits_for_it_to_come_back(
    server: NodeServer, client: Client
) -> None:
    await client.create_queue("q")
    poll = await _lease_in_background(client, "q")
    await client.delete_queue("q")
    await asyncio.sleep(0.1)
    assert not poll.done()
    r = await client.enqueue("q", b"again")
    [job] = await asyncio.wait_for(poll, timeout=10)
    assert job.job_id == r.job_id


async def test_waiting_for_a_queue_not_created_yet_still_checks_whose_it_is(
    tmp_path: Path,
) -> None:
    secret = b"w" * 32
    async with one_node(tmp_path, verifier=Verifier(secret)) as server:
        consumer = issue(secret, "acme", [CONSUMER], 600)
        producer = issue(secret, "acme", [PRODUCER], 600)
        async with (
            Client(server.address, token=consumer) as c,
            Client(server.address, token=producer) as p,
        ):
            with pytest.raises(PermissionDeniedError):
                await c.lease("bolt/later", wait_ms=5_000)  # another tenant's: at once
            with pytest.raises(PermissionDeniedError):
                await p.lease("later", wait_ms=5_000)  # no consumer role: at once
            poll = asyncio.create_task(c.lease("later", wait_ms=LONG_WAIT_MS))
            await _parked(server, {"acme/later": 1})  # its own, scoped
            await p.enqueue("later", b"x")
            [job] = await asyncio.wait_for(poll, timeout=10)
            assert job.payload == b"x"


async def test_pq_lease_with_a_wait_on_a_queue_not_created_yet_waits_for_its_job(
    server: NodeServer, client: Client
) -> None:
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "pqueue.cli", "--endpoint", server.address, "-o", "json"),
        *("lease", "newq", "--wait-ms", str(LONG_WAIT_MS)),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(20):
            while server.node.long_polls.lines() != {"newq": 1}:  # it waits, no NOT_FOUND
                assert proc.returncode is None
                await asyncio.sleep(0.05)
        sent = await client.enqueue("newq", b"hello")
        out, err = await asyncio.wait_for(proc.communicate(), 20)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err
    [job] = json.loads(out)
    assert job["job_id"] == sent.job_id
