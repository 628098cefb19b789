"""``kill -9`` a real node under load, restart it, and find exactly what was acknowledged."""

from __future__ import annotations

import asyncio
from pathlib import Path

from pqueue.client import Client, job_spec
from pqueue.errors import PQueueError
from pqueue.v1 import queue_pb2 as pb
from tests.proc import NodeProcess

BATCH = 10


async def test_kill_9_keeps_every_acknowledged_change(tmp_path: Path) -> None:
    node = NodeProcess(tmp_path / "n1")
    try:
        async with Client(node.start(), max_retries=0, timeout_s=5) as c:
            await c.create_queue("q", pb.QueueConfig(default_lease_ms=600_000))
            acked_enqueues: list[int] = []
            for i in range(20):
                rs = await c.enqueue_batch("q", [job_spec(f"{i}-{k}") for k in range(BATCH)])
                acked_enqueues += [r.job_id for r in rs]
            leased = await c.lease("q", max_jobs=60)
            acked = leased[:40]
            held = leased[40:]
            assert await c.ack_many("q", [(j.job_id, j.lease_id) for j in acked]) == 40
            dead_candidate = held.pop()
            await c.nack(
                "q", dead_candidate.job_id, dead_candidate.lease_id, delay_ms=0, reason="r"
            )

            # Keep writing while the node dies: these are not acknowledged (yet).
            async def writer() -> list[int]:
                done: list[int] = []
                for i in range(1000):
                    try:
                        rs = await c.enqueue_batch(
                            "q", [job_spec(f"late-{i}-{k}") for k in range(BATCH)]
                        )
                    except PQueueError:
                        return done
                    done += [r.job_id for r in rs]
                return done

            load = asyncio.create_task(writer())
            await asyncio.sleep(0.3)
            node.kill9()
            late_acked = await load
            print(f"acknowledged under load before the kill: {len(late_acked)} jobs")

        async with Client(node.start(), max_retries=0, timeout_s=5) as c:
            [stats] = await c.stats("q")
            acked_ids = {j.job_id for j in acked}
            for job_id in acked_enqueues + late_acked:
                if job_id in acked_ids:
                    continue
                job = await c.get_job("q", job_id)  # every acknowledged enqueue is there
                assert job.state in (pb.JOB_STATE_READY, pb.JOB_STATE_LEASED)
            for j in acked:  # every acknowledged ack holds: a COMPLETED record, or gone
                try:
                    state = (await c.get_job("q", j.job_id)).state
                except PQueueError:
                    continue
                assert state == pb.JOB_STATE_COMPLETED, f"acked job {j.job_id} came back"
            for j in held:  # leases survive a restart, under the same fencing token
                got = await c.get_job("q", j.job_id)
                assert (got.state, got.attempts) == (pb.JOB_STATE_LEASED, 1)
            await c.ack("q", held[0].job_id, held[0].lease_id)
            nacked = await c.get_job("q", dead_candidate.job_id)
            assert (nacked.state, nacked.errors[0].reason) == (pb.JOB_STATE_READY, "r")
            # Unacknowledged batches are all-or-nothing: no half-applied batch.
            assert stats.enqueued_total % BATCH == 0
            assert stats.enqueued_total >= len(acked_enqueues) + len(late_acked)
            assert stats.acked_total == 40
    finally:
        node.ensure_stopped()


async def test_sigterm_drains_and_exits_cleanly(tmp_path: Path) -> None:
    node = NodeProcess(tmp_path / "n1")
    try:
        async with Client(node.start(), max_retries=0) as c:
            await c.enqueue("q", b"x")
            poll = asyncio.create_task(c.lease("q", max_jobs=5, wait_ms=30_000))
            await asyncio.sleep(0.3)
            assert len(await poll) == 1
            poll = asyncio.create_task(c.lease("q", wait_ms=30_000))
            await asyncio.sleep(0.3)
            status = await asyncio.to_thread(node.terminate)
            assert status == 0
            assert await poll == []  # the long poll ended empty, not with an error
    finally:
        node.ensure_stopped()
