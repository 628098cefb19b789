"""A streaming consumer killed with ``kill -9`` mid-stream, holding leased jobs.

Three real ``pq node`` processes; the consumer is a ``Worker`` in its own
process, streaming through a follower (so the stream is relayed to the
leader). Killed while it holds jobs, it loses nothing: its leases expire,
another worker acks every job exactly once, and the dead consumer's lease
ids are refused (ABORTED) when presented later, by a single call or on a
stream.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from pqueue.client import Client
from pqueue.errors import LeaseLostError
from pqueue.v1 import queue_pb2 as pb
from pqueue.wire.status import from_op_status
from pqueue.worker import Worker, WorkerConfig
from tests.consume_raw import RawStream, ack
from tests.faults.cluster import ProcCluster, started

JOBS = 200
#: The dead consumer's leases: short, so they expire soon after the kill.
LEASE_MS = 1_500

CONSUMER = textwrap.dedent(
    """
    import asyncio, sys
    from pqueue.client import Client
    from pqueue.worker import Worker, WorkerConfig

    async def main() -> None:
        async with Client(sys.argv[1]) as client:
            async def hold(job) -> None:  # takes the job, and never finishes it
                print("holding", job.job_id, job.lease_id, flush=True)
                await asyncio.sleep(3600)
            config = WorkerConfig(concurrency=8, lease_ms=int(sys.argv[2]))
            await Worker(client, "q", hold, config=config).run()

    asyncio.run(main())
    """
)


async def _until(check: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[ProcCluster]:
    async with started(tmp_path) as c:
        yield c


async def test_a_killed_streaming_consumer_loses_nothing(
    cluster: ProcCluster, tmp_path: Path
) -> None:
    leader = await cluster.leader()
    follower = next(i for i in cluster.ports if i != leader)
    async with Client(cluster.endpoint, timeout_s=5) as c:
        await c.enqueue_batch("q", [pb.JobSpec(payload=b"%d" % i) for i in range(JOBS)])
    script = tmp_path / "consumer.py"
    script.write_text(CONSUMER)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(script),
        cluster.address(follower),
        str(LEASE_MS),
        stdout=asyncio.subprocess.PIPE,
    )
    held: list[tuple[int, int]] = []
    try:
        assert proc.stdout is not None
        while len(held) < 8:  # every slot holds a job: the consumer is mid-stream
            line = await asyncio.wait_for(proc.stdout.readline(), 30)
            assert line.startswith(b"holding"), line
            _, job, lease = line.split()
            held.append((int(job), int(lease)))
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()

    # Another worker, on the leader, drains the queue: the dead consumer's
    # jobs come back when their leases expire.
    handled: list[int] = []

    async def work(job: pb.LeasedJob) -> None:
        handled.append(job.job_id)

    async with Client(cluster.address(leader), timeout_s=5) as c:
        worker = Worker(c, "q", work, config=WorkerConfig(concurrency=16))
        task = asyncio.create_task(worker.run())
        try:
            await _until(lambda: worker.stats.acked == JOBS, 60)
        finally:
            worker.stop()
            await asyncio.wait_for(task, 30)
        [stats] = await c.stats("q", consistent=True)
        assert (stats.ready, stats.delayed, stats.leased, stats.dead) == (0, 0, 0, 0)
        assert stats.acked_total == JOBS  # nothing lost, nothing completed twice
        assert len(handled) == len(set(handled)) == JOBS  # each job once, here
        assert {job_id for job_id, _ in held} <= set(handled)  # the dead one's too
        assert stats.expired_total >= len(held)  # its leases ran out

        # The dead consumer's lease ids are stale: refused by a single call...
        for job_id, lease_id in held:
            with pytest.raises(LeaseLostError):
                await c.ack("q", job_id, lease_id)
            with pytest.raises(LeaseLostError):
                await c.extend("q", job_id, lease_id, 1_000)
    # ... and on a stream, in their own results only.
    stream = RawStream(cluster.address(follower))
    try:
        await stream.start("q")
        stale = [pb.LeasedJob(job_id=job_id, lease_id=lease_id) for job_id, lease_id in held]
        results = await stream.settle([ack("q", job) for job in stale])
        errors = [from_op_status(r.status) for r in results]
        assert all(isinstance(e, LeaseLostError) for e in errors), errors
    finally:
        await stream.close()
