"""``Backends.leader_moved``: when a call waiting on the leader is given up
(the pool fed by hand: no sockets, no probes)."""

from __future__ import annotations

import asyncio

import pytest

from balancer.backends import Backends
from balancer.config import BalancerConfig
from balancer.metrics import BalancerMetrics
from balancer.pool import Report

A, B = "127.0.0.1:1", "127.0.0.1:2"


def report(node_id: int, leader: bool, ballot_round: int) -> Report:
    return Report(node_id, True, leader, ballot_round, node_id if leader else 0, 0, 0, 0, 0, 0, 0)


def backends() -> Backends:
    b = Backends(BalancerConfig(backends=(A, B), seed=1), BalancerMetrics())
    b.pool.on_report(A, report(1, True, 1), b.clock_s())
    b.pool.on_report(B, report(2, False, 1), b.clock_s())
    b._changed()
    return b


async def test_it_returns_once_another_node_leads_with_a_higher_ballot() -> None:
    b = backends()
    moved = asyncio.create_task(b.leader_moved(A, stall_s=0.01))
    await asyncio.sleep(0.05)
    assert not moved.done()  # A still leads: the call goes on waiting
    assert b._suspect_until_s > b.clock_s()  # ...and every node is probed fast
    b.pool.on_report(B, report(2, True, 2), b.clock_s())
    b._changed()
    assert await asyncio.wait_for(moved, 1) == B


async def test_it_never_gives_up_on_a_leader_that_said_it_drains() -> None:
    b = backends()
    b.pool.on_health(A, False, b.clock_s())  # NOT_SERVING: it stops, it is not frozen
    b.pool.on_report(B, report(2, True, 2), b.clock_s())
    b._changed()
    moved = asyncio.create_task(b.leader_moved(A, stall_s=0.01))
    await asyncio.sleep(0.05)
    assert not moved.done()
    moved.cancel()
    with pytest.raises(asyncio.CancelledError):
        await moved


async def test_it_waits_its_stall_first() -> None:
    b = backends()
    b.pool.on_report(B, report(2, True, 2), b.clock_s())  # B already leads
    b._changed()
    moved = asyncio.create_task(b.leader_moved(A, stall_s=1.0))
    await asyncio.sleep(0.05)
    assert not moved.done()  # a call younger than its stall is left alone
    assert await asyncio.wait_for(moved, 5) == B


async def test_it_never_gives_up_on_an_old_leader_that_still_answers_probes() -> None:
    # A node that lost the lead forwards the calls it holds to the new leader:
    # abandoning them would answer "may or may not have been applied" for
    # writes about to succeed.
    b = backends()
    moved = asyncio.create_task(b.leader_moved(A, stall_s=0.01))
    await asyncio.sleep(0.02)
    b.pool.on_report(A, report(1, False, 1), b.clock_s())  # A answers: it follows now
    b.pool.on_report(B, report(2, True, 2), b.clock_s())
    b._changed()
    await asyncio.sleep(0.05)
    assert not moved.done()
    moved.cancel()
    with pytest.raises(asyncio.CancelledError):
        await moved
