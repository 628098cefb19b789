"""``pq worker``: run a shell command (or POST to a URL) for each job of a queue.

Built on ``pqueue.worker.Worker`` (streamed jobs, leases extended while a
command runs, graceful stop). Per job:

- ``--exec CMD``: ``/bin/sh -c CMD`` in a process group of its own, the
  payload on stdin, ``PQ_JOB_ID``, ``PQ_QUEUE``, ``PQ_ATTEMPT``,
  ``PQ_PRIORITY`` and ``PQ_LEASE_ID`` in its environment. Exit 0 acks with
  stdout as the job's result (cut at the queue's ``max_result_bytes``);
  another exit nacks with the tail of stderr; past ``--timeout-s`` the group
  gets SIGTERM, SIGKILL after ``--kill-grace-s``, and the job is nacked.
- ``--http URL``: POST the payload, with the job in ``X-PQ-*`` headers; a 2xx
  acks with the response body as the result, anything else nacks with the
  status and the body's tail.

SIGTERM or SIGINT: take no more jobs, let running ones finish within
``--shutdown-grace-s``, then kill what still runs and release its job.
One log line per job outcome, on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pqueue.cli.client import client_options
from pqueue.cli.failure import exit_code, failure_line
from pqueue.client import Client
from pqueue.consumer import MAX_CREDITS
from pqueue.errors import NotFoundError, PQueueError
from pqueue.v1 import queue_pb2 as pb
from pqueue.wire.logs import describe
from pqueue.worker import JobFailed, Worker, WorkerConfig

logger = logging.getLogger("pq.worker")

#: A result is cut here when the queue says nothing (its default).
DEFAULT_MAX_RESULT_BYTES = 65536
#: Characters of stderr (or of an HTTP error body) kept as a nack's reason.
REASON_TAIL_CHARS = 1000
_CHUNK = 65536


def job_env(job: pb.LeasedJob, queue: str, base: Mapping[str, str]) -> dict[str, str]:
    """The environment a job's command runs in: ``base`` and the job's own variables."""
    env = dict(base)
    env.update(
        PQ_JOB_ID=str(job.job_id),
        PQ_QUEUE=job.queue or queue,
        PQ_ATTEMPT=str(job.attempt),
        PQ_PRIORITY=str(job.priority),
        PQ_LEASE_ID=str(job.lease_id),
    )
    return env


def job_headers(job: pb.LeasedJob, queue: str) -> dict[str, str]:
    """The headers a job's POST carries (``--http``)."""
    return {
        "Content-Type": "application/octet-stream",
        "X-PQ-Job-Id": str(job.job_id),
        "X-PQ-Queue": job.queue or queue,
        "X-PQ-Attempt": str(job.attempt),
        "X-PQ-Priority": str(job.priority),
        "X-PQ-Lease-Id": str(job.lease_id),
    }


def tail(data: bytes, chars: int = REASON_TAIL_CHARS) -> str:
    """The last ``chars`` characters of ``data`` (decoded leniently, stripped),
    marked with a leading ``…`` when cut."""
    text = data.decode(errors="replace").strip()
    return text if len(text) <= chars else "…" + text[len(text) - chars + 1 :]


@dataclass
class Capped:
    """The first ``limit`` bytes of a stream, and how many there were in all."""

    limit: int
    data: bytearray
    total: int = 0

    def add(self, chunk: bytes) -> None:
        room = self.limit - len(self.data)
        if room > 0:
            self.data += chunk[:room]
        self.total += len(chunk)

    @property
    def cut(self) -> bool:
        return self.total > len(self.data)


@dataclass
class Tail:
    """The last ``keep`` bytes of a stream."""

    keep: int
    data: bytearray

    def add(self, chunk: bytes) -> None:
        self.data += chunk
        if len(self.data) > self.keep:
            del self.data[: len(self.data) - self.keep]


def result_of(out: Capped, job: pb.LeasedJob) -> bytes:
    """The job's result: what was kept, with a log line when it was cut."""
    if out.cut:
        logger.warning(
            "job %d: result cut to %d of %d bytes (the queue's max_result_bytes)",
            job.job_id,
            len(out.data),
            out.total,
        )
    return bytes(out.data)


async def _drain(stream: asyncio.StreamReader | None, sink: Capped | Tail) -> None:
    if stream is None:
        return
    while chunk := await stream.read(_CHUNK):
        sink.add(chunk)


async def _feed(proc: asyncio.subprocess.Process, payload: bytes) -> None:
    if proc.stdin is None:
        return
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        proc.stdin.write(payload)
        await proc.stdin.drain()
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        proc.stdin.close()


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


