"""A node restarted on its data dir is in exactly the state it acknowledged."""

from __future__ import annotations

from pathlib import Path

from pqueue.core.snapshot import state_hash
from pqueue.node.queue_node import NodeConfig, QueueNode
from pqueue.storage.sqlite import SqliteStorage
from pqueue.v1 import log_pb2 as logpb
from pqueue.v1 import queue_pb2 as pb


def enqueue(n: int) -> logpb.Command:
    jobs = [pb.JobSpec(payload=f"{n}-{k}".encode(), priority=k % 3) for k in range(3)]
    return logpb.Command(enqueue=pb.EnqueueBatchRequest(queue="q", jobs=jobs))


async def test_restart_loads_the_snapshot_and_replays_the_rest(tmp_path: Path) -> None:
    config = NodeConfig(snapshot_every_entries=7)
    async with QueueNode(SqliteStorage(tmp_path), config) as node:
        for n in range(30):
            await node.propose(enqueue(n))
        leased = await node.propose(logpb.Command(lease=pb.LeaseRequest(queue="q", max_jobs=10)))
        assert isinstance(leased, pb.LeaseResponse)
        leases = [pb.JobLease(job_id=j.job_id, lease_id=j.lease_id) for j in leased.jobs[:4]]
        await node.propose(logpb.Command(ack=pb.AckRequest(queue="q", leases=leases)))
        expected, index = state_hash(node.machine), node.machine.applied_index
        assert node.log.status().snapshot_index > 0  # a snapshot was taken on the way

    storage = SqliteStorage(tmp_path)
    await storage.open()
    state = await storage.load_acceptor()
    await storage.close()
    assert state.snapshot is not None
    assert state.records  # the log after the snapshot...
    assert (
        min(r.slot for r in state.records) == state.snapshot.index + 1
    )  # ...and nothing behind it

    async with QueueNode(SqliteStorage(tmp_path), config) as node:
        assert (state_hash(node.machine), node.machine.applied_index) == (expected, index)
        [stats] = node.machine.stats("q", node.clock_ms())
        assert (stats.ready, stats.leased, stats.acked_total) == (80, 6, 4)
