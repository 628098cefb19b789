"""Commands a leader holds while it hands over go to the new leader.

A leader handing over stops proposing; what callers submit meanwhile waits
and, once another node leads, fails as NOT_LEADER naming it, so the caller
(or the balancer, or a follower forwarding) goes straight there. In a CI run
the handover ended (the replica knew the new leader) before the node's ready
loop had taken the ``Ready`` saying so: the held commands failed "no leader
yet" (NOT_TAKEN) and a client with no retries of its own saw an error. The
test puts the node in that state at that moment, so the order is exact.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import grpc
import pytest

from consensus import Message, Ready, SoftState
from consensus.messages import Accept, Heartbeat, TimeoutNow
from pqueue.cli.devcluster import free_ports
from pqueue.client import Client
from pqueue.errors import NotLeaderError, NotTakenError, UnavailableError
from pqueue.node.replicated import ReplicatedLog
from pqueue.node.servicer import QueueService
from pqueue.v1 import log_pb2 as logpb
from pqueue.v1 import queue_pb2 as pb
from pqueue.v1 import queue_pb2_grpc as pbg
from pqueue.wire.keys import FORWARDED_KEY
from pqueue.wire.status import from_rpc_error
from tests.inproc import Cluster
from tests.integration.test_peer_tcp import until


async def _leading(cluster: Cluster) -> tuple[int, ReplicatedLog]:
    """The leader's id and its log."""
    old = await cluster.leader()
    log = cluster.servers[old].node.log
    assert isinstance(log, ReplicatedLog)
    assert log.replica is not None
    return old, log


def _hear_late(
    log: ReplicatedLog, monkeypatch: pytest.MonkeyPatch, transfer: list[asyncio.Task[bool]]
) -> list[SoftState]:
    """The moment CI met: while ``transfer``'s task runs, the ready loop
    takes each ``Ready`` naming another leader without that news (kept in
    the list returned), while the replica itself already follows that
    leader. ``_restore`` puts the news back."""
    note_role = log._note_role
    heard: list[SoftState] = []
    own = log.config.node_id

    def heard_late(ready: Ready) -> None:
        soft = ready.soft_state
        running = bool(transfer) and not transfer[0].done()
        if soft is not None and soft.leader_id not in (0, own) and running:
            heard.append(soft)
            ready.soft_state = dataclasses.replace(soft, leader_id=0)
        note_role(ready)

    monkeypatch.setattr(log, "_note_role", heard_late)
    return heard


def _restore(log: ReplicatedLog, heard: list[SoftState]) -> None:
    """What the ready loop would have taken next (``_hear_late``)."""
    if heard:
        log._soft = heard[-1]