async def kill_group(proc: asyncio.subprocess.Process, grace_s: float) -> None:
    """SIGTERM the command's process group; SIGKILL it after ``grace_s``
    (whatever of the group still lives: the shell may be gone, its children not)."""
    _signal_group(proc.pid, signal.SIGTERM)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.shield(proc.wait()), grace_s)
    _signal_group(proc.pid, signal.SIGKILL)
    await proc.wait()


@dataclass(frozen=True)
class ExecHandler:
    """Runs ``command`` for each job (``--exec``)."""

    command: str
    queue: str
    timeout_s: float
    kill_grace_s: float
    max_result_bytes: int

    async def __call__(self, job: pb.LeasedJob) -> bytes:
        started = time.monotonic()
        proc = await asyncio.create_subprocess_exec(
            "/bin/sh",
            "-c",
            self.command,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=job_env(job, self.queue, os.environ),
            start_new_session=True,  # its own process group, out of reach of our ^C
        )
        out, err = (
            Capped(self.max_result_bytes, bytearray()),
            Tail(4 * REASON_TAIL_CHARS, bytearray()),
        )
        run = asyncio.gather(
            _feed(proc, job.payload), _drain(proc.stdout, out), _drain(proc.stderr, err)
        )
        try:
            await asyncio.wait_for(asyncio.shield(run), self.timeout_s)
            code = await asyncio.wait_for(proc.wait(), max(0.0, self.timeout_s - _since(started)))
        except TimeoutError:
            await kill_group(proc, self.kill_grace_s)
            run.cancel()
            reason = f"timed out after {self.timeout_s:g}s"
            logger.warning("job %d attempt %d: %s, killed; nacked", job.job_id, job.attempt, reason)
            raise JobFailed(reason) from None
        except asyncio.CancelledError:  # the shutdown grace is over: released
            await kill_group(proc, self.kill_grace_s)
            run.cancel()
            logger.warning("job %d attempt %d: killed at shutdown; released", *_ids(job))
            raise
        finally:
            _signal_group(proc.pid, signal.SIGKILL)  # nothing of it outlives the job
        elapsed = _since(started)
        if code != 0:
            why = tail(bytes(err.data)) or "(no stderr)"
            logger.warning(
                "job %d attempt %d: exit %d in %.2fs; nacked: %s",
                *_ids(job),
                code,
                elapsed,
                why.splitlines()[-1] if why else "",
            )
            raise JobFailed(f"exit {code}: {why}")
        result = result_of(out, job)
        logger.info(
            "job %d attempt %d: exit 0 in %.2fs; acked, result %d bytes",
            *_ids(job),
            elapsed,
            len(result),
        )
        return result


@dataclass(frozen=True)
class HttpHandler:
    """POSTs each job to ``url`` (``--http``)."""

    url: str
    queue: str
    timeout_s: float
    max_result_bytes: int

    def _post(self, job: pb.LeasedJob) -> tuple[int, Capped]:
        """The status and (capped) body of the POST; runs in a thread."""
        req = urllib.request.Request(
            self.url, data=job.payload, headers=job_headers(job, self.queue), method="POST"
        )
        try:
            resp = urllib.request.urlopen(req, timeout=self.timeout_s)
        except urllib.error.HTTPError as exc:
            resp = exc
        with resp:
            body = Capped(self.max_result_bytes, bytearray())
            while chunk := resp.read(_CHUNK):
                body.add(chunk)
            return resp.status or 0, body

    async def __call__(self, job: pb.LeasedJob) -> bytes:
        started = time.monotonic()
        try:
            status, body = await asyncio.wait_for(
                asyncio.to_thread(self._post, job), self.timeout_s
            )
        except TimeoutError:
            reason = f"timed out after {self.timeout_s:g}s"
            logger.warning("job %d attempt %d: %s; nacked", *_ids(job), reason)
            raise JobFailed(reason) from None
        except (OSError, ValueError) as exc:  # refused, unreachable, a socket timeout
            reason = f"POST failed: {describe(exc)}"
            logger.warning("job %d attempt %d: %s; nacked", *_ids(job), reason)
            raise JobFailed(reason) from None
        elapsed = _since(started)
        if not 200 <= status < 300:
            reason = f"HTTP {status}: {tail(bytes(body.data))}".rstrip(": ")
            logger.warning(
                "job %d attempt %d: HTTP %d in %.2fs; nacked", *_ids(job), status, elapsed
            )
            raise JobFailed(reason)
        result = result_of(body, job)
        logger.info(
            "job %d attempt %d: HTTP %d in %.2fs; acked, result %d bytes",
            *_ids(job),
            status,
            elapsed,
            len(result),
        )
        return result


def _ids(job: pb.LeasedJob) -> tuple[int, int]:
    return job.job_id, job.attempt


def _since(started: float) -> float:
    return time.monotonic() - started


