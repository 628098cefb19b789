"""``Consume``, the streaming consumer, against real nodes (one, and a cluster of three)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
import pytest
from google.protobuf.message import Message
from prometheus_client import CollectorRegistry

from pqueue.client import Client
from pqueue.errors import (
    InvalidArgumentError,
    LeaseLostError,
    NotLeaderError,
    NotTakenError,
    PermissionDeniedError,
    PQueueError,
    UnauthenticatedError,
    UnavailableError,
)
from pqueue.node.auth import Verifier, issue
from pqueue.node.server import NodeServer
from pqueue.v1 import log_pb2 as logpb
from pqueue.v1 import queue_pb2 as pb
from pqueue.wire.keys import FORWARDED_KEY, authorization
from pqueue.wire.status import from_op_status
from tests.consume_raw import RawStream, ack
from tests.inproc import Cluster, node_tokens, one_node

SECRET = b"c" * 32


def token(tenant: str, *roles: str) -> str:
    return issue(SECRET, tenant, roles, 600)


async def until(
    what: str, check: Callable[[], bool | Awaitable[bool]], timeout_s: float = 10
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = check()
        if result if isinstance(result, bool) else await result:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


async def stats(client: Client, queue: str) -> tuple[int, int, int]:
    [s] = await client.stats(queue)
    return s.ready, s.leased, s.acked_total


async def test_jobs_are_pushed_within_the_credits_never_more(
    server: NodeServer, client: Client, raw: Callable[..., RawStream]
) -> None:
    await client.enqueue_batch("q", [pb.JobSpec(payload=b"%d" % i) for i in range(10)])
    stream = raw()
    await stream.start("q", credits=3, consumer_id="w1", lease_ms=60_000)
    first = await stream.take(3)
    assert len(stream.responses[0].jobs) == 3  # one lease, pushed in one response
    assert [j.payload for j in first] == [b"0", b"1", b"2"]
    assert all(j.queue == "q" and j.attempt == 1 and j.lease_id for j in first)
    # Its credits used up, the stream leases nothing more: a settle's round
    # trip later (the node read everything sent before it), still three.
    [extended] = await stream.settle(
        [pb.Operation(extend=pb.ExtendLeaseRequest(queue="q", job_id=first[0].job_id,
                                                   lease_id=first[0].lease_id))]
    )  # fmt: skip
    assert extended.status.code == 0
    assert extended.extend.lease_expires_at_ms
    assert await stats(client, "q") == (7, 3, 0)
    job = await client.get_job("q", first[0].job_id)
    assert job.consumer_id == "w1"
    # Four more credits, four more jobs (and the acks of the first three on the way).
    results = await stream.settle([ack("q", j) for j in first], credits=4)
    assert [r.status.code for r in results] == [0, 0, 0]
    assert [j.payload for j in await stream.take(4)] == [b"3", b"4", b"5", b"6"]
    await stream.settle([])  # nothing to settle: a round trip all the same
    assert await stats(client, "q") == (3, 4, 3)


async def test_credits_beyond_a_thousand_end_the_stream(
    client: Client, raw: Callable[..., RawStream]
) -> None:
    await client.create_queue("q")
    stream = raw()
    await stream.start("q", credits=600)
    await stream.write(credits=400)  # a thousand outstanding: fine
    await stream.write(credits=1)
    error = await stream.ended()
    assert isinstance(error, InvalidArgumentError)
    assert error.field == "credits"


async def test_settles_answer_each_operation_alone(
    client: Client, raw: Callable[..., RawStream]
) -> None:
    await client.create_queue("q", pb.QueueConfig(min_priority=0, max_priority=9))
    await client.enqueue_batch("q", [pb.JobSpec(payload=b"a"), pb.JobSpec(payload=b"b")])
    stream = raw()
    await stream.start("q", credits=2)
    a, b = await stream.take(2)
    results = await stream.settle(
        [
            ack("q", a),
            ack("q", a),  # again: the lease is gone now
            ack("q", b, lease_id=b.lease_id + 99),  # a lease id never given
            pb.Operation(nack=pb.NackRequest(queue="q", job_id=b.job_id, lease_id=b.lease_id,
                                             release=True)),
            pb.Operation(enqueue=pb.EnqueueRequest(queue="q", job=pb.JobSpec(priority=99))),
            pb.Operation(),
        ]
    )  # fmt: skip
    assert [r.status.code for r in results] == [0, 10, 10, 0, 3, 3]
    assert results[0].ack.acked == 1
    stale = from_op_status(results[1].status)
    assert isinstance(stale, LeaseLostError)
    assert stale.job_id == a.job_id
    # The very error the single call gives.
    with pytest.raises(LeaseLostError) as single:
        await client.ack("q", a.job_id, a.lease_id)
    assert stale.message == single.value.message
    bad = from_op_status(results[4].status)
    with pytest.raises(InvalidArgumentError) as single_bad:
        await client.enqueue("q", b"", priority=99)
    assert isinstance(bad, InvalidArgumentError)
    assert (bad.field, bad.reason) == (single_bad.value.field, single_bad.value.reason)
    assert results[3].nack.state == pb.JOB_STATE_READY
    # The stream goes on: the released job comes back on a new credit.
    await stream.write(credits=1)
    [again] = await stream.take(1)
    assert (again.job_id, again.attempt) == (b.job_id, 1)  # a release is not an attempt


async def test_a_settle_is_answered_while_the_stream_waits_for_jobs(
    server: NodeServer, client: Client, raw: Callable[..., RawStream]
) -> None:
    await client.enqueue("q", b"x")
    [job] = await client.lease("q")
    stream = raw()
    await stream.start("q", credits=5)  # nothing ready: its lease parks
    await until("the stream to park", lambda: server.node.waiting_long_polls == 1)
    [result] = await stream.settle([ack("q", job)])
    assert result.status.code == 0  # not behind the parked lease
    assert server.node.waiting_long_polls == 1  # which still waits
    await client.enqueue("q", b"y")
    [pushed] = await stream.take(1)
    assert pushed.payload == b"y"


@pytest.mark.parametrize(
    ("first", "later", "kind", "field"),
    [
        (pb.ConsumeRequest(credits=1), None, InvalidArgumentError, "start"),
        (pb.ConsumeRequest(start=pb.ConsumeStart(queue="q", lease_ms=-1)), None,
         InvalidArgumentError, "start.lease_ms"),
        (pb.ConsumeRequest(start=pb.ConsumeStart(queue="bad name!")), None,
         InvalidArgumentError, "start.queue"),
        (pb.ConsumeRequest(start=pb.ConsumeStart(queue="q", consumer_id="x" * 2000)), None,
         InvalidArgumentError, "start.consumer_id"),
        (pb.ConsumeRequest(start=pb.ConsumeStart(queue="q"), credits=1001), None,
         InvalidArgumentError, "credits"),
        (pb.ConsumeRequest(start=pb.ConsumeStart(queue="q")),
         pb.ConsumeRequest(start=pb.ConsumeStart(queue="q")), InvalidArgumentError, "start"),
        (pb.ConsumeRequest(start=pb.ConsumeStart(queue="q")),
         pb.ConsumeRequest(settle=[pb.Operation()] * 1001, settle_id=1),
         InvalidArgumentError, "settle"),
    ],
)  # fmt: skip
async def test_a_bad_request_ends_the_stream_with_its_status_and_changes_nothing(
    client: Client,
    raw: Callable[..., RawStream],
    first: pb.ConsumeRequest,
    later: pb.ConsumeRequest | None,
    kind: type[PQueueError],
    field: str | None,
) -> None:
    await client.enqueue("q", b"x")
    stream = raw()
    await stream.write(**{f.name: v for f, v in first.ListFields()})
    if later is not None:
        await stream.write(**{f.name: v for f, v in later.ListFields()})
    error = await stream.ended()
    assert isinstance(error, kind), error
    if field is not None:
        assert isinstance(error, InvalidArgumentError)
        assert error.field == field
    assert stream.jobs == []
    assert await stats(client, "q") == (1, 0, 0)


async def test_a_stream_on_a_queue_not_created_yet_waits_for_its_first_job(
    server: NodeServer, client: Client, raw: Callable[..., RawStream]
) -> None:
    stream = raw()
    await stream.start("later", credits=1)
    await until("the stream parked", lambda: server.node.long_polls.lines() == {"later": 1})
    r = await client.enqueue("later", b"first")  # creates the queue, wakes the stream
    [job] = await stream.take(1)
    assert (job.job_id, job.payload) == (r.job_id, b"first")
    # The push says which entry leased it, for reads that must see the lease:
    # the enqueue's own entry (the stream's lease rode behind it) or a later one.
    [pushed] = [p for p in stream.responses if p.jobs]
    assert pushed.log_index >= r.log_index
    assert server.node.machine.applied_index >= pushed.log_index
    assert (await client.get_job("later", r.job_id)).state == pb.JOB_STATE_LEASED


async def test_with_auth_a_stream_needs_the_consumer_role_on_its_own_queues(
    tmp_path: Path,
) -> None:
    async with one_node(tmp_path, verifier=Verifier(SECRET)) as server:
        async with Client(server.address, token=token("acme", "producer")) as producer:
            await producer.enqueue("jobs", b"x")

        async def refused(metadata: tuple[tuple[str, str], ...], queue: str) -> PQueueError:
            stream = RawStream(server.address, metadata)
            try:
                await stream.start(queue, credits=1)
                return await stream.ended()
            finally:
                await stream.close()

        consumer = authorization(token("acme", "consumer"))
        assert isinstance(await refused((), "jobs"), UnauthenticatedError)
        assert isinstance(
            await refused(authorization(token("acme", "producer")), "jobs"), PermissionDeniedError
        )
        assert isinstance(await refused(consumer, "bolt/jobs"), PermissionDeniedError)
        # Waiting for a queue not created yet is no way around that.
        assert isinstance(await refused(consumer, "bolt/later"), PermissionDeniedError)
        stream = RawStream(server.address, consumer)
        try:
            await stream.start("jobs", credits=1)
            [job] = await stream.take(1)
            assert (job.queue, job.tenant, job.payload) == ("jobs", "acme", b"x")
            [done] = await stream.settle([ack("jobs", job)])
            assert done.status.code == 0
        finally:
            await stream.close()


Order = list[tuple[int, int, str, bytes]]


async def test_a_stream_ends_when_its_token_lapses(tmp_path: Path) -> None:
    async with one_node(tmp_path, verifier=Verifier(SECRET, leeway_s=0)) as server:
        async with Client(server.address, token=token("ops", "admin")) as ops:
            await ops.create_queue("acme/jobs")
        brief = issue(SECRET, "acme", ["consumer"], 2)  # expires while the stream waits
        stream = RawStream(server.address, authorization(brief))
        try:
            await stream.start("jobs", credits=5)
            await until("the stream to park", lambda: server.node.waiting_long_polls == 1)
            error = await stream.ended()
            assert isinstance(error, UnauthenticatedError), error
            assert "expired" in error.message
            await until("its waiter to leave", lambda: server.node.long_polls.lines() == {})
        finally:
            await stream.close()


async def _drain_in_order(
    take: Callable[[int], Awaitable[list[pb.LeasedJob]]],
    settle: Callable[[list[pb.LeasedJob]], Awaitable[None]],
    total: int,
    per_round: int,
) -> Order:
    out: Order = []
    while len(out) < total:
        jobs = await take(min(per_round, total - len(out)))
        out += [(j.job_id, j.priority, j.tenant, j.payload) for j in jobs]
        await settle(jobs)
    return out


async def _streamed(address: str, tok: str, total: int, per_round: int) -> Order:
    """Drain ``render`` on a stream: grant a round's credits, ack what came."""
    stream = RawStream(address, authorization(tok))
    try:
        await stream.start("render")

        async def take(n: int) -> list[pb.LeasedJob]:
            await stream.write(credits=n)
            return await stream.take(n)

        async def settle(jobs: list[pb.LeasedJob]) -> None:
            results = await stream.settle([ack("render", j) for j in jobs])
            assert all(r.status.code == 0 for r in results)

        return await _drain_in_order(take, settle, total, per_round)
    finally:
        await stream.close()


