"""The balancer as the Enqueue Manager, in front of a real 3-node cluster
(one process, real gRPC, SQLite): single calls of many clients reach the
leader in few ``Submit`` calls, and each client gets the answer it would
have got alone."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc

from balancer.server import BalancerServer
from pqueue.client import Client
from pqueue.node.auth import ADMIN, CONSUMER, PRODUCER, Verifier, issue
from pqueue.node.server import NodeServer
from pqueue.v1 import queue_pb2 as pb
from pqueue.v1 import queue_pb2_grpc as pbg
from pqueue.wire.keys import authorization
from tests.inproc import Cluster, node_tokens
from tests.integration.test_balancer import balancer_config

SECRET = b"c" * 32
CLIENTS = 64


@contextlib.asynccontextmanager
async def balanced(
    tmp_path: Path, verifier: Verifier | None = None, **options: Any
) -> AsyncIterator[tuple[Cluster, BalancerServer]]:
    """Three nodes (auth on with a ``verifier``) and a balancer that knows their leader."""
    cluster = Cluster(
        tmp_path,
        metrics=True,
        verifier=verifier,
        peer_token=node_tokens(SECRET) if verifier else None,
    )
    await cluster.start()
    try:
        await cluster.leader()
        config = balancer_config(cluster)
        balancer = BalancerServer(dataclasses.replace(config, **options))
        await balancer.start()
        try:
            for _ in range(200):
                if balancer.backends.pool.leader() is not None:
                    break
                await asyncio.sleep(0.05)
            yield cluster, balancer
        finally:
            await balancer.stop()
    finally:
        await cluster.stop()


def calls_at(server: NodeServer, method: str) -> float:
    """Calls of ``Queue/<method>`` the node finished, whatever their code."""
    total = 0.0
    for metric in server.metrics.registry.collect():
        for sample in metric.samples:
            if (
                sample.name == "pq_grpc_server_handled_total"
                and sample.labels.get("method") == method
                and sample.labels.get("service") == "pqueue.v1.Queue"
            ):
                total += sample.value
    return total


@contextlib.asynccontextmanager
async def separate_clients(address: str, n: int) -> AsyncIterator[list[pbg.QueueStub]]:
    """``n`` clients with a connection each, connected before the test sends
    (single calls on raw stubs: the SDK may pack its own calls into a Submit)."""
    channels = [grpc.aio.insecure_channel(address) for _ in range(n)]
    try:
        await asyncio.gather(*(c.channel_ready() for c in channels))
        yield [pbg.QueueStub(c) for c in channels]
    finally:
        for channel in channels:
            await channel.close()


async def outcome(call: Any) -> Any:
    """A call's response, or its error as (code, details, status-details trailer)."""
    try:
        return await call
    except grpc.aio.AioRpcError as exc:
        trailers = dict(exc.trailing_metadata() or ())
        return (exc.code(), exc.details(), trailers.get("grpc-status-details-bin"))


