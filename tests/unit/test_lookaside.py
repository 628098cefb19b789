"""The pure pieces of the SDK's look-aside (``pqueue.lookaside``)."""

from __future__ import annotations

from pqueue.lookaside import Backoff, leader_named
from pqueue.wire.keys import LEADER_KEY


def test_the_leader_is_read_from_the_balancers_metadata() -> None:
    assert leader_named((("x-other", "a"), (LEADER_KEY, "10.0.0.2:7701"))) == "10.0.0.2:7701"
    assert leader_named((("x-other", "a"),)) == ""
    assert leader_named(None) == ""
    assert leader_named(((LEADER_KEY, b"binary"),)) == ""  # not a text value: ignored


def test_an_address_that_failed_waits_doubling_up_to_the_most() -> None:
    backoff = Backoff(min_s=1.0, max_s=4.0)
    assert backoff.allowed("a", 0.0)
    assert backoff.failed("a", 0.0) == 1.0
    assert not backoff.allowed("a", 0.5)
    assert backoff.allowed("a", 1.0)
    assert backoff.allowed("b", 0.5)  # another address is not held back
    assert backoff.failed("a", 1.0) == 2.0
    assert backoff.failed("a", 3.0) == 4.0
    assert backoff.failed("a", 7.0) == 4.0  # no more than the most
    assert not backoff.allowed("a", 10.9)
    assert backoff.allowed("a", 11.0)


def test_an_address_that_worked_starts_again_from_the_least() -> None:
    backoff = Backoff(min_s=1.0, max_s=60.0)
    for now in (0.0, 1.0, 3.0):
        backoff.failed("a", now)
    backoff.succeeded("a")
    assert backoff.allowed("a", 3.0)
    assert backoff.failed("a", 3.0) == 1.0


def test_loopback_names_this_host_only() -> None:
    from pqueue.lookaside import loopback

    here = ["127.0.0.1:7701", "127.8.0.3:1", "[::1]:7701", "localhost:7701", "n1.localhost:1"]
    elsewhere = ["10.0.0.5:7701", "[2001:db8::1]:7701", "node1:7701", "pq-node-0.pq.svc:7701"]
    assert [a for a in here if not loopback(a)] == []
    assert [a for a in elsewhere if loopback(a)] == []