async def _leased(address: str, tok: str, total: int, per_round: int) -> Order:
    """Drain ``render`` by Lease calls of a round's size, acking each round."""
    async with Client(address, token=tok) as c:

        async def lease(n: int) -> list[pb.LeasedJob]:
            return await c.lease("render", max_jobs=n)

        async def ack_all(jobs: list[pb.LeasedJob]) -> None:
            await c.ack_many("render", [(j.job_id, j.lease_id) for j in jobs])

        return await _drain_in_order(lease, ack_all, total, per_round)


@pytest.mark.parametrize("per_round", [1, 7])
async def test_order_and_fair_shares_are_those_of_lease(tmp_path: Path, per_round: int) -> None:
    """Twin nodes given the same jobs: one drained by a stream, the other by
    Lease calls of the same size, each round acked before the next. Priority
    order, group order (rounds of one: a group's next job waits for its head)
    and the tenants' weighted shares come out the same."""
    admin, acme = token("ops", "admin"), token("acme", "producer", "consumer")
    beta = token("beta", "producer")
    shared = pb.QueueConfig(shares=[pb.TenantShare(tenant="beta", weight=3)])
    grouped = per_round == 1
    orders = []
    for drain in (_streamed, _leased):
        async with (
            one_node(tmp_path / drain.__name__, verifier=Verifier(SECRET)) as server,
            Client(server.address, token=admin) as ops,
            Client(server.address, token=acme) as owner,
            Client(server.address, token=beta) as sharer,
        ):
            await ops.create_queue("acme/render", shared)
            await owner.enqueue_batch(
                "render",
                [pb.JobSpec(payload=b"a%d" % i, priority=i % 3,
                            group=f"g{i % 4}" if grouped and i % 5 else "")
                 for i in range(40)],
            )  # fmt: skip
            await sharer.enqueue_batch(
                "acme/render", [pb.JobSpec(payload=b"b%d" % i, priority=i % 2) for i in range(40)]
            )
            orders.append(await drain(server.address, acme, 80, per_round))
    streamed, leased = orders
    assert streamed == leased
    assert {t for _, _, t, _ in streamed} == {"acme", "beta"}
    assert [p for _, p, _, _ in streamed[:8]] == [0] * 8  # the urgent ones first


