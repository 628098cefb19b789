"""Cron schedules on a 3-node cluster in one process: put, list, pause,
resume and delete through any node, the refusals, one job per tick across
a leader change, and the same state on every replica after each."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path

import pytest

from pqueue.client import Client
from pqueue.errors import InvalidArgumentError, NotFoundError, PermissionDeniedError
from pqueue.node.auth import Verifier, issue
from pqueue.node.cron import MISSED_GRACE_MS
from pqueue.node.metrics import NodeCollector
from pqueue.node.scheduler import ENQUEUED
from pqueue.node.server import NodeServer
from pqueue.v1 import queue_pb2 as pb
from tests.inproc import Cluster, node_tokens
from tests.integration.test_cli import pq, pq_json
from tests.schedule_ticks import assert_one_per_tick, tick_jobs, wait_jobs

EVERY_SECOND = "* * * * * *"


async def test_put_list_pause_resume_delete_through_a_follower(cluster: Cluster) -> None:
    leader = await cluster.leader()
    follower = next(i for i in cluster.servers if i != leader)
    async with Client(cluster.addresses[follower], max_retries=3) as c:
        await c.create_queue("reports")
        r = await c.put_schedule(
            "reports", "fast", EVERY_SECOND, "tick", priority=3, timezone="Europe/Paris"
        )
        assert r.created
        assert r.log_index
        s = r.schedule
        assert (s.queue, s.name, s.cron, s.timezone, s.missed) == (
            "reports",
            "fast",
            EVERY_SECOND,
            "Europe/Paris",
            pb.MISSED_TICKS_ONCE,
        )
        assert s.created_at_ms < s.next_tick_ms <= s.created_at_ms + 1000
        r = await c.put_schedule("reports", "daily", "  0   3 1 1 * ", "report", missed="skip")
        assert r.schedule.cron == "0 3 1 1 *"  # spaces collapsed
        assert r.schedule.timezone == "UTC"  # the default, said
        await wait_jobs(c, "reports", 2, timeout_s=10)
        for i in cluster.servers:  # any node answers, having applied the put
            async with Client(cluster.addresses[i], max_retries=3) as each:
                each.last_log_index = c.last_log_index
                listed = await each.list_schedules("reports")
                assert [x.name for x in listed] == ["daily", "fast"]
                assert all(x.next_tick_ms for x in listed)
        assert [x.name for x in await c.list_schedules(consistent=True)] == ["daily", "fast"]
        paused = await c.pause_schedule("reports", "fast")
        assert paused.paused
        assert paused.next_tick_ms == 0
        await asyncio.sleep(0.5)  # a round that was under way ends
        before = (await c.stats("reports", consistent=True))[0].enqueued_total
        await asyncio.sleep(2.5)
        assert (await c.stats("reports", consistent=True))[0].enqueued_total == before
        resumed = await c.resume_schedule("reports", "fast")
        assert not resumed.paused
        assert resumed.last_tick_ms >= paused.last_tick_ms  # what fell meanwhile: skipped
        await wait_jobs(c, "reports", before + 2, timeout_s=10)
        await c.pause_schedule("reports", "fast")
        await c.delete_schedule("reports", "daily")
        with pytest.raises(NotFoundError):
            await c.delete_schedule("reports", "daily")
        assert [x.name for x in await c.list_schedules("reports")] == ["fast"]
        by_tick = await tick_jobs(c, "reports", "fast")
    before_pause = {t: ids for t, ids in by_tick.items() if t <= paused.last_tick_ms}
    after_resume = {t: ids for t, ids in by_tick.items() if t > resumed.last_tick_ms}
    assert len(before_pause) + len(after_resume) == len(by_tick)  # none while paused
    assert_one_per_tick(before_pause, 1000, at_least=2)
    assert_one_per_tick(after_resume, 1000, at_least=2)
    [family] = [
        f
        for f in NodeCollector(cluster.servers[leader].node).collect()
        if f.name == "pq_schedule_ticks"
    ]
    counted = {tuple(x.labels.values()): x.value for x in family.samples}
    assert counted[("reports", ENQUEUED)] >= 4
    await cluster.same_state()


async def test_refusals_name_the_field_and_change_nothing(cluster: Cluster) -> None:
    await cluster.leader()
    async with Client(cluster.addresses[1], max_retries=3) as c:
        with pytest.raises(NotFoundError):
            await c.put_schedule("nope", "s", "* * * * *", "x")
        await c.create_queue("q", pb.QueueConfig(max_priority=5))
        for kwargs, field in (
            ({"cron": "* * * *"}, "schedule.cron"),
            ({"cron": "0 0 31 2 *"}, "schedule.cron"),
            ({"cron": "H * * * *"}, "schedule.cron"),
            ({"timezone": "Nowhere/Town"}, "schedule.timezone"),
            ({"name": "a/b"}, "schedule.name"),
            ({"priority": 9}, "schedule.job.priority"),
        ):
            args = {"cron": "* * * * *", "name": "s", **kwargs}
            with pytest.raises(InvalidArgumentError) as err:
                await c.put_schedule(
                    "q",
                    str(args.pop("name")),
                    str(args.pop("cron")),
                    "x",
                    **args,  # type: ignore[arg-type]
                )
            assert err.value.field == field
        with pytest.raises(InvalidArgumentError) as err:
            await c.put_schedule("q", "s", "* * * * *", "x", missed="sometimes")
        assert err.value.field == "missed"
        # Fields the SDK does not send are refused by the node too.
        spec = pb.JobSpec(payload=b"x", delay_ms=5)
        request = pb.PutScheduleRequest(
            schedule=pb.Schedule(queue="q", name="s", cron="* * * * *", job=spec)
        )
        with pytest.raises(InvalidArgumentError) as err:
            await c._call(lambda s: s.admin.PutSchedule, request)
        assert err.value.field == "schedule.job.delay_ms"
        for call in (c.pause_schedule, c.resume_schedule, c.delete_schedule):
            with pytest.raises(NotFoundError):
                await call("q", "s")
        assert await c.list_schedules() == []
        with pytest.raises(NotFoundError):
            await c.list_schedules("nope")
        await c.put_schedule("q", "s", "* * * * *", "x")
        await c.delete_queue("q")  # its schedules go with it
        assert await c.list_schedules(consistent=True) == []
    await cluster.same_state()


async def test_one_job_per_tick_across_a_leader_change(cluster: Cluster) -> None:
    """The acceptance test's short form (tests/faults/test_schedule_faults.py
    kills real processes): a one-second schedule, its leader stopped and
    restarted, and every tick from the first to the last has one job."""
    leader = await cluster.leader()
    endpoint = "ipv4:" + ",".join(cluster.addresses.values())
    async with Client(endpoint, max_retries=10) as c:
        await c.create_queue("cron")
        await c.put_schedule("cron", "beat", EVERY_SECOND, "beat", missed="all")
        await wait_jobs(c, "cron", 4, timeout_s=10)
        await cluster.stop_node(leader)
        new = await cluster.leader()
        assert new != leader
        await wait_jobs(c, "cron", 8, timeout_s=15)
        await cluster.start_node(leader)
        await wait_jobs(c, "cron", 12, timeout_s=15)
        await c.pause_schedule("cron", "beat")
        by_tick = await tick_jobs(c, "cron", "beat")
        stats = (await c.stats("cron", consistent=True))[0]
    ticks = assert_one_per_tick(by_tick, 1000, at_least=12)
    assert stats.enqueued_total == len(ticks)
    await cluster.same_state()


async def test_tenants_see_only_their_own_schedules(tmp_path: Path) -> None:
    secret = b"k" * 32
    cluster = Cluster(tmp_path, verifier=Verifier(secret), peer_token=node_tokens(secret))
    await cluster.start()
    try:
        await cluster.leader()
        address = cluster.addresses[1]
        admin = issue(secret, "ops", ["admin"], 600)
        acme = issue(secret, "acme", ["producer"], 600)
        async with Client(address, token=admin, max_retries=3) as op:
            for queue in ("acme/q", "beta/q"):
                await op.create_queue(queue)
                await op.put_schedule(queue, "s", "0 0 * * *", "x")
            assert [s.queue for s in await op.list_schedules()] == ["acme/q", "beta/q"]
        async with Client(address, token=acme, max_retries=3) as tenant:
            [mine] = await tenant.list_schedules()
            assert (mine.queue, mine.name) == ("q", "s")
            [mine] = await tenant.list_schedules("q")
            assert mine.queue == "q"
            with pytest.raises(PermissionDeniedError):
                await tenant.list_schedules("beta/q")
            with pytest.raises(PermissionDeniedError):  # managing schedules is the operator's
                await tenant.put_schedule("q", "t", "0 0 * * *", "x")
    finally:
        await cluster.stop()


def gaps(ticks: list[int], step_ms: int = 1000) -> list[int]:
    """The lengths (in ticks) of the runs of ticks without a job."""
    return [(b - a) // step_ms - 1 for a, b in itertools.pairwise(ticks) if b - a > step_ms]


async def test_ticks_missed_without_a_leader_follow_each_policy(cluster: Cluster) -> None:
    """No quorum for longer than the grace: on recovery ALL enqueues every
    missed tick, ONCE one job for the latest, SKIP none; on-time ticks
    before and after each get theirs."""
    leader = await cluster.leader()
    endpoint = "ipv4:" + ",".join(cluster.addresses.values())
    async with Client(endpoint, max_retries=10) as c:
        for policy in ("all", "once", "skip"):
            await c.create_queue(policy)
            await c.put_schedule(policy, "beat", EVERY_SECOND, policy, missed=policy)
        await wait_jobs(c, "skip", 3, timeout_s=10)
        down = [leader, next(i for i in cluster.servers if i != leader)]
        for i in down:
            await cluster.stop_node(i)
        await asyncio.sleep(MISSED_GRACE_MS / 1000 + 4)
        for i in down:
            await cluster.start_node(i)
        after = (await c.stats("skip"))[0].enqueued_total
        await wait_jobs(c, "skip", after + 3, timeout_s=15)
        ticks = {}
        for policy in ("all", "once", "skip"):
            await c.pause_schedule(policy, "beat")
        for policy in ("all", "once", "skip"):
            by_tick = await tick_jobs(c, policy, "beat")
            assert all(len(ids) == 1 for ids in by_tick.values()), by_tick
            ticks[policy] = sorted(by_tick)
    print(
        f"\nticks: { ({p: len(t) for p, t in ticks.items()}) }; gaps: once {gaps(ticks['once'])}, "
        f"skip {gaps(ticks['skip'])}"
    )
    assert gaps(ticks["all"]) == []
    [once] = gaps(ticks["once"])
    [skip] = gaps(ticks["skip"])
    assert once >= 1  # the ticks before the latest missed one
    assert skip >= 3  # every missed tick (the outage outlasted the grace by 3 s or more)
    await cluster.same_state()


async def test_pq_schedule_commands(server: NodeServer) -> None:
    a = server.address
    code, _, err = await pq(
        a, "schedule", "add", "reports", "s", "--cron", "* * * * *", "--payload", "x"
    )
    assert (code, err.strip()) == (1, "error: NOT_FOUND: queue 'reports' not found")
    await pq_json(a, "queue", "create", "reports")
    added = await pq_json(
        a, "schedule", "add", "reports", "beat", "--cron", "*/2 * * * * *", "--payload", "hi",
        "--priority", "3", "--timezone", "Asia/Tokyo", "--missed", "all",
    )  # fmt: skip
    assert added["created"] is True
    assert (added["cron"], added["timezone"], added["missed"], added["priority"]) == (
        "*/2 * * * * *",
        "Asia/Tokyo",
        "all",
        3,
    )
    assert added["next_tick_ms"] > added["created_at_ms"] > 0
    code, out, _ = await pq(a, "schedule", "list")
    assert code == 0
    header, row = out.splitlines()
    assert header.split()[:4] == ["QUEUE", "NAME", "CRON", "TIMEZONE"]
    assert "Z" in row  # the next tick, as ISO-8601 UTC in a table
    code, _, err = await pq(
        a, "schedule", "add", "reports", "x", "--cron", "* * *", "--payload", "x"
    )
    assert code == 1
    assert err.startswith("error: INVALID_ARGUMENT: --cron: ")
    paused = await pq_json(a, "schedule", "pause", "reports", "beat")
    assert (paused["paused"], paused["next_tick_ms"]) == (True, 0)
    resumed = await pq_json(a, "schedule", "resume", "reports", "beat")
    assert resumed["paused"] is False
    [listed] = await pq_json(a, "schedule", "list", "reports")
    assert listed["name"] == "beat"
    assert await pq_json(a, "schedule", "remove", "reports", "beat") == {
        "queue": "reports",
        "name": "beat",
        "deleted": True,
    }
    assert await pq_json(a, "schedule", "list") == []
