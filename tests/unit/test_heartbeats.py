"""``Heartbeats``: one timer keeps every held lease alive (the Worker's)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

from pqueue.errors import LeaseLostError, UnavailableError
from pqueue.heartbeats import Heartbeats
from pqueue.v1 import queue_pb2 as pb

INTERVAL_S = 0.02


def job(job_id: int) -> pb.LeasedJob:
    return pb.LeasedJob(job_id=job_id, lease_id=job_id * 10)


async def until(check: Callable[[], object], timeout_s: float = 10.0) -> None:
    """Wait until ``check()`` holds (a generous bound: no timing asserted)."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("never happened")
        await asyncio.sleep(INTERVAL_S / 4)


class Recorder:
    """An ``Extend`` that records each call, and fails as told."""

    def __init__(self) -> None:
        self.calls: list[int] = []
        self.lost: set[int] = set()
        self.failing: set[int] = set()
        self.blocked: set[int] = set()
        self.cancelled: list[int] = []

    async def __call__(self, leased: pb.LeasedJob) -> None:
        self.calls.append(leased.job_id)
        if leased.job_id in self.lost:
            raise LeaseLostError("lease lost")
        if leased.job_id in self.failing:
            raise UnavailableError("node away", retry_after_s=0.0)
        if leased.job_id in self.blocked:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                self.cancelled.append(leased.job_id)
                raise


async def test_each_held_lease_is_extended_every_interval_until_released() -> None:
    extend = Recorder()
    beats = Heartbeats(INTERVAL_S, extend)
    one, two = beats.hold(job(1)), beats.hold(job(2))
    await until(lambda: extend.calls.count(1) >= 3 and extend.calls.count(2) >= 3)
    beats.release(one)
    ones = extend.calls.count(1)
    await until(lambda: extend.calls.count(2) >= ones + 3)
    assert extend.calls.count(1) == ones  # released: never again
    assert len(beats) == 1
    assert not two.lost
    beats.close()
    assert len(beats) == 0


async def test_a_job_released_before_its_first_interval_costs_no_extension() -> None:
    extend = Recorder()
    beats = Heartbeats(INTERVAL_S, extend)
    for n in range(100):
        beats.release(beats.hold(job(n)))
    await asyncio.sleep(INTERVAL_S * 3)
    assert extend.calls == []
    assert beats.extensions == 0
    beats.close()


async def test_a_lost_lease_is_marked_and_no_longer_extended() -> None:
    extend = Recorder()
    extend.lost.add(1)
    beats = Heartbeats(INTERVAL_S, extend)
    lost, kept = beats.hold(job(1)), beats.hold(job(2))
    await until(lambda: lost.lost)
    await until(lambda: extend.calls.count(2) >= 3)
    assert extend.calls.count(1) == 1
    assert not kept.lost
    assert len(beats) == 1
    beats.close()


async def test_other_failures_are_tried_again_at_the_next_interval() -> None:
    extend = Recorder()
    extend.failing.add(1)
    beats = Heartbeats(INTERVAL_S, extend)
    held = beats.hold(job(1))
    await until(lambda: extend.calls.count(1) >= 3)
    assert not held.lost
    beats.close()


async def test_release_cancels_an_extension_under_way_and_none_is_doubled() -> None:
    extend = Recorder()
    extend.blocked.add(1)
    beats = Heartbeats(INTERVAL_S, extend)
    held = beats.hold(job(1))
    await until(lambda: held.extending is not None)
    await asyncio.sleep(INTERVAL_S * 4)  # due again meanwhile: not started twice
    assert extend.calls == [1]
    beats.release(held)
    await until(lambda: extend.cancelled == [1])
    assert held.extending is None
    beats.close()


def test_the_interval_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        Heartbeats(0, Recorder())


async def test_an_extension_cancelled_before_it_ran_does_not_stop_the_next() -> None:
    extend = Recorder()
    beats = Heartbeats(INTERVAL_S, extend)
    held = beats.hold(job(1))
    await until(lambda: held.extending is not None)
    first = held.extending
    assert first is not None
    first.cancel()  # by something other than a release (its body may never run)
    await until(lambda: extend.calls.count(1) >= 2)
    assert not held.lost
    beats.close()


async def test_a_failure_that_is_not_the_nodes_is_logged_and_tried_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls: list[int] = []

    async def broken(leased: pb.LeasedJob) -> None:
        calls.append(leased.job_id)
        raise RuntimeError("the client was closed")

    beats = Heartbeats(INTERVAL_S, broken)
    held = beats.hold(job(7))
    await until(lambda: len(calls) >= 2)
    assert not held.lost
    assert "extending job 7 failed" in caplog.text
    assert any(r.name == "pqueue.worker" for r in caplog.records)
    beats.close()
