"""``pq worker``'s pure parts: a job's environment and headers, what is kept of output."""

from __future__ import annotations

from pqueue.cli import build_parser
from pqueue.cli.worker import Capped, Tail, job_env, job_headers, tail
from pqueue.v1 import queue_pb2 as pb

JOB = pb.LeasedJob(job_id=42, lease_id=7, priority=-3, attempt=2, queue="emails", payload=b"x")


def test_a_command_sees_the_job_in_its_environment() -> None:
    env = job_env(JOB, "emails", {"PATH": "/bin", "PQ_JOB_ID": "stale"})
    assert env == {
        "PATH": "/bin",
        "PQ_JOB_ID": "42",
        "PQ_QUEUE": "emails",
        "PQ_ATTEMPT": "2",
        "PQ_PRIORITY": "-3",
        "PQ_LEASE_ID": "7",
    }
    # A job pushed without its queue's name carries the worker's.
    assert job_env(pb.LeasedJob(job_id=1), "q", {})["PQ_QUEUE"] == "q"


def test_a_post_carries_the_job_in_its_headers() -> None:
    headers = job_headers(JOB, "emails")
    assert headers["X-PQ-Job-Id"] == "42"
    assert headers["X-PQ-Attempt"] == "2"
    assert headers["X-PQ-Priority"] == "-3"
    assert headers["X-PQ-Lease-Id"] == "7"
    assert headers["X-PQ-Queue"] == "emails"


def test_the_result_keeps_the_first_bytes_and_counts_the_rest() -> None:
    out = Capped(5, bytearray())
    out.add(b"abc")
    assert not out.cut
    out.add(b"defgh")
    out.add(b"ij")
    assert (bytes(out.data), out.total, out.cut) == (b"abcde", 10, True)
    exact = Capped(3, bytearray())
    exact.add(b"abc")
    assert not exact.cut


def test_stderr_keeps_the_last_bytes() -> None:
    err = Tail(4, bytearray())
    for chunk in (b"ab", b"cdef", b"g"):
        err.add(chunk)
    assert bytes(err.data) == b"defg"


def test_a_reason_is_the_tail_of_the_text_marked_when_cut() -> None:
    assert tail(b"  short\n") == "short"
    assert tail(b"0123456789", chars=4) == "…789"
    assert len(tail(b"y" * 5000)) == 1000
    assert tail(b"\xff ok") == "\ufffd ok"  # not UTF-8: still a reason


def test_the_job_time_limit_is_not_the_call_deadline() -> None:
    args = build_parser().parse_args(
        ["--timeout-s", "3", "worker", "--queue", "q", "--exec", "true", "--timeout-s", "60"]
    )
    assert (args.timeout_s, args.job_timeout_s) == (3.0, 60.0)
    assert (args.concurrency, args.exec, args.http) == (1, "true", None)
