"""``pq``'s failure lines: ``error: CODE: message``, flags instead of
protobuf fields, a hint for a refused connection, and the exit codes."""

from __future__ import annotations

import pytest

from pqueue.cli.failure import (
    UsageError,
    connection_hint,
    exit_code,
    failure_line,
    flag_of,
)
from pqueue.client import DEFAULT_ENDPOINT
from pqueue.errors import (
    AlreadyExistsError,
    InvalidArgumentError,
    NotFoundError,
    NotTakenError,
    UnavailableError,
)

REFUSED = (
    "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:7700: "
    "Failed to connect to remote host: Connection refused"
)


@pytest.mark.parametrize(
    ("field", "flag"),
    [
        ("job.priority", "--priority"),
        ("jobs[0].priority", "--priority"),
        ("jobs[12].not_before_ms", "--not-before"),
        ("config.default_lease_ms", "--lease-ms"),
        ("config.shares[1].weight", "--share[1].weight"),
        ("queue", "QUEUE"),
        ("page_token", "--page-token"),
        ("schedule.cron", "--cron"),
        ("update_mask[1]", "update_mask[1]"),  # no flag sets it: the field as is
    ],
)
def test_fields_show_as_the_flags_that_set_them(field: str, flag: str) -> None:
    assert flag_of(field) == flag


def test_failure_lines_and_exit_codes() -> None:
    bad = InvalidArgumentError("config.default_lease_ms", "must exceed 0")
    assert failure_line(bad) == "error: INVALID_ARGUMENT: --lease-ms: must exceed 0"
    assert exit_code(bad) == 1  # the server refused it
    refused = UsageError("--ttl-ms", "must be positive")
    assert failure_line(refused) == "error: INVALID_ARGUMENT: --ttl-ms: must be positive"
    assert exit_code(refused) == 2  # refused before any call
    protobuf = ValueError("Value out of range: -1")
    assert failure_line(protobuf) == "error: INVALID_ARGUMENT: Value out of range: -1"
    assert exit_code(protobuf) == 2
    assert failure_line(NotFoundError("queue 'q' not found")) == (
        "error: NOT_FOUND: queue 'q' not found"
    )
    exists = AlreadyExistsError(
        "queue 'q' exists with a different config: max_attempts is 3, asked 4"
    )
    assert failure_line(exists) == (
        "error: ALREADY_EXISTS: queue 'q' exists with a different config: "
        "--max-attempts is 3, asked 4"
    )
    bug = RuntimeError("boom")
    assert failure_line(bug) == "error: INTERNAL: RuntimeError: boom (PQ_DEBUG=1 shows where)"
    assert exit_code(bug) == 1
    assert failure_line(FileNotFoundError(2, "No such file or directory", "x")).startswith(
        "error: NOT_FOUND: "
    )


def test_a_refused_connection_says_where_and_what_to_check() -> None:
    line = failure_line(UnavailableError(REFUSED), DEFAULT_ENDPOINT, DEFAULT_ENDPOINT)
    assert line == "error: UNAVAILABLE: no cluster at 127.0.0.1:7700 — is 'make cluster' running?"
    line = failure_line(UnavailableError(REFUSED), "10.0.0.5:7700", DEFAULT_ENDPOINT)
    assert line == "error: UNAVAILABLE: " + connection_hint("10.0.0.5:7700", DEFAULT_ENDPOINT)
    assert "--endpoint" in line
    # A cluster that answers "not now" is no refused connection: its own words.
    busy = failure_line(NotTakenError("node is draining"), DEFAULT_ENDPOINT, DEFAULT_ENDPOINT)
    assert busy == "error: UNAVAILABLE: node is draining"


def test_a_file_batch_whose_answer_was_lost_says_it_may_be_in() -> None:
    from pqueue.cli.produce import _at_line
    from pqueue.client import job_spec
    from pqueue.errors import DeadlineExceededError, ResourceExhaustedError

    batch = [(4, job_spec(b"a")), (6, job_spec(b"b"))]
    lost = _at_line(DeadlineExceededError("deadline exceeded"), batch, 3, "f")
    assert failure_line(lost) == (
        "error: DEADLINE_EXCEEDED: deadline exceeded "
        "(enqueued: the 3 jobs before line 4; lines 4-6: unknown)"
    )
    refused = _at_line(ResourceExhaustedError("full"), batch, 3, "f")
    assert failure_line(refused) == (
        "error: RESOURCE_EXHAUSTED: full (enqueued: the 3 jobs before line 4; none from it on)"
    )


def test_config_fields_in_a_reason_or_a_difference_are_flags_and_a_queue_name_is_not() -> None:
    bad = InvalidArgumentError("config.backoff_base_ms", "must not exceed backoff_max_ms")
    assert failure_line(bad) == (
        "error: INVALID_ARGUMENT: --backoff-base-ms: must not exceed --backoff-max-ms"
    )
    named = AlreadyExistsError(
        "queue 'max_attempts' exists with a different config: max_attempts is 3, asked 4"
    )
    assert failure_line(named) == (
        "error: ALREADY_EXISTS: queue 'max_attempts' exists with a different config: "
        "--max-attempts is 3, asked 4"
    )
