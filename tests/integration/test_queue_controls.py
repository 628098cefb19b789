"""Queue controls on a real 3-node cluster: UpdateQueue, pause and resume
holding and releasing long polls and streams, max_dispatch_per_s and
max_inflight; every replica ends in the same state.

Time bounds are loose: they tell "released by the event" from "waited out
its poll". Rates are checked on the leader's stamped lease times (each
job's lease expiry less its lease), not on wall time.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import pytest

from pqueue.client import Client
from pqueue.errors import InvalidArgumentError, NotFoundError
from pqueue.v1 import queue_pb2 as pb
from tests.consume_raw import RawStream
from tests.inproc import Cluster

PQ = (sys.executable, "-m", "pqueue.cli")
LEASE_MS = 60_000


async def started(tmp_path: Path) -> tuple[Cluster, str, str]:
    """A running cluster with the lifecycle feature on everywhere: the
    leader's address and a follower's."""
    cluster = Cluster(tmp_path)
    await cluster.start()
    leader = await cluster.leader()
    deadline = time.monotonic() + 10
    while not all(s.node.machine.lifecycle for s in cluster.servers.values()):
        assert time.monotonic() < deadline, "the lifecycle feature never came on"
        await asyncio.sleep(0.05)
    follower = next(i for i in cluster.addresses if i != leader)
    return cluster, cluster.addresses[leader], cluster.addresses[follower]


async def pq(endpoint: str, *args: str) -> object:
    """Run the CLI with ``-o json``; its parsed output."""
    run = await asyncio.create_subprocess_exec(
        *PQ, "--endpoint", endpoint, "-o", "json", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await run.communicate()
    assert run.returncode == 0, err.decode()
    return json.loads(out)


async def test_pause_holds_long_polls_and_streams_and_resume_releases_them(
    tmp_path: Path,
) -> None:
    cluster, at_leader, at_follower = await started(tmp_path)
    stream = RawStream(at_leader)
    try:
        async with Client(at_follower) as client:
            await client.create_queue("jobs")
            assert await client.pause_queue("jobs") is True
            assert await client.pause_queue("jobs") is False  # idempotent
            # Enqueues go on while paused.
            ids = [(await client.enqueue("jobs", f"j{i}".encode())).job_id for i in range(3)]
            [stats] = await client.stats("jobs")
            assert (stats.paused, stats.ready) == (True, 3)
            # A long poll waits out its wait and comes back empty, OK.
            began = time.monotonic()
            assert await client.lease("jobs", wait_ms=400) == []
            assert time.monotonic() - began >= 0.35
            # A long poll and a stream with credits, both held.
            poll = asyncio.create_task(client.lease("jobs", max_jobs=2, wait_ms=30_000))
            await stream.start("jobs", credits=1)
            pushed = asyncio.create_task(stream.take(1))
            await asyncio.sleep(0.5)
            assert not poll.done()
            assert not pushed.done()
            assert cluster.servers[await cluster.leader()].node.waiting_long_polls == 2
            # Resume: both are released, and share the three jobs.
            assert await client.resume_queue("jobs") is True
            assert await client.resume_queue("jobs") is False
            polled = await asyncio.wait_for(poll, 10)
            [first] = await asyncio.wait_for(pushed, 10)
            assert sorted([first.job_id, *(j.job_id for j in polled)]) == ids
            [stats] = await client.stats("jobs", consistent=True)
            assert (stats.paused, stats.ready, stats.leased) == (False, 0, 3)
        await cluster.same_state()
    finally:
        await stream.close()
        await cluster.stop()


async def test_a_rate_limited_queue_leases_at_about_its_rate(tmp_path: Path) -> None:
    rate = 8.0
    cluster, at_leader, at_follower = await started(tmp_path)
    stream = RawStream(at_leader)
    try:
        async with Client(at_follower) as client:
            await client.create_queue("slow", pb.QueueConfig(max_dispatch_per_s=rate))
            await client.enqueue_batch("slow", [pb.JobSpec(payload=b"x")] * 200)
            leader = cluster.servers[await cluster.leader()].node
            index_before = leader.machine.applied_index
            # Three long pollers and a stream compete for the tokens for ~3 s.
            leased: list[pb.LeasedJob] = []
            stop_at = time.monotonic() + 3.0

            async def poller() -> None:
                while time.monotonic() < stop_at:
                    wait_ms = max(1, int((stop_at - time.monotonic()) * 1000))
                    leased.extend(
                        await client.lease("slow", max_jobs=3, lease_ms=LEASE_MS, wait_ms=wait_ms)
                    )

            await stream.start("slow", credits=1000, lease_ms=LEASE_MS)
            await asyncio.gather(poller(), poller(), poller())
            await asyncio.sleep(0.3)
            [stats] = await client.stats("slow", consistent=True)
            # Whatever the stream got in the meantime was pushed: read it.
            while len(stream.jobs) < stats.leased - len(leased):
                await stream.read()
            everything = leased + stream.jobs
            assert len(everything) == stats.leased
            assert stream.jobs, "the stream got a share"
            # The leader's stamped times: never faster than the rate (after
            # the one-second burst), in any window...
            times = sorted(j.lease_expires_at_ms - LEASE_MS for j in everything)
            for i, start in enumerate(times):
                for window_ms in (250, 1000, 2000):
                    inside = sum(1 for t in times[i:] if t < start + window_ms)
                    assert inside <= rate + rate * window_ms / 1000 + 1, (window_ms, times)
            # ...and no token slept through: about the rate over the whole span.
            span_s = (times[-1] - times[0]) / 1000
            assert span_s >= 2.0
            assert len(times) >= rate * span_s * 0.7, (len(times), span_s)
            # Nobody spun: about one log entry per lease, not per wake-up.
            entries = leader.machine.applied_index - index_before
            assert entries <= 2 * len(times) + 20, (entries, len(times))
        await cluster.same_state()
    finally:
        await stream.close()
        await cluster.stop()


async def test_max_inflight_caps_leases_and_a_freed_slot_releases_a_waiter(
    tmp_path: Path,
) -> None:
    cluster, at_leader, at_follower = await started(tmp_path)
    try:
        async with Client(at_follower) as client, Client(at_leader) as other:
            await client.create_queue("capped", pb.QueueConfig(max_inflight=3))
            await client.enqueue_batch("capped", [pb.JobSpec(payload=b"x")] * 10)
            first = await client.lease("capped", max_jobs=2)
            second = await other.lease("capped", max_jobs=10)
            assert (len(first), len(second)) == (2, 1)
            assert await client.lease("capped", wait_ms=300) == []
            waiter = asyncio.create_task(other.lease("capped", max_jobs=10, wait_ms=30_000))
            await asyncio.sleep(0.3)
            assert not waiter.done()
            await client.ack("capped", first[0].job_id, first[0].lease_id)
            assert len(await asyncio.wait_for(waiter, 10)) == 1
            # A nack frees a slot too (its job is ready at once, and is served).
            waiter = asyncio.create_task(other.lease("capped", max_jobs=10, wait_ms=30_000))
            await asyncio.sleep(0.3)
            assert not waiter.done()
            await client.nack("capped", first[1].job_id, first[1].lease_id, delay_ms=0)
            assert len(await asyncio.wait_for(waiter, 10)) == 1
            [stats] = await client.stats("capped", consistent=True)
            assert stats.leased == 3
            # Raising the cap releases a waiter at once.
            waiter = asyncio.create_task(other.lease("capped", max_jobs=10, wait_ms=30_000))
            await asyncio.sleep(0.3)
            r = await client.update_queue("capped", max_inflight=5)
            assert r.config.max_inflight == 5
            assert len(await asyncio.wait_for(waiter, 10)) == 2
            [stats] = await client.stats("capped", consistent=True)
            assert stats.leased == 5
        await cluster.same_state()
    finally:
        await cluster.stop()


async def test_update_queue_through_the_sdk_and_the_cli(tmp_path: Path) -> None:
    cluster, _, at_follower = await started(tmp_path)
    try:
        async with Client(at_follower) as client:
            created = await client.create_queue("q", pb.QueueConfig(max_attempts=3))
            r = await client.update_queue("q", max_attempts=7, shares={"acme": 2})
            want = pb.QueueConfig()
            want.CopyFrom(created.config)
            want.max_attempts = 7
            want.shares.add(tenant="acme", weight=2)
            assert r.config == want
            # Refusals name the field and change nothing.
            for call, field in (
                (client.update_queue("q", max_attempts=5000), "config.max_attempts"),
                (client.update_queue("q", max_lease_total_ms=1000), "config.default_lease_ms"),
                (
                    client.update_queue("q", pb.QueueConfig(), mask=["max_attempts", "colour"]),
                    "update_mask[1]",
                ),
                (client.update_queue("q", delete_when_idle=True), "config.delete_when_idle"),
            ):
                with pytest.raises(InvalidArgumentError) as info:
                    await call
                assert info.value.field == field
            with pytest.raises(NotFoundError):
                await client.update_queue("nowhere", max_attempts=2)
            with pytest.raises(NotFoundError):
                await client.pause_queue("nowhere")
            assert (await client.get_queue("q")).config == want
        # The CLI: only the flags given change.
        out = await pq(
            at_follower, "queue", "update", "q", "--max-inflight", "4",
            "--max-dispatch-per-s", "2.5", "--min-priority", "-2", "--no-shares",
        )  # fmt: skip
        assert isinstance(out, dict)
        assert out["updated"] == ["max_dispatch_per_s", "max_inflight", "min_priority", "shares"]
        assert out["config"]["max_attempts"] == 7
        assert out["config"]["max_inflight"] == 4
        assert out["config"]["shares"] == []
        assert await pq(at_follower, "queue", "pause", "q") == {
            "queue": "q",
            "paused": True,
            "changed": True,
        }
        shown = await pq(at_follower, "queue", "show", "q")
        assert isinstance(shown, dict)
        assert shown["stats"]["paused"] is True
        assert shown["config"]["max_dispatch_per_s"] == 2.5
        assert shown["config"]["min_priority"] == -2
        out = await pq(at_follower, "queue", "update", "q", "--min-priority", "none")
        assert isinstance(out, dict)
        assert out["config"]["min_priority"] is None
        resumed = await pq(at_follower, "queue", "resume", "q")
        assert resumed == {"queue": "q", "paused": False, "changed": True}
        await cluster.same_state()
        configs = {
            s.node.machine.queues["q"].config.SerializeToString() for s in cluster.servers.values()
        }
        assert len(configs) == 1
    finally:
        await cluster.stop()