async def test_a_broken_stream_loses_nothing_and_leaves_no_waiter(
    server: NodeServer, client: Client, raw: Callable[..., RawStream]
) -> None:
    await client.create_queue("q", pb.QueueConfig(default_lease_ms=300))
    await client.enqueue("q", b"held")
    held = raw()
    await held.start("q", credits=1)
    [job] = await held.take(1)
    parked = raw()
    await parked.start("q", credits=3)
    await until("the second stream to park", lambda: server.node.waiting_long_polls == 1)
    await held.close()
    await parked.close()
    await until("both streams to close", lambda: server.node.consume_streams == 0)
    assert server.node.long_polls.lines() == {}  # the parked waiter left its line
    # The broken stream's lease expires; the job comes again, to a long poll
    # nobody's wake-up was lost for.
    [again] = await client.lease("q", wait_ms=5_000)
    assert (again.job_id, again.attempt) == (job.job_id, 2)
    with pytest.raises(LeaseLostError):
        await client.ack("q", job.job_id, job.lease_id)  # the dead stream's lease is stale
    await client.ack("q", again.job_id, again.lease_id)


async def test_node_load_counts_a_parked_stream_as_a_waiting_long_poll(
    server: NodeServer, client: Client, raw: Callable[..., RawStream]
) -> None:
    await client.create_queue("q")
    stream = raw()
    await stream.start("q", credits=4)
    await until("the stream to park", lambda: server.node.waiting_long_polls == 1)
    load = (await client.node_status()).load
    assert (load.waiting_long_polls, load.in_flight_calls) == (1, 0)
    assert _gauge(server.metrics.registry, "pq_node_consume_streams") == 1
    await stream.close()
    await until("the stream to close", lambda: server.node.consume_streams == 0)
    load = (await client.node_status()).load
    assert (load.waiting_long_polls, load.in_flight_calls) == (0, 0)
    assert _gauge(server.metrics.registry, "pq_node_consume_streams") == 0


