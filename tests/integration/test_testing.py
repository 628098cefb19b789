"""``pqueue.testing``, used as a user would: a worker tested against a real node."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from pathlib import Path

import pqueue.testing
from pqueue.client import Client
from pqueue.v1 import queue_pb2 as pb
from pqueue.worker import Worker
from tests.unit.test_purity import _modules

ROOT = Path(__file__).resolve().parents[2]


async def test_a_worker_processes_jobs_against_a_local_node() -> None:
    handled: list[bytes] = []
    all_three = asyncio.Event()

    async def handle(job: pb.LeasedJob) -> str:
        handled.append(job.payload)
        if len(handled) == 3:
            all_three.set()
        return job.payload.decode().upper()

    async with pqueue.testing.local_node() as client:
        for word in ("alpha", "beta", "gamma"):
            await client.enqueue("words", word)
        worker = Worker(client, "words", handle, concurrency=2)
        run = asyncio.create_task(worker.run())
        try:
            await asyncio.wait_for(all_three.wait(), 10)
        finally:
            worker.stop()
            await asyncio.wait_for(run, 10)
        assert sorted(handled) == [b"alpha", b"beta", b"gamma"]
        [stats] = await client.stats("words")
        assert (stats.ready, stats.leased, stats.acked_total) == (0, 0, 3)
        done = await client.list_jobs("words", state="completed")
        assert sorted(j.result for j in done.jobs) == [b"ALPHA", b"BETA", b"GAMMA"]


async def test_the_node_is_gone_and_its_directory_removed_after(tmp_path: Path) -> None:
    async with pqueue.testing.started_node() as node:
        root = node.node.storage.data_dir.parent  # type: ignore[attr-defined]
        assert root.exists()
    assert not root.exists()
    async with pqueue.testing.started_node(tmp_path) as node:  # a directory of one's own
        address = node.address
        async with Client(address) as client:
            await client.enqueue("q", b"x")
    assert (tmp_path / "n1").exists()  # kept: it is the caller's
    async with pqueue.testing.local_node(tmp_path) as client:  # the same state, reopened
        [stats] = await client.stats("q")
        assert stats.ready == 1
    assert address.startswith("127.0.0.1:")


def test_the_pytest_plugin_gives_a_users_tests_a_client(tmp_path: Path) -> None:
    (tmp_path / "conftest.py").write_text('pytest_plugins = ["pqueue.testing.pytest_plugin"]\n')
    (tmp_path / "test_user.py").write_text(
        textwrap.dedent(
            """
            import asyncio

            import pytest

            from pqueue.worker import Worker


            @pytest.mark.asyncio
            async def test_enqueue_and_work(pqueue_client, pqueue_node):
                assert pqueue_client.endpoint == pqueue_node.address
                seen = []

                async def handle(job):
                    seen.append(job.payload)

                await pqueue_client.enqueue("emails", b"hello")
                worker = Worker(pqueue_client, "emails", handle)
                run = asyncio.create_task(worker.run())
                while not seen:
                    await asyncio.sleep(0.01)
                worker.stop()
                await run
                assert seen == [b"hello"]
                [stats] = await pqueue_client.stats("emails")
                assert stats.acked_total == 1


            @pytest.mark.asyncio
            async def test_each_test_has_a_fresh_node(pqueue_client):
                assert await pqueue_client.list_queues() == []
            """
        )
    )
    (tmp_path / "pytest.ini").write_text("[pytest]\n")  # the user's own, strict mode
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "2 passed" in out.stdout


def test_pqueue_testing_imports_nothing_of_the_project_tests() -> None:
    for path in (ROOT / "pqueue" / "testing").glob("*.py"):
        assert not [m for m in _modules(path) if m.split(".")[0] == "tests"], path