async def test_single_enqueues_of_many_clients_reach_the_leader_in_few_submits(
    tmp_path: Path,
) -> None:
    async with balanced(tmp_path) as (cluster, balancer):
        leader = cluster.servers[await cluster.leader()]
        async with Client(balancer.address) as admin:
            await admin.create_queue("q", pb.QueueConfig(min_priority=0, max_priority=9))
        bad = 13

        def request(i: int) -> pb.EnqueueRequest:
            priority = 99 if i == bad else i % 10  # one job out of the queue's bounds
            return pb.EnqueueRequest(
                queue="q", job=pb.JobSpec(payload=f"job-{i}".encode(), priority=priority)
            )

        submits, enqueues = calls_at(leader, "Submit"), calls_at(leader, "Enqueue")
        async with separate_clients(balancer.address, CLIENTS) as stubs:
            answers = await asyncio.gather(
                *(outcome(stub.Enqueue(request(i), timeout=20)) for i, stub in enumerate(stubs))
            )
        sent = calls_at(leader, "Submit") - submits
        assert calls_at(leader, "Enqueue") == enqueues  # every one rode in a Submit
        assert 1 <= sent <= CLIENTS // 4, sent  # far fewer calls than clients

        # The bad job failed alone, exactly as it fails sent to the leader directly.
        async with grpc.aio.insecure_channel(cluster.addresses[await cluster.leader()]) as ch:
            direct = await outcome(pbg.QueueStub(ch).Enqueue(request(bad), timeout=10))
        assert direct[0] == grpc.StatusCode.INVALID_ARGUMENT
        assert answers[bad] == direct  # code, message and the rich details' bytes

        # Every other client got its own job's id.
        good = {i: a for i, a in enumerate(answers) if i != bad}
        assert all(isinstance(a, pb.EnqueueResponse) for a in good.values()), good
        assert len({a.job_id for a in good.values()}) == CLIENTS - 1
        async with Client(balancer.address) as reader:
            for i, answer in good.items():
                job = await reader.get_job("q", answer.job_id, consistent=True)
                assert (job.payload, job.priority) == (f"job-{i}".encode(), i % 10)
            [stats] = await reader.stats("q", consistent=True)
            assert stats.ready == CLIENTS - 1

        text = balancer.metrics.registry.get_sample_value
        assert text("pq_balancer_coalesced_calls_total") == CLIENTS
        assert text("pq_balancer_submit_operations_count") == sent


async def test_a_call_that_does_not_parse_fails_only_its_own_client(tmp_path: Path) -> None:
    async with balanced(tmp_path) as (cluster, balancer):
        async with Client(balancer.address) as admin:
            await admin.create_queue("q")
        # An enqueue with a field this release does not know (#99), and bytes
        # that are no message at all: the node refuses the Submit carrying
        # them whole, and the balancer sends each of its calls alone.
        unknown = pb.EnqueueRequest(queue="q").SerializeToString() + b"\x98\x06\x01"
        garbage = b"\x0a\xff\xff"
        good = pb.EnqueueRequest(queue="q", job=pb.JobSpec(payload=b"ok")).SerializeToString()
        requests = [good, unknown, good, garbage, good] * 4
        async with contextlib.AsyncExitStack() as stack:
            channels = [
                await stack.enter_async_context(grpc.aio.insecure_channel(a))
                for a in (balancer.address, cluster.addresses[await cluster.leader()])
            ]
            enqueue = "/pqueue.v1.Queue/Enqueue"
            via: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channels[0].unary_unary(enqueue)
            direct: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channels[1].unary_unary(
                enqueue
            )
            answers = await asyncio.gather(*(outcome(via(r, timeout=20)) for r in requests))
            for request, answer in zip(requests, answers, strict=True):
                if request is good:
                    assert pb.EnqueueResponse.FromString(answer).job_id
                else:
                    alone = await outcome(direct(request, timeout=10))
                    assert alone[0] == grpc.StatusCode.INVALID_ARGUMENT
                    assert answer == alone
        async with Client(balancer.address) as reader:
            [stats] = await reader.stats("q", consistent=True)
            assert stats.ready == 12