def _gauge(registry: CollectorRegistry, name: str) -> float | None:
    return registry.get_sample_value(name)


async def test_a_draining_node_ends_the_stream_not_taken(
    server: NodeServer, client: Client, raw: Callable[..., RawStream]
) -> None:
    await client.create_queue("q")
    idle, parked = raw(), raw()
    await idle.start("q")  # no credits: nothing parked, the watch ends it
    await parked.start("q", credits=2)
    await until("a stream to park", lambda: server.node.waiting_long_polls == 1)
    server.node.begin_drain()
    for stream in (idle, parked):
        error = await stream.ended()
        assert isinstance(error, NotTakenError), error
        assert "draining" in error.message
        assert error.cause == "DRAINING"  # the ErrorInfo's cause, as any language reads it
    fresh = raw()
    await fresh.start("q", credits=1)
    assert isinstance(await fresh.ended(), NotTakenError)


async def test_a_lease_that_may_have_committed_never_ends_the_stream_not_taken(
    server: NodeServer, client: Client, raw: Callable[..., RawStream]
) -> None:
    await client.enqueue("q", b"x")
    propose = server.node.propose_indexed

    async def committed_unknown(command: logpb.Command) -> tuple[Message, int]:
        await propose(command)  # it commits, yet the proposer cannot tell
        raise UnavailableError("the commit is unknown", 0.2, reason="COMMIT_UNKNOWN")

    server.node.propose_indexed = committed_unknown  # type: ignore[method-assign]
    stream = raw()
    await stream.start("q", credits=1)
    error = await stream.ended()
    server.node.propose_indexed = propose  # type: ignore[method-assign]
    assert await stats(client, "q") == (0, 1, 0)  # the lease did run
    # So the end must not say NOT_TAKEN (nothing ran: send again anywhere).
    assert not isinstance(error, NotTakenError), error
    assert isinstance(error, UnavailableError)
    assert error.reason == "COMMIT_UNKNOWN"


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    c = Cluster(tmp_path, verifier=Verifier(SECRET), peer_token=node_tokens(SECRET))
    await c.start()
    try:
        yield c
    finally:
        await c.stop()


