"""ListJobs through a real 3-node cluster: each state in serving order from
any node, stable pages, the read point (consistent, min_index), refusals,
and through the balancer."""

from __future__ import annotations

from pathlib import Path

import pytest

from pqueue.client import Client
from pqueue.errors import InvalidArgumentError, NotFoundError, PermissionDeniedError
from pqueue.node.auth import Verifier, issue
from pqueue.v1 import queue_pb2 as pb
from tests.inproc import Cluster, node_tokens
from tests.integration.test_balancer import balanced

SECRET = b"b" * 32


def ids(jobs: object) -> list[int]:
    return [j.job_id for j in jobs]  # type: ignore[attr-defined]


async def test_every_state_lists_in_serving_order_from_any_node(cluster: Cluster) -> None:
    leader = await cluster.leader()
    follower = next(i for i in cluster.servers if i != leader)
    async with Client(cluster.addresses[follower], max_retries=0) as c:
        await c.create_queue("q", pb.QueueConfig(max_attempts=1))
        await c.enqueue_batch("q", [pb.JobSpec(payload=b"j", priority=k % 3) for k in range(30)])
        grouped = [(await c.enqueue("q", b"g", priority=1, group="g")).job_id for _ in range(3)]
        delays = [pb.JobSpec(payload=b"d", delay_ms=60_000 - k) for k in range(4)]
        later = [r.job_id for r in await c.enqueue_batch("q", delays)]  # one time: the last first
        leased = await c.lease("q", max_jobs=2)
        leased += await c.lease("q", lease_ms=50_000)
        leased += await c.lease("q", lease_ms=20_000)  # expires first
        for job in leased[:2]:
            await c.nack("q", job.job_id, job.lease_id, reason="no")  # dead: one attempt

        # READY: a page at a time through this follower (reading its own
        # writes), and all at once: the same jobs, in lease order.
        paged = [j async for j in c.iter_jobs("q", "ready", page_size=7)]
        whole = await c.list_jobs("q", pb.JOB_STATE_READY, limit=1000)
        assert ids(paged) == ids(whole.jobs)
        assert not whole.next_page_token
        assert len(paged) == 30 - 4 + 3
        assert ids(paged) == ids(sorted(paged, key=lambda j: (j.priority, j.ready_at_ms, j.job_id)))
        assert {j.queue for j in paged} == {"q"}
        assert ids((await c.list_jobs("q", "delayed")).jobs) == list(reversed(later))
        assert ids((await c.list_jobs("q", "leased")).jobs) == [leased[3].job_id, leased[2].job_id]
        dead = (await c.list_jobs("q", "dead")).jobs
        assert ids(dead) == sorted(ids(dead), reverse=True)  # newest first (one time: by id)
        assert set(ids(dead)) == {j.job_id for j in leased[:2]}
        assert [j.errors[0].reason for j in dead] == ["no", "no"]
        # Filters.
        urgent = await c.list_jobs("q", "ready", max_priority=0, limit=1000)
        assert {j.priority for j in urgent.jobs} == {0}
        assert ids((await c.list_jobs("q", "ready", group="g")).jobs) == grouped
        # Consistent reads go to the leader; the order is the same there.
        assert ids((await c.list_jobs("q", "ready", limit=1000, consistent=True)).jobs) == ids(
            paged
        )
        # Leases take the listed order (the group's later jobs wait for its head).
        served = []
        while batch := await c.lease("q", max_jobs=100):
            served += ids(batch)
        assert served == [i for i in ids(paged) if i not in grouped[1:]]
    await cluster.same_state()


async def test_pages_stay_stable_while_the_queue_changes(cluster: Cluster) -> None:
    await cluster.leader()
    async with Client(cluster.addresses[1], max_retries=0) as c:
        made = [r.job_id for r in await c.enqueue_batch("q", [pb.JobSpec()] * 10)]
        first = await c.list_jobs("q", "ready", limit=4)
        assert ids(first.jobs) == made[:4]
        await c.lease("q", max_jobs=2)  # two listed jobs leave
        more = [r.job_id for r in await c.enqueue_batch("q", [pb.JobSpec()] * 2)]
        rest = await c.list_jobs("q", "ready", page_token=first.next_page_token, limit=1000)
        assert ids(rest.jobs) == made[4:] + more


async def test_refusals_name_the_field(cluster: Cluster) -> None:
    await cluster.leader()
    async with Client(cluster.addresses[2], max_retries=0) as c:
        await c.enqueue("q", b"x")
        for call, field in (
            (c.list_jobs("q", pb.JOB_STATE_UNSPECIFIED), "state"),
            (c.list_jobs("q", "ready", limit=1001), "limit"),
            (c.list_jobs("q", "ready", page_token="not-a-token"), "page_token"),
            (c.list_jobs("q", "ready", min_priority=2, max_priority=1), "min_priority"),
            (c.list_jobs("q", "ready", consistent=True, page_token="x"), "page_token"),
        ):
            with pytest.raises(InvalidArgumentError) as err:
                await call
            assert err.value.field == field
        token = (await c.list_jobs("q", "ready", limit=1)).next_page_token
        assert not token  # one job: no next page
        await c.enqueue("q", b"y")
        token = (await c.list_jobs("q", "ready", limit=1)).next_page_token
        with pytest.raises(InvalidArgumentError, match="another state"):
            await c.list_jobs("q", "dead", page_token=token)
        with pytest.raises(InvalidArgumentError) as err:
            await c.list_jobs("q", "sleeping")
        assert err.value.field == "state"
        with pytest.raises(NotFoundError):
            await c.list_jobs("nope", "ready")


async def test_a_tenant_lists_only_its_own_queues(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path, verifier=Verifier(SECRET), peer_token=node_tokens(SECRET))
    await cluster.start()
    try:
        await cluster.leader()

        def token(tenant: str, *roles: str) -> str:
            return issue(SECRET, tenant, roles, 600)

        async with (
            Client(cluster.addresses[1], token=token("acme", "producer")) as acme,
            Client(cluster.addresses[2], token=token("beta", "consumer")) as beta,
            Client(cluster.addresses[3], token=token("ops", "admin")) as ops,
        ):
            job_id = (await acme.enqueue("work", b"x")).job_id
            [job] = (await acme.list_jobs("work", "ready")).jobs
            assert (job.job_id, job.queue, job.tenant) == (job_id, "work", "acme")
            with pytest.raises(NotFoundError):
                await beta.list_jobs("work", "ready")  # beta's own "work": none
            with pytest.raises(PermissionDeniedError):
                await beta.list_jobs("acme/work", "ready")
            # Another client on another node: consistent, to see acme's write.
            [seen] = (await ops.list_jobs("acme/work", "ready", consistent=True)).jobs
            assert (seen.job_id, seen.queue) == (job_id, "acme/work")
    finally:
        await cluster.stop()


async def test_through_the_balancer(tmp_path: Path) -> None:
    async with balanced(tmp_path) as setup, Client(setup.balancer.address) as c:
        await c.enqueue_batch("q", [pb.JobSpec(priority=p) for p in (2, 0, 1, 0)])
        jobs = [j async for j in c.iter_jobs("q", "ready", page_size=3)]
        assert [j.priority for j in jobs] == [0, 0, 1, 2]
        consistent = await c.list_jobs("q", "ready", consistent=True)
        assert ids(consistent.jobs) == ids(jobs)
        with pytest.raises(InvalidArgumentError) as err:
            await c.list_jobs("q", "ready", page_token="%")
        assert err.value.field == "page_token"