async def test_a_command_held_through_a_handover_is_told_the_new_leader(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    old, log = await _leading(cluster)
    running: list[asyncio.Task[bool]] = []
    heard = _hear_late(log, monkeypatch, running)
    transfer = asyncio.create_task(log.transfer_leadership(5.0))
    running.append(transfer)
    await asyncio.sleep(0)  # it has stopped proposing: what comes now is held
    assert log.replica is not None
    assert log.replica.status().transfer_target
    held = asyncio.ensure_future(log.submit(logpb.Command(tick=logpb.Tick())))
    assert await transfer
    new = log.replica.status().leader_id
    assert new not in (0, old)
    with pytest.raises(NotLeaderError) as err:
        async with asyncio.timeout(5):
            await held
    assert err.value.leader_id == str(new)
    assert err.value.leader_address == cluster.addresses[new]
    _restore(log, heard)


async def test_calls_that_come_after_it_stepped_down_and_before_it_heard_go_to_the_new_leader(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The other window: the old leader stepped down (the successor's phase
    1) and has not yet heard from the successor as leader. A command
    submitted then is held, and a call through the node's API waits and is
    forwarded, instead of "no leader yet"."""
    old, log = await _leading(cluster)
    replica = log.replica
    assert replica is not None
    step = replica.step
    kept: list[object] = []
    blind = True

    def step_late(msg: Message) -> None:
        # The successor's messages as leader wait until the test lets them in.
        if blind and isinstance(msg, Accept | Heartbeat) and msg.ballot > ballot:
            kept.append(msg)
            return
        step(msg)

    ballot = replica.status().ballot
    monkeypatch.setattr(replica, "step", step_late)
    async with Client(cluster.addresses[old], max_retries=0, batching=False) as c:
        await c.create_queue("q")
        transfer = asyncio.create_task(log.transfer_leadership(5.0))
        await until(lambda: not log.is_leader and log.leader_hint() == (0, ""))
        held = asyncio.ensure_future(log.submit(logpb.Command(tick=logpb.Tick())))
        called = asyncio.ensure_future(c.enqueue("q", b"in the blind window"))
        await asyncio.sleep(0.2)
        assert not held.done()
        assert not called.done()
        blind = False
        for msg in kept:
            step(msg)  # type: ignore[arg-type]
        log._wake.set()
        assert await transfer
        new = replica.status().leader_id
        assert new not in (0, old)
        with pytest.raises(NotLeaderError) as err:
            async with asyncio.timeout(5):
                await held
        assert err.value.leader_id == str(new)
        async with asyncio.timeout(5):
            job_id = await called  # forwarded to the new leader, which took it
        assert job_id


@pytest.fixture
async def patient_cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    """A leader that gives a transfer up only after 1 s (50 ticks): the test
    below holds the transfer's TimeoutNow back meanwhile."""
    c = Cluster(tmp_path, cluster_options={"election_ticks": 50})
    await c.start()
    try:
        yield c
    finally:
        await c.stop()


@pytest.mark.parametrize("hop", ["client", "balancer"])
async def test_a_call_held_through_a_handover_reaches_the_new_leader(
    patient_cluster: Cluster, monkeypatch: pytest.MonkeyPatch, hop: str
) -> None:
    """The same moment, for a call through the node's API: held while the
    leader hands over, then sent on to the new leader (a client's), or
    answered NOT_LEADER naming it (a balancer's, which follows that itself)."""
    cluster = patient_cluster
    old, log = await _leading(cluster)
    replica = log.replica
    assert replica is not None
    # The handover waits for the go: the call is held before anything moves.
    send = log._send
    go = asyncio.Event()
    parked: list[Message] = []

    def send_after_go(msg: Message) -> None:
        if isinstance(msg, TimeoutNow) and not go.is_set():
            parked.append(msg)
            return
        send(msg)

    monkeypatch.setattr(log, "_send", send_after_go)
    running: list[asyncio.Task[bool]] = []
    heard = _hear_late(log, monkeypatch, running)
    metadata = ((FORWARDED_KEY, "balancer"),) if hop == "balancer" else ()
    async with grpc.aio.insecure_channel(cluster.addresses[old]) as channel:
        stub = pbg.QueueStub(channel)
        await pbg.AdminStub(channel).CreateQueue(pb.CreateQueueRequest(queue="q"))
        transfer = asyncio.create_task(log.transfer_leadership(5.0))
        running.append(transfer)
        await until(lambda: bool(parked))  # it stopped proposing, and asks the successor
        call = stub.Enqueue(
            pb.EnqueueRequest(queue="q", job=pb.JobSpec(payload=b"held")),
            metadata=metadata,
            timeout=10,
        )
        await until(lambda: len(log._proposals) >= 1)  # held
        go.set()
        for msg in parked:
            send(msg)
        assert await transfer
        new = replica.status().leader_id
        assert new not in (0, old)
        if hop == "client":
            answer = await call
            assert answer.job_id
        else:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call
            error = from_rpc_error(err.value)
            assert isinstance(error, NotLeaderError), error
            assert error.leader_address == cluster.addresses[new]
    _restore(log, heard)
    async with Client(cluster.addresses[new]) as c:
        [stats] = await c.stats("q", consistent=True)
    assert stats.ready == (1 if hop == "client" else 0)


@pytest.mark.parametrize("hop", ["answers", "fails"])
async def test_a_stream_request_that_meets_the_drain_goes_to_the_new_leader(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch, hop: str
) -> None:
    """A ``SubmitStream`` request read before the old leader handed over and
    began to drain, run after: it goes on to the new leader (nothing ran
    here), not back as "node is draining". If that hop gets no answer
    (``fails``), it may have reached the leader, so the answer says the
    outcome is unknown, never NOT_LEADER or NOT_TAKEN (which a client or
    balancer would send again)."""
    old, log = await _leading(cluster)
    server = cluster.servers[old]
    entered, go = asyncio.Event(), asyncio.Event()
    run_ops = QueueService.run_ops

    async def run_after_the_drain(
        self: QueueService, ops: Sequence[pb.Operation], moved: list[int] | None = None
    ) -> tuple[list[pb.OpResult], int]:
        if self.node is server.node and ops and ops[0].enqueue.job.payload == b"late":
            entered.set()
            await go.wait()
        return await run_ops(self, ops, moved)

    monkeypatch.setattr(QueueService, "run_ops", run_after_the_drain)
    async with Client(cluster.addresses[old], max_retries=0, look_aside=False) as c:
        await c.create_queue("q")
        late = asyncio.ensure_future(c.enqueue("q", b"late"))
        async with asyncio.timeout(5):
            await entered.wait()
        assert await log.transfer_leadership(5.0)
        new, _ = log.leader_hint()
        if hop == "fails":
            # The new leader's address as this node has it leads nowhere: the
            # hop gets no answer, as from a leader that died under it.
            monkeypatch.setitem(log.config.addresses, new, f"127.0.0.1:{free_ports(1)[0]}")
        server.node.begin_drain()
        go.set()
        if hop == "fails":
            with pytest.raises(UnavailableError) as err:
                async with asyncio.timeout(10):
                    await late
            assert not isinstance(err.value, NotTakenError)
            assert err.value.reason == "LEADER_UNREACHABLE"
            return
        async with asyncio.timeout(10):
            answer = await late
        assert answer.job_id
    async with Client(cluster.addresses[new]) as c:
        [stats] = await c.stats("q", consistent=True)
    assert stats.ready == 1
