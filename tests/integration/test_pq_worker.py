"""``pq worker`` as an operator runs it: a real process against a real node."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

from pqueue.client import Client
from pqueue.node.server import NodeServer
from pqueue.v1 import queue_pb2 as pb

PQ = (sys.executable, "-m", "pqueue.cli")
DONE = (pb.JOB_STATE_COMPLETED, pb.JOB_STATE_DEAD)


@asynccontextmanager
async def pq_worker(address: str, *args: str) -> AsyncIterator[asyncio.subprocess.Process]:
    """``pq worker ARGS`` running; killed at the end if the test left it running."""
    proc = await asyncio.create_subprocess_exec(
        *PQ,
        "--endpoint",
        address,
        "worker",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def stop(proc: asyncio.subprocess.Process, within_s: float = 20) -> str:
    """SIGTERM ``proc``; it must exit 0 within ``within_s``; its log."""
    proc.send_signal(signal.SIGTERM)
    _, err = await asyncio.wait_for(proc.communicate(), within_s)
    assert proc.returncode == 0, err.decode()
    return err.decode()


async def wait_job(
    client: Client, queue: str, job_id: int, done: Callable[[pb.Job], bool], within_s: float = 30
) -> pb.Job:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while True:
        job = await client.get_job(queue, job_id)
        if done(job):
            return job
        assert loop.time() < deadline, job
        await asyncio.sleep(0.05)


def in_state(*states: int) -> Callable[[pb.Job], bool]:
    return lambda job: job.state in states


def group_alive(pgid: int) -> bool:
    """Whether a live (not zombie) process is in process group ``pgid``."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


async def test_exec_success_acks_with_stdout_as_result(server: NodeServer, client: Client) -> None:
    await client.create_queue("q", pb.QueueConfig(max_result_bytes=40))
    small = (await client.enqueue("q", b"hello", priority=3)).job_id
    big = (await client.enqueue("q", b"x" * 100)).job_id
    env = '"$PQ_JOB_ID" "$PQ_QUEUE" "$PQ_ATTEMPT" "$PQ_PRIORITY" "$PQ_LEASE_ID"'
    cmd = f'printf "%s %s %s %s %s|" {env}; cat'
    async with pq_worker(server.address, "--queue", "q", "--exec", cmd) as proc:
        job = await wait_job(client, "q", small, in_state(*DONE))
        cut = await wait_job(client, "q", big, in_state(*DONE))
        log = await stop(proc)
    assert job.state == pb.JOB_STATE_COMPLETED
    head, payload = job.result.split(b"|")
    job_id, queue, attempt, priority, lease_id = head.decode().split()
    assert (int(job_id), queue, attempt, priority, payload) == (small, "q", "1", "3", b"hello")
    assert int(lease_id) > 0
    # Cut at the queue's max_result_bytes, and said so.
    assert cut.state == pb.JOB_STATE_COMPLETED
    assert len(cut.result) == 40
    assert cut.result.endswith(b"x")
    assert f"job {big}: result cut to 40 of" in log
    assert f"job {small} attempt 1: exit 0" in log


async def test_exec_failure_nacks_with_the_tail_of_stderr(
    server: NodeServer, client: Client
) -> None:
    await client.create_queue("once", pb.QueueConfig(max_attempts=1))
    await client.create_queue("again", pb.QueueConfig(max_attempts=5, backoff_base_ms=60_000))
    dead = (await client.enqueue("once", b"")).job_id
    retried = (await client.enqueue("again", b"")).job_id
    cmd = 'echo "noise" >&2; seq 1 2000 >&2; echo "it broke" >&2; exit 3'
    async with (
        pq_worker(server.address, "--queue", "once", "--exec", cmd) as w1,
        pq_worker(server.address, "--queue", "again", "--exec", cmd) as w2,
    ):
        job = await wait_job(client, "once", dead, in_state(pb.JOB_STATE_DEAD))
        back = await wait_job(client, "again", retried, lambda j: len(j.errors) == 1)
        log = await stop(w1)
        await stop(w2)
    [error] = job.errors
    assert error.reason.startswith("exit 3: …")
    assert error.reason.endswith("2000\nit broke")
    assert len(error.reason) <= len("exit 3: ") + 1000
    assert "noise" not in error.reason  # only the tail
    assert back.state == pb.JOB_STATE_DELAYED
    assert back.errors[0].reason.startswith("exit 3:")
    assert f"job {dead} attempt 1: exit 3" in log
    assert "it broke" in log