async def test_a_follower_relays_the_stream_to_the_leader(cluster: Cluster) -> None:
    leader = await cluster.leader()
    follower = next(i for i in cluster.addresses if i != leader)
    at_follower = cluster.addresses[follower]
    acme = token("acme", "producer", "consumer")
    async with Client(cluster.addresses[leader], token=acme) as c:
        await c.enqueue_batch("jobs", [pb.JobSpec(payload=b"%d" % i) for i in range(5)])
    stream = RawStream(at_follower, authorization(acme))
    try:
        await stream.start("jobs", credits=3)
        jobs = await stream.take(3)  # leased on the leader, with acme's credentials
        assert [(j.queue, j.tenant) for j in jobs] == [("jobs", "acme")] * 3
        results = await stream.settle([ack("jobs", j) for j in jobs], credits=2)
        assert [r.status.code for r in results] == [0, 0, 0]
        await stream.take(2)
        assert cluster.servers[follower].node.consume_streams == 1
        assert cluster.servers[leader].node.consume_streams == 1
        assert cluster.servers[leader].node.waiting_long_polls == 0  # its credits are used
        # A relayed stream is never relayed again: a follower reached with
        # the hop's mark answers that it does not lead.
        marked = RawStream(at_follower, (*authorization(acme), (FORWARDED_KEY, "n9")))
        try:
            await marked.start("jobs", credits=1)
            error = await marked.ended()
            assert isinstance(error, NotLeaderError)
            assert error.leader_address == cluster.addresses[leader]
        finally:
            await marked.close()
    finally:
        await stream.close()
    await until(
        "both ends to close",
        lambda: all(s.node.consume_streams == 0 for s in cluster.servers.values()),
    )


