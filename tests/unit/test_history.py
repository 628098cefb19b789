"""The fault tests' history checker flags each kind of violation."""

from __future__ import annotations

from tests.faults.history import History


def test_a_clean_history() -> None:
    h = History()
    h.enqueue_attempt(b"a")
    h.enqueue_ok(b"a")
    h.ack_ok(h.leased(1, 1, b"a", expires_ms=2000, lease_ms=1000), now_ms=1500)
    assert h.check() == {
        "enqueued": 1,
        "lost": 0,
        "unexpected": 0,
        "duplicates": 0,
        "double_holds": 0,
        "double_completions": 0,
    }


def test_lost_unexpected_duplicates() -> None:
    h = History()
    for p in (b"a", b"b"):
        h.enqueue_attempt(p)
        h.enqueue_ok(p)
    h.leased(1, 1, b"a", 2000, 1000)
    h.leased(1, 2, b"a", 4000, 1000)  # after the first expired: a legal duplicate
    h.leased(9, 3, b"ghost", 2000, 1000)
    counts = h.check()
    assert (counts["lost"], counts["unexpected"], counts["duplicates"]) == (1, 1, 1)
    assert counts["double_holds"] == 0


def test_overlapping_leases_and_double_completion() -> None:
    h = History()
    h.enqueue_attempt(b"a")
    h.enqueue_ok(b"a")
    first = h.leased(1, 1, b"a", expires_ms=3000, lease_ms=2000)
    second = h.leased(1, 2, b"a", expires_ms=3500, lease_ms=2000)  # starts at 1500 < 3000
    h.ack_ok(first, now_ms=2000)
    h.ack_ok(second, now_ms=2100)
    counts = h.check()
    assert (counts["double_holds"], counts["double_completions"]) == (1, 1)
