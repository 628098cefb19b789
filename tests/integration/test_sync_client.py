"""The blocking facade, against a server running on its own loop thread."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from pqueue.client import SyncClient
from pqueue.errors import LeaseLostError
from pqueue.node.server import NodeServer, ServerConfig
from pqueue.storage.sqlite import SqliteStorage


@pytest.fixture
def threaded_server(tmp_path: Path) -> Iterator[str]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    srv = NodeServer(SqliteStorage(tmp_path), ServerConfig(listen="127.0.0.1:0", grace_s=0.5))
    asyncio.run_coroutine_threadsafe(srv.start(), loop).result(10)
    try:
        yield srv.address
    finally:
        asyncio.run_coroutine_threadsafe(srv.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()


def test_sync_client_round_trip(threaded_server: str) -> None:
    with SyncClient(threaded_server, max_retries=0) as c:
        r = c.enqueue("q", "text payload", priority=1)
        [job] = c.lease("q", wait_ms=100)
        assert (job.job_id, job.payload) == (r.job_id, b"text payload")
        with pytest.raises(LeaseLostError):
            c.ack("q", job.job_id, job.lease_id + 7)
        c.ack("q", job.job_id, job.lease_id)
        assert c.stats("q")[0].acked_total == 1


def test_sync_client_lists_jobs_a_page_at_a_time(threaded_server: str) -> None:
    with SyncClient(threaded_server, max_retries=0) as c:
        made = [c.enqueue("q", f"job {k}", priority=k % 2).job_id for k in range(5)]
        page = c.list_jobs("q", "ready", limit=2)
        assert [j.job_id for j in page.jobs] == [made[0], made[2]]
        assert page.next_page_token
        assert [j.job_id for j in c.iter_jobs("q", "READY", page_size=2)] == (
            made[0::2] + made[1::2]
        )
        assert list(c.iter_jobs("q", "dead")) == []
