"""Queues shared between tenants, as users meet them: a real cluster with auth."""

from __future__ import annotations

import asyncio
import json
import sys
from collections import Counter
from pathlib import Path

import pytest

from pqueue.client import Client
from pqueue.core.snapshot import state_hash
from pqueue.errors import PermissionDeniedError, ResourceExhaustedError
from pqueue.node.auth import Verifier, issue
from pqueue.node.quotas import Quotas
from pqueue.v1 import queue_pb2 as pb
from tests.inproc import Cluster, node_tokens, one_node

SECRET = b"s" * 32
PQ = (sys.executable, "-m", "pqueue.cli")


def token(tenant: str, *roles: str) -> str:
    return issue(SECRET, tenant, roles, 600)


async def pq(endpoint: str, tok: str, *args: str) -> object:
    """Run the CLI with ``-o json``; its parsed output."""
    run = await asyncio.create_subprocess_exec(
        *PQ, "--endpoint", endpoint, "--token", tok, "-o", "json", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await run.communicate()
    assert run.returncode == 0, err.decode()
    return json.loads(out)


async def test_a_shared_queue_leases_by_weight_within_the_priority_order(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path, verifier=Verifier(SECRET), peer_token=node_tokens(SECRET))
    await cluster.start()
    try:
        leader = await cluster.leader()
        follower = next(i for i in cluster.addresses if i != leader)
        at_leader, at_follower = cluster.addresses[leader], cluster.addresses[follower]
        # The operator shares acme's render queue with beta, at three times acme's weight.
        created = await pq(
            at_follower, token("ops", "admin"),
            "queue", "create", "acme/render", "--share", "beta=3", "--share", "acme=1",
        )  # fmt: skip
        assert created == {"queue": "acme/render", "created": True}
        async with (
            Client(at_leader, token=token("acme", "producer", "consumer")) as acme,
            Client(at_follower, token=token("beta", "producer", "consumer")) as beta,
            Client(at_follower, token=token("gamma", "producer")) as gamma,
        ):
            # acme's backlog arrives first; then beta's (through a follower, so the
            # leader stamps beta on the forwarded call); then two urgent jobs of acme's.
            await acme.enqueue_batch("render", [pb.JobSpec(priority=5)] * 300)
            await beta.enqueue_batch("acme/render", [pb.JobSpec(priority=5)] * 60)
            await acme.enqueue_batch("render", [pb.JobSpec(priority=0)] * 2)
            # Nobody else may enqueue, and beta may do nothing else with the queue.
            for refused in (
                gamma.enqueue("acme/render", b"x"),
                gamma.enqueue("acme/not-there", b"x"),
                beta.enqueue("acme/other", b"x"),
                beta.lease("acme/render"),
                beta.stats("acme/render"),
                beta.get_job("acme/render", 1),
            ):
                with pytest.raises(PermissionDeniedError):
                    await refused
            assert [s.queue for s in await beta.stats()] == []
            # acme's consumers lease: the urgent pair first, then 1:3.
            leased = []
            for _ in range(6):
                leased += await acme.lease("render", max_jobs=7)
            assert [(j.tenant, j.priority) for j in leased[:2]] == [("acme", 0)] * 2
            assert Counter(j.tenant for j in leased[2:]) == {"acme": 10, "beta": 30}
            await acme.ack_many("render", [(j.job_id, j.lease_id) for j in leased])
            # Whose job it is shows on the job, to the owner, in the CLI too.
            rows = await pq(at_leader, token("acme", "consumer"), "lease", "render")
            assert isinstance(rows, list)
            assert rows[0]["tenant"] in ("acme", "beta")
        await cluster.settled()
        # Every replica made the same choices.
        assert len({state_hash(s.node.machine) for s in cluster.servers.values()}) == 1
    finally:
        await cluster.stop()


QUOTAS = """
[tenants.beta]
enqueue_per_s = 5
enqueue_burst = 5
max_queue_depth = 8
"""


async def test_a_sharing_tenant_spends_its_own_quota(tmp_path: Path) -> None:
    async with one_node(tmp_path, verifier=Verifier(SECRET), quotas=Quotas.parse(QUOTAS)) as srv:
        async with Client(srv.address, max_retries=0, token=token("ops", "admin")) as admin:
            config = pb.QueueConfig(shares=[pb.TenantShare(tenant="beta")])
            await admin.create_queue("acme/render", config)
        async with (
            Client(srv.address, max_retries=0, token=token("acme", "producer")) as acme,
            Client(srv.address, max_retries=0, token=token("beta", "producer")) as beta,
        ):
            await beta.enqueue_batch("acme/render", [pb.JobSpec()] * 5)
            with pytest.raises(ResourceExhaustedError):  # beta's rate, not acme's
                await beta.enqueue("acme/render", b"x")
            await acme.enqueue_batch("render", [pb.JobSpec()] * 50)
            await asyncio.sleep(1.0)  # beta's bucket refills; its depth holds it at 8
            await beta.enqueue_batch("acme/render", [pb.JobSpec()] * 3)
            await asyncio.sleep(0.3)
            with pytest.raises(ResourceExhaustedError, match="limit is 8"):
                await beta.enqueue("acme/render", b"x")