async def _max_result_bytes(client: Client, queue: str) -> int:
    """The queue's ``max_result_bytes`` (its default when unset or not created yet)."""
    try:
        info = await client.get_queue(queue)
    except NotFoundError:
        return DEFAULT_MAX_RESULT_BYTES
    return info.config.max_result_bytes or DEFAULT_MAX_RESULT_BYTES


async def serve(args: argparse.Namespace) -> int:
    if args.buffer and args.concurrency + args.buffer > MAX_CREDITS:
        logger.error("--concurrency plus --buffer must be at most %d", MAX_CREDITS)
        return 2
    options = client_options(args)
    async with Client(args.endpoint, timeout_s=args.timeout_s, **options) as client:
        try:
            limit = await _max_result_bytes(client, args.queue)
        except PQueueError as exc:
            logger.error("cannot read queue %s: %s", args.queue, describe(exc))
            return 1
        handler: ExecHandler | HttpHandler
        if args.exec is not None:
            handler = ExecHandler(
                args.exec, args.queue, args.job_timeout_s, args.kill_grace_s, limit
            )
        else:
            handler = HttpHandler(args.http, args.queue, args.job_timeout_s, limit)
        config = WorkerConfig(
            concurrency=args.concurrency,
            buffer=args.buffer,
            lease_ms=args.lease_ms,
            shutdown_grace_s=args.shutdown_grace_s,
            consumer_id=args.consumer_id or f"{socket.gethostname()}:{os.getpid()}",
        )
        worker = Worker(client, args.queue, handler, config=config)
        what = f"exec {args.exec!r}" if args.exec is not None else f"POST {args.http}"
        logger.info(
            "worker on %s at %s: %s, concurrency %d, buffer %d",
            args.queue,
            args.endpoint,
            what,
            args.concurrency,
            args.buffer,
        )
        try:
            await worker.run_until_signal()
        except PQueueError as exc:
            logger.error("worker on %s stopped: %s", args.queue, describe(exc))
            return 1
        s = worker.stats
        logger.info(
            "worker on %s stopped: %d acked, %d failed, %d released, %d leases lost",
            args.queue,
            s.acked,
            s.failed,
            s.released,
            s.lost,
        )
    return 0


def run_worker(args: argparse.Namespace) -> int:
    """Run ``pq worker`` until SIGTERM or SIGINT."""
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("pqueue").setLevel(logging.WARNING)
    try:
        return asyncio.run(serve(args))
    except (OSError, ValueError) as exc:
        print(failure_line(exc), file=sys.stderr)
        return exit_code(exc)


def _positive(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be positive")
    return value


def _non_negative(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must not be negative")
    return value


def _count(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _buffer(text: str) -> int:
    value = int(text)
    if not 0 <= value <= MAX_CREDITS - 1:
        raise argparse.ArgumentTypeError(f"must be 0..{MAX_CREDITS - 1}")
    return value


def register(sub: Any) -> None:
    """The ``worker`` subparser."""
    w = sub.add_parser(
        "worker",
        help="run a command (or POST to a URL) for each job of a queue",
        description=(
            "Consume QUEUE: run CMD per job (payload on stdin, PQ_JOB_ID, PQ_QUEUE, "
            "PQ_ATTEMPT, PQ_PRIORITY, PQ_LEASE_ID in the environment; exit 0 acks with "
            "stdout as the result, another exit nacks with stderr's tail), or POST it to "
            "URL (2xx acks with the body as the result). SIGTERM: finish or release."
        ),
    )
    w.set_defaults(run=run_worker)
    w.add_argument("--queue", required=True, help="the queue to consume")
    how = w.add_mutually_exclusive_group(required=True)
    how.add_argument("--exec", metavar="CMD", help="a shell command, run by /bin/sh -c")
    how.add_argument("--http", metavar="URL", help="POST each job's payload here")
    w.add_argument("--concurrency", type=_count, default=1, help="jobs at once (default 1)")
    w.add_argument(
        "--buffer",
        type=_buffer,
        default=0,
        help="jobs held beyond --concurrency, started as slots free: no slot waits for a "
        "push, but a held job may run before a more urgent one enqueued later (default 0)",
    )
    w.add_argument(
        "--timeout-s",
        dest="job_timeout_s",
        type=_positive,
        default=300.0,
        help="a job's time limit; then killed and nacked (default %(default)s)",
    )
    w.add_argument(
        "--kill-grace-s",
        type=_non_negative,
        default=5.0,
        help="from SIGTERM to SIGKILL of a command's group (default %(default)s)",
    )
    w.add_argument("--lease-ms", type=int, default=30_000, help="lease, extended while a job runs")
    w.add_argument(
        "--shutdown-grace-s",
        type=_non_negative,
        default=30.0,
        help="on SIGTERM: how long running jobs may finish (default %(default)s)",
    )
    w.add_argument("--consumer-id", default="", help="default HOST:PID")
    w.add_argument("-q", "--quiet", action="store_true", help="log only failures")
