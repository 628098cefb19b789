"""Per-tenant quotas: the file, and the leader's token buckets."""

from __future__ import annotations

import pytest

from pqueue.errors import ResourceExhaustedError
from pqueue.node.quotas import Quota, Quotas

FILE = """
[defaults]
enqueue_per_s = 10
max_inflight_leases = 100

[tenants.acme]
enqueue_per_s = 2
enqueue_burst = 4
max_queue_depth = 50
max_payload_bytes = 1024
"""


def test_the_file_names_defaults_and_tenants() -> None:
    q = Quotas.parse(FILE)
    assert q.of("acme") == Quota(2, 4, 0, 50, 1024)
    assert q.of("anyone") == Quota(enqueue_per_s=10, max_inflight_leases=100)
    assert q.of("acme").stamp().max_queue_depth == 50


@pytest.mark.parametrize(
    "text",
    [
        "[defaults]\nenqueue_per_s = -1",
        "[defaults]\nrate = 5",
        "[tenants.'bad name']\nenqueue_per_s = 1",
        "[other]\nx = 1",
        "not toml [",
    ],
)
def test_a_bad_file_is_refused_with_a_reason(text: str) -> None:
    with pytest.raises(ValueError, match=r".+"):
        Quotas.parse(text)


def test_the_bucket_allows_the_burst_then_the_rate() -> None:
    q = Quotas.parse(FILE)
    q.take("acme", 4, now_s=100.0)  # the whole burst at once
    with pytest.raises(ResourceExhaustedError) as over:
        q.take("acme", 1, now_s=100.0)
    assert over.value.retry_after_s == pytest.approx(0.5)  # one job at 2/s
    assert over.value.retriable
    q.take("acme", 1, now_s=100.5)
    q.take("other", 10, now_s=100.0)  # tenants have buckets of their own
    with pytest.raises(ResourceExhaustedError) as too_big:
        q.take("acme", 5, now_s=200.0)  # more than the bucket holds: never fits
    assert not too_big.value.retriable


def test_no_rate_means_no_bucket() -> None:
    Quotas().take("acme", 10_000, now_s=0.0)


@pytest.mark.parametrize(
    "text",
    [
        "[defaults]\nenqueue_per_s = nan",
        "[defaults]\nenqueue_burst = 0.5",
        "[defaults]\nmax_queues = 1e30",
    ],
)
def test_numbers_that_would_misbehave_are_refused_at_load(text: str) -> None:
    with pytest.raises(ValueError, match=r".+"):
        Quotas.parse(text)


def test_log_bytes_per_command_and_per_second() -> None:
    q = Quotas.parse(
        "[tenants.acme]\nmax_command_bytes = 4096\nlog_bytes_per_s = 10000\nlog_bytes_burst = 8192"
    )
    assert q.of("acme").max_command_bytes == 4096
    with pytest.raises(ResourceExhaustedError) as big:
        q.take_bytes("acme", 5000, now_s=0.0)
    assert not big.value.retriable  # the same command fails the same way every time
    q.take_bytes("acme", 4000, now_s=0.0)
    q.take_bytes("acme", 4000, now_s=0.0)
    with pytest.raises(ResourceExhaustedError) as rate:
        q.take_bytes("acme", 4000, now_s=0.0)
    assert rate.value.retriable
    assert rate.value.retry_after_s == pytest.approx(0.3808)  # 3,808 bytes short at 10,000/s
    q.take_bytes("acme", 4000, now_s=0.4)  # refilled
    q.take_bytes("other", 10 << 20, now_s=0.0)  # no limits for tenants not named


def test_a_log_bytes_burst_too_small_for_any_command_is_refused() -> None:
    with pytest.raises(ValueError, match="log_bytes_burst"):
        Quotas.parse("[defaults]\nlog_bytes_burst = 10")