async def test_exec_timeout_kills_the_process_group_and_nacks(
    server: NodeServer, client: Client, tmp_path: Path
) -> None:
    await client.create_queue("q", pb.QueueConfig(max_attempts=1))
    job_id = (await client.enqueue("q", b"")).job_id
    pgid_file = tmp_path / "pgid"
    # A child that ignores SIGTERM, in the background: only SIGKILL to the group ends it.
    cmd = f"echo $$ > {pgid_file}; (trap '' TERM; sleep 60) & sleep 60"
    args = ("--queue", "q", "--timeout-s", "1", "--kill-grace-s", "0.5", "--exec", cmd)
    async with pq_worker(server.address, *args) as proc:
        job = await wait_job(client, "q", job_id, in_state(pb.JOB_STATE_DEAD))
        log = await stop(proc)
    assert [e.reason for e in job.errors] == ["timed out after 1s"]
    assert not group_alive(int(pgid_file.read_text()))
    assert f"job {job_id} attempt 1: timed out after 1s, killed" in log


async def test_sigterm_lets_a_running_command_finish(
    server: NodeServer, client: Client, tmp_path: Path
) -> None:
    started = tmp_path / "started"
    job_id = (await client.enqueue("q", b"")).job_id
    cmd = f"echo go > {started}; sleep 1; echo finished"
    async with pq_worker(
        server.address, "--queue", "q", "--shutdown-grace-s", "20", "--exec", cmd
    ) as proc:
        await wait_for_file(started)
        await stop(proc)
    job = await client.get_job("q", job_id)
    assert (job.state, job.result) == (pb.JOB_STATE_COMPLETED, b"finished\n")


async def test_sigterm_past_the_grace_releases_the_job(
    server: NodeServer, client: Client, tmp_path: Path
) -> None:
    started = tmp_path / "started"
    job_id = (await client.enqueue("q", b"")).job_id
    cmd = f"echo $$ > {started}; sleep 60"
    args = ("--queue", "q", "--shutdown-grace-s", "0.5", "--kill-grace-s", "0.5", "--exec", cmd)
    async with pq_worker(server.address, *args) as proc:
        await wait_for_file(started)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        log = await stop(proc)
        assert loop.time() - t0 < 10
    job = await client.get_job("q", job_id)
    # Released: ready at once, no error recorded; the command is gone.
    assert (job.state, list(job.errors)) == (pb.JOB_STATE_READY, [])
    assert not group_alive(int(started.read_text()))
    assert f"job {job_id} attempt 1: killed at shutdown; released" in log