async def test_callers_with_different_tokens_never_share_a_submit(tmp_path: Path) -> None:
    probes = issue(SECRET, "ops", [ADMIN], 600)
    async with balanced(tmp_path, verifier=Verifier(SECRET), probe_token=probes) as (
        cluster,
        balancer,
    ):
        leader = cluster.servers[await cluster.leader()]
        acme = issue(SECRET, "acme", [PRODUCER, CONSUMER], 600)
        umbrella = issue(SECRET, "umbrella", [PRODUCER, CONSUMER], 600)
        reader_only = issue(SECRET, "acme", [CONSUMER], 600)  # may not enqueue
        tokens = [acme, umbrella, reader_only]
        async with Client(balancer.address, token=issue(SECRET, "ops", [ADMIN], 600)) as admin:
            for tenant in ("acme", "umbrella"):
                await admin.create_queue(f"{tenant}/q")
        submits = calls_at(leader, "Submit")
        per_token = 24
        async with separate_clients(balancer.address, per_token * len(tokens)) as stubs:
            calls = []
            for i, stub in enumerate(stubs):  # interleaved: acme, umbrella, reader, acme...
                token = tokens[i % len(tokens)]
                spec = pb.JobSpec(payload=f"{i % len(tokens)}:{i}".encode())
                calls.append(
                    outcome(
                        stub.Enqueue(
                            pb.EnqueueRequest(queue="q", job=spec),  # each in its own namespace
                            timeout=20,
                            metadata=authorization(token),
                        )
                    )
                )
            answers = await asyncio.gather(*calls)
        assert calls_at(leader, "Submit") - submits < per_token * len(tokens)  # they rode
        refused = [a for i, a in enumerate(answers) if i % len(tokens) == 2]
        assert {a[0] for a in refused} == {grpc.StatusCode.PERMISSION_DENIED}
        for t, token in enumerate(tokens[:2]):
            async with Client(balancer.address, token=token) as c:
                mine = [a for i, a in enumerate(answers) if i % len(tokens) == t]
                assert all(isinstance(a, pb.EnqueueResponse) for a in mine), mine
                for a in mine:  # in its own tenant's queue, with its own payload
                    job = await c.get_job("q", a.job_id, consistent=True)
                    assert job.payload.startswith(f"{t}:".encode())
                [stats] = await c.stats("q", consistent=True)
                assert stats.ready == per_token  # none of another tenant's jobs


async def test_sdk_clients_and_client_submits_ride_together(tmp_path: Path) -> None:
    """Separate SDK clients (whatever the SDK sends for a lone call: an Enqueue,
    or a Submit of one) and clients' own Submits share the leader's Submits;
    each Submit gets exactly its own results, as the node answers it alone."""
    async with balanced(tmp_path) as (cluster, balancer):
        leader = cluster.servers[await cluster.leader()]
        async with Client(balancer.address) as admin:
            await admin.create_queue("q", pb.QueueConfig(min_priority=0, max_priority=9))

        def submit(i: int) -> pb.SubmitRequest:
            bad = pb.JobSpec(payload=b"bad", priority=99)
            return pb.SubmitRequest(
                ops=[
                    pb.Operation(
                        enqueue=pb.EnqueueRequest(
                            queue="q", job=bad if i == 5 and k == 1 else pb.JobSpec(payload=b"s")
                        )
                    )
                    for k in range(3)
                ]
            )

        def calls() -> float:
            return calls_at(leader, "Submit") + calls_at(leader, "Enqueue")

        before = calls()
        sdk = [Client(balancer.address, max_retries=0) for _ in range(CLIENTS // 2)]
        try:
            async with separate_clients(balancer.address, CLIENTS // 2) as stubs:
                answers = await asyncio.gather(
                    *(c.enqueue("q", f"sdk-{i}") for i, c in enumerate(sdk)),
                    *(outcome(s.Submit(submit(i), timeout=20)) for i, s in enumerate(stubs)),
                )
        finally:
            for c in sdk:
                await c.close()
        sent = calls() - before
        assert sent <= CLIENTS // 4, sent  # 32 SDK calls and 32 Submits of 3
        enqueued, submitted = answers[: CLIENTS // 2], answers[CLIENTS // 2 :]
        async with grpc.aio.insecure_channel(cluster.addresses[await cluster.leader()]) as ch:
            direct = await pbg.QueueStub(ch).Submit(submit(5), timeout=10)
        for i, response in enumerate(submitted):
            assert isinstance(response, pb.SubmitResponse)
            codes = [r.status.code for r in response.results]
            assert codes == ([0, 3, 0] if i == 5 else [0, 0, 0])
            tops = [r.enqueue.log_index for r in response.results if not r.status.code]
            assert response.log_index == max(tops)  # its own results' highest
        # The bad operation's status, byte for byte as the node gives it alone.
        assert submitted[5].results[1].status == direct.results[1].status
        async with Client(balancer.address) as reader:
            for i, answer in enumerate(enqueued):
                job = await reader.get_job("q", answer.job_id, consistent=True)
                assert job.payload == f"sdk-{i}".encode()
            [stats] = await reader.stats("q", consistent=True)
            assert stats.ready == CLIENTS // 2 + 3 * (CLIENTS // 2) - 1 + 2  # + direct's two