async def test_a_leader_that_hands_over_ends_its_streams_not_taken(cluster: Cluster) -> None:
    leader = await cluster.leader()
    follower = next(i for i in cluster.addresses if i != leader)
    acme = token("acme", "consumer")
    async with Client(cluster.addresses[leader], token=token("ops", "admin")) as c:
        await c.create_queue("acme/jobs")
    direct = RawStream(cluster.addresses[leader], authorization(acme))
    relayed = RawStream(cluster.addresses[follower], authorization(acme))
    try:
        for stream in (direct, relayed):
            await stream.start("jobs", credits=2)
        lead = cluster.servers[leader].node
        await until("both streams to park", lambda: lead.waiting_long_polls == 2)
        assert await lead.log.transfer_leadership(5.0)
        for stream in (direct, relayed):
            error = await stream.ended()
            assert isinstance(error, NotTakenError), error
            assert "stopped leading" in error.message
        await until("its streams to close", lambda: lead.consume_streams == 0)
        assert lead.long_polls.lines() == {}
    finally:
        await direct.close()
        await relayed.close()


async def test_an_unauthenticated_stream_is_refused_before_it_is_read(cluster: Cluster) -> None:
    leader = await cluster.leader()
    stream = RawStream(cluster.addresses[leader])
    try:
        await stream.start("jobs", credits=1)
        assert isinstance(await stream.ended(), UnauthenticatedError)
    finally:
        await stream.close()


async def test_a_stream_that_never_starts_holds_nothing(server: NodeServer, client: Client) -> None:
    await client.create_queue("q")
    async with grpc.aio.insecure_channel(server.address) as channel:
        from pqueue.v1 import queue_pb2_grpc as pbg

        call = pbg.QueueStub(channel).Consume()
        await call.done_writing()  # closed before a first request
        assert await call.code() == grpc.StatusCode.OK
    assert server.node.consume_streams == 0


async def test_a_consumer_that_grants_credits_but_never_reads_cannot_lease_the_backlog(
    server: NodeServer, client: Client, raw: Callable[..., RawStream]
) -> None:
    # 20 MB of ready jobs; the consumer keeps granting credits as they are
    # used, and reads nothing: pushes pile up behind its stream, and the
    # node stops leasing once a credits' worth waits to be written.
    payload = b"x" * 2048
    for _ in range(10):
        await client.enqueue_batch("q", [pb.JobSpec(payload=payload)] * 1000)
    stream = raw()
    await stream.start("q", credits=100, lease_ms=60_000)
    for _ in range(150):
        await stream.write(credits=100)
        await asyncio.sleep(0.02)
    ready, leased, _ = await stats(client, "q")
    assert leased < 10_000, "every job leased to a consumer that reads nothing"
    assert ready + leased == 10_000