async def wait_for_file(path: Path, within_s: float = 20) -> None:
    """Until the command wrote ``path`` (it runs)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while not _written(path):
        assert loop.time() < deadline
        await asyncio.sleep(0.05)


def _written(path: Path) -> bool:
    return path.exists() and bool(path.read_text().strip())


class _Endpoint(BaseHTTPRequestHandler):
    seen: ClassVar[list[dict[str, str]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.seen.append({k.lower(): v for k, v in self.headers.items()})
        if self.path == "/ok":
            status, answer = 200, b"got " + body + b" #" + self.headers["X-PQ-Job-Id"].encode()
        else:
            status, answer = 500, b"upstream said no"
        self.send_response(status)
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextmanager
def http_endpoint() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Endpoint)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


async def test_http_posts_each_job_and_acks_on_2xx(server: NodeServer, client: Client) -> None:
    await client.create_queue("bad", pb.QueueConfig(max_attempts=1))
    good = (await client.enqueue("good", b"hi", priority=2)).job_id
    bad = (await client.enqueue("bad", b"")).job_id
    with http_endpoint() as url:
        async with (
            pq_worker(server.address, "--queue", "good", "--http", f"{url}/ok") as w1,
            pq_worker(server.address, "--queue", "bad", "--http", f"{url}/fail") as w2,
        ):
            done = await wait_job(client, "good", good, in_state(*DONE))
            dead = await wait_job(client, "bad", bad, in_state(*DONE))
            await stop(w1)
            await stop(w2)
    assert (done.state, done.result) == (pb.JOB_STATE_COMPLETED, f"got hi #{good}".encode())
    assert dead.state == pb.JOB_STATE_DEAD
    assert [e.reason for e in dead.errors] == ["HTTP 500: upstream said no"]
    headers = next(h for h in _Endpoint.seen if h["x-pq-job-id"] == str(good))
    assert (headers["x-pq-queue"], headers["x-pq-attempt"], headers["x-pq-priority"]) == (
        "good",
        "1",
        "2",
    )
    assert int(headers["x-pq-lease-id"]) > 0


async def test_an_unreachable_endpoint_nacks(server: NodeServer, client: Client) -> None:
    await client.create_queue("q", pb.QueueConfig(max_attempts=1))
    job_id = (await client.enqueue("q", b"")).job_id
    with http_endpoint() as url:
        pass  # its port is closed now
    async with pq_worker(server.address, "--queue", "q", "--http", url) as proc:
        job = await wait_job(client, "q", job_id, in_state(pb.JOB_STATE_DEAD))
        await stop(proc)
    assert job.errors[0].reason.startswith("POST failed:")


async def test_pq_worker_refuses_both_or_neither_way() -> None:
    for args in ((), ("--exec", "true", "--http", "http://x")):
        proc = await asyncio.create_subprocess_exec(
            *PQ,
            "worker",
            "--queue",
            "q",
            *args,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "PQ_ENDPOINT": "127.0.0.1:1"},
        )
        _, err = await proc.communicate()
        assert proc.returncode == 2
        assert b"--exec" in err


def started(marks: Path) -> int:
    """How many commands have marked their start in ``marks``."""
    return len(list(marks.iterdir()))


async def test_a_buffer_holds_jobs_beyond_the_concurrency_and_runs_them_in_turn(
    server: NodeServer, client: Client, tmp_path: Path
) -> None:
    ids = [(await client.enqueue("q", b"%d" % i)).job_id for i in range(3)]
    marks = tmp_path / "marks"
    marks.mkdir()
    go = tmp_path / "go"
    # Each command marks its start and holds its slot until the test says go.
    cmd = f"touch {marks}/$PQ_JOB_ID; while [ ! -e {go} ]; do sleep 0.02; done; cat"
    args = ("--queue", "q", "--exec", cmd, "--concurrency", "1", "--buffer", "2")
    async with pq_worker(server.address, *args) as proc:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        while started(marks) < 1 or (await client.stats("q"))[0].leased < 3:
            assert loop.time() < deadline  # one running, two held
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.3)
        assert started(marks) == 1  # held, not run: one command at a time
        go.touch()
        for job_id in ids:
            await wait_job(client, "q", job_id, in_state(pb.JOB_STATE_COMPLETED))
        log = await stop(proc)
    assert "concurrency 1, buffer 2" in log
    assert started(marks) == 3


async def test_a_buffer_out_of_range_is_refused_before_connecting() -> None:
    for args in (
        ("--buffer", "-1"),
        ("--buffer", "1000"),
        ("--concurrency", "2", "--buffer", "999"),
    ):
        proc = await asyncio.create_subprocess_exec(
            *PQ,
            "worker",
            "--queue",
            "q",
            "--exec",
            "true",
            *args,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "PQ_ENDPOINT": "127.0.0.1:1"},
        )
        _, err = await proc.communicate()
        assert proc.returncode == 2
        assert b"--buffer" in err
