"""A worker process stops on SIGTERM: it finishes what it runs and exits 0."""

from __future__ import annotations

import asyncio
import signal
import sys
import textwrap
from pathlib import Path

from pqueue.client import Client
from pqueue.node.server import NodeServer
from pqueue.v1 import queue_pb2 as pb

WORKER = textwrap.dedent(
    """
    import asyncio, sys
    from pqueue.client import Client
    from pqueue.worker import Worker, WorkerConfig

    async def main() -> None:
        async with Client(sys.argv[1]) as client:
            async def handle(job) -> None:
                print("started", job.job_id, flush=True)
                await asyncio.sleep(0.5)
            config = WorkerConfig(concurrency=2, wait_ms=200, shutdown_grace_s=10)
            await Worker(client, "q", handle, config=config).run_until_signal()
        print("stopped", flush=True)

    asyncio.run(main())
    """
)


async def test_sigterm_finishes_running_jobs_then_exits(
    server: NodeServer, client: Client, tmp_path: Path
) -> None:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    await client.enqueue_batch("q", [pb.JobSpec(payload=b"a"), pb.JobSpec(payload=b"b")])
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(script), server.address, stdout=asyncio.subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 20)
        assert line.startswith(b"started")
        proc.send_signal(signal.SIGTERM)
        out, _ = await asyncio.wait_for(proc.communicate(), 20)
        assert proc.returncode == 0
        assert out.strip().endswith(b"stopped")
        [stats] = await client.stats("q")
        assert (stats.acked_total, stats.leased) == (2, 0)  # both finished, none dropped
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
