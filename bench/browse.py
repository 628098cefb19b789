"""What one ``ListJobs`` page costs a node: the pure read, timed on a state
machine holding a large backlog (no network, no node).

A page runs on the node's event loop, so it must not grow with the backlog.
READY jobs in the compact form are read from their FIFOs (a binary search
for the resume point, then about a page of rows); jobs held as objects
(grouped, delayed, dead...) are read once per page, O(n log limit).

    python -m bench.browse [--ready 1000000] [--objects 100000] [--repeat 20]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

from pqueue.core import browse
from pqueue.core.jobs import DEAD, DELAYED, READY
from pqueue.core.machine import QueueMachine
from pqueue.v1 import queue_pb2 as pb
from tests.machine_driver import Driver

BATCH = 1000


def fill(
    d: Driver, queue: str, n: int, priorities: int = 1, grouped: bool = False, **spec: Any
) -> None:
    """``n`` jobs in batches of 1000, priorities round-robin, each in a
    group of its own if ``grouped`` (so each is a ``Job`` object)."""
    made = 0
    while made < n:
        count = min(BATCH, n - made)
        jobs = [
            pb.JobSpec(
                payload=b"x" * 32,
                priority=i % priorities,
                group=f"g{i}" if grouped else "",
                **spec,
            )
            for i in range(made, made + count)
        ]
        d.ok(enqueue=pb.EnqueueBatchRequest(queue=queue, jobs=jobs))
        d.now += 1
        made += count


def kill_all(d: Driver, queue: str, n: int) -> None:
    """Lease and nack ``n`` jobs of a one-attempt queue: dead."""
    for _ in range(0, n, BATCH):
        leases = d.lease(queue, n=BATCH)
        for job in leases:
            d.nack(job, queue=queue)
        d.now += 1


def time_ms(fn: Callable[[], object], repeat: int) -> tuple[float, float]:
    """Median and worst wall time of ``fn``, in milliseconds."""
    runs = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        runs.append((time.perf_counter() - start) * 1000)
    return statistics.median(runs), max(runs)


def page(
    m: QueueMachine, queue: str, state: pb.JobState.ValueType, token: str = "", **req: Any
) -> Callable[[], pb.ListJobsResponse]:
    """One page's read, as the servicer makes it (the request parsed once)."""
    request = pb.ListJobsRequest(queue=queue, state=state, page_token=token, **req)
    query = browse.parse(request)
    return lambda: m.list_jobs(queue, query)


def ready_token(m: QueueMachine, queue: str, at: float) -> str:
    """A token resuming at fraction ``at`` of the queue's first FIFO (where
    a deep page starts)."""
    lane = next(iter(m.queues[queue].lanes.values()))
    line = next(iter(lane.fifo.values()))
    job = m.queues[queue].jobs[line[int((len(line) - 1) * at)]]
    return browse.encode_token(READY, (job.priority, job.ready_at_ms, job.job_id))


def object_token(m: QueueMachine, queue: str, state: pb.JobState.ValueType, at: float) -> str:
    """A token resuming at fraction ``at`` of a state's jobs (objects)."""
    q = m.queues[queue]
    jobs = sorted(
        (j for j in q.jobs.full_values() if j.state == state),
        key=browse._key_of(q, state),
        reverse=state == DEAD,
    )
    return browse.encode_token(state, browse._token_fields(jobs[int((len(jobs) - 1) * at)]))


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--ready", type=int, default=1_000_000)
    p.add_argument("--objects", type=int, default=100_000)
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--limit", type=int, default=100)
    a = p.parse_args()

    d = Driver(lifecycle=True)
    start = time.perf_counter()
    fill(d, "one", a.ready)
    fill(d, "spread", a.ready, priorities=10)
    aged = pb.QueueConfig(aging_interval_ms=1000)
    d.ok(create_queue=pb.CreateQueueRequest(queue="aged", config=aged))
    fill(d, "aged", a.ready, priorities=10)
    fill(d, "grouped", a.objects, grouped=True)
    fill(d, "later", a.objects, delay_ms=3_600_000)
    d.ok(create_queue=pb.CreateQueueRequest(queue="dead", config=pb.QueueConfig(max_attempts=1)))
    fill(d, "dead", a.objects)
    kill_all(d, "dead", a.objects)
    print(f"built in {time.perf_counter() - start:.0f} s: {d.m.job_count():,} jobs")

    m, n, limit = d.m, f"{a.ready:,}", a.limit
    objects = f"{a.objects:,}"
    cases = [
        (f"ready, {n} in 1 FIFO, first page", page(m, "one", READY, limit=limit)),
        (
            f"ready, {n} in 1 FIFO, at 50%",
            page(m, "one", READY, ready_token(m, "one", 0.5), limit=limit),
        ),
        (
            f"ready, {n} in 1 FIFO, at 99%",
            page(m, "one", READY, ready_token(m, "one", 0.99), limit=limit),
        ),
        (f"ready, {n} in 10 FIFOs, first page", page(m, "spread", READY, limit=limit)),
        (
            f"ready, {n} in 10 FIFOs, at 50%",
            page(m, "spread", READY, ready_token(m, "spread", 0.5), limit=limit),
        ),
        (
            f"ready, {n} in 10 FIFOs, priority 3-5",
            page(m, "spread", READY, limit=limit, min_priority=3, max_priority=5),
        ),
        (
            f"ready, {n} aged, 10 FIFOs, at 50%",
            page(m, "aged", READY, ready_token(m, "aged", 0.5), limit=limit),
        ),
        (f"ready, {objects} grouped (objects)", page(m, "grouped", READY, limit=limit)),
        (f"delayed, {objects} (objects)", page(m, "later", DELAYED, limit=limit)),
        (
            f"delayed, {objects}, at 50%",
            page(m, "later", DELAYED, object_token(m, "later", DELAYED, 0.5), limit=limit),
        ),
        (f"dead, {objects} (objects)", page(m, "dead", DEAD, limit=limit)),
        (
            f"dead, {objects}, at 50%",
            page(m, "dead", DEAD, object_token(m, "dead", DEAD, 0.5), limit=limit),
        ),
        (f"delayed (none) beside {n} ready", page(m, "one", DELAYED, limit=limit)),
    ]
    print(f"{'a page of ' + str(limit):44} {'median ms':>10} {'worst ms':>10}")
    for name, fn in cases:
        median, worst = time_ms(fn, a.repeat)
        print(f"{name:44} {median:10.2f} {worst:10.2f}")


if __name__ == "__main__":
    main()
