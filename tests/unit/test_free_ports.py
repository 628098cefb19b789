"""``free_ports``: distinct ports free on loopback, below the OS's
ephemeral range (where ``bind(0)`` and outgoing connections draw theirs),
so no socket the OS numbers itself can take one before its node binds it."""

from __future__ import annotations

import socket
from pathlib import Path

from pqueue.cli.devcluster import LOWEST_PICKED, ephemeral_range, free_ports


def bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def test_ports_are_distinct_free_and_below_the_ephemeral_range() -> None:
    low, _ = ephemeral_range()
    ports = free_ports(8)
    assert len(set(ports)) == 8
    assert all(LOWEST_PICKED <= p < low for p in ports)
    assert all(bindable(p) for p in ports)


def test_a_port_in_use_is_never_picked() -> None:
    # A span of 8 ports just above LOWEST_PICKED (under 64: the whole span is
    # tried), all free now; all but one taken: that one is the only answer.
    base = next(b for b in range(LOWEST_PICKED, LOWEST_PICKED + 56, 8)
                if all(bindable(p) for p in range(b, b + 8)))  # fmt: skip
    held = []
    try:
        for port in range(LOWEST_PICKED, base + 7):
            s = socket.socket()
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                s.close()  # someone else's: taken all the same
                continue
            held.append(s)
        for _ in range(20):
            assert free_ports(1, (base + 8, 65_535)) == [base + 7]
    finally:
        for s in held:
            s.close()


def test_no_room_below_the_range_falls_back_to_the_os(tmp_path: Path) -> None:
    ports = free_ports(3, (LOWEST_PICKED + 2, 60_999))  # a span smaller than 4 a port
    assert len(set(ports)) == 3
    assert all(p >= ephemeral_range()[0] for p in ports)  # bind(0)'s picks


def test_the_range_read_from_proc_or_linux_default(tmp_path: Path) -> None:
    good = tmp_path / "range"
    good.write_text("20000\t40000\n")
    assert ephemeral_range(good) == (20_000, 40_000)
    bad = tmp_path / "bad"
    bad.write_text("nonsense")
    assert ephemeral_range(bad) == (32_768, 60_999)
    assert ephemeral_range(tmp_path / "absent") == (32_768, 60_999)
