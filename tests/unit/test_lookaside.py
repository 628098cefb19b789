"""The pure pieces of the SDK's look-aside (``pqueue.lookaside``)."""

from __future__ import annotations

import asyncio
import logging

import grpc
import pytest

from pqueue.lookaside import Backoff, LeaderLink, direct_marks, leader_named
from pqueue.wire.keys import CLUSTER_KEY, DIRECT_KEY, LEADER_KEY


def test_the_leader_is_read_from_the_balancers_metadata() -> None:
    named = (("x-other", "a"), (LEADER_KEY, "10.0.0.2:7701"), (CLUSTER_KEY, "prod-1"))
    assert leader_named(named) == ("10.0.0.2:7701", "prod-1")
    assert leader_named((("x-other", "a"), (LEADER_KEY, "10.0.0.2:7701"))) == ("10.0.0.2:7701", "")
    assert leader_named((("x-other", "a"),)) == ("", "")
    assert leader_named(None) == ("", "")
    assert leader_named(((LEADER_KEY, b"binary"),)) == ("", "")  # not a text value: ignored


def test_a_direct_call_names_the_cluster_the_balancer_named() -> None:
    assert direct_marks("prod-1") == ((DIRECT_KEY, "1"), (CLUSTER_KEY, "prod-1"))
    assert direct_marks("") == ((DIRECT_KEY, "1"),)  # an older balancer named none: unchecked


class _ReadyChannel:
    async def channel_ready(self) -> None:
        return None

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        return grpc.ChannelConnectivity.READY


async def test_an_address_another_cluster_answered_at_is_never_used_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    link = LeaderLink("10.0.0.1:7700", lambda address: _ReadyChannel())  # type: ignore[arg-type,return-value]
    link.offer("10.0.0.2:7701", "prod-1")
    for _ in range(50):
        if link.ready:
            break
        await asyncio.sleep(0.01)
    assert link.current() == "10.0.0.2:7701"
    assert link.cluster == "prod-1"
    with caplog.at_level(logging.WARNING, logger="pqueue.lookaside"):
        link.refuse("10.0.0.2:7701", "this node belongs to cluster 'other'")
        link.refuse("10.0.0.2:7701", "again")  # told once
    assert link.current() == ""
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "not a node of its cluster" in warnings[0].getMessage()
    link.offer("10.0.0.2:7701", "prod-1")  # the balancer names it again: not tried
    await asyncio.sleep(0.05)
    assert link.current() == ""
    link.offer("10.0.0.3:7701", "prod-1")  # another address is
    for _ in range(50):
        if link.ready:
            break
        await asyncio.sleep(0.01)
    assert link.current() == "10.0.0.3:7701"
    await link.close()


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


async def test_a_balancer_that_names_no_cluster_does_not_unset_it() -> None:
    link = LeaderLink("10.0.0.1:7700", lambda address: _ReadyChannel())  # type: ignore[arg-type,return-value]
    link.offer("10.0.0.2:7701", "prod-1")
    link.offer("10.0.0.2:7701", "")  # an older balancer behind the same endpoint
    assert link.cluster == "prod-1"
    link.offer("10.0.0.9:7701", "prod-2")  # named anew: the newest wins
    assert link.cluster == "prod-2"
    await link.close()


class _SlowChannel(_ReadyChannel):
    def __init__(self) -> None:
        self.go = asyncio.Event()

    async def channel_ready(self) -> None:
        await self.go.wait()


async def test_an_address_refused_while_its_connect_is_under_way_never_becomes_ready() -> None:
    channel = _SlowChannel()
    link = LeaderLink("10.0.0.1:7700", lambda address: channel)  # type: ignore[arg-type,return-value]
    link.offer("10.0.0.2:7701", "prod-1")
    await asyncio.sleep(0.01)  # connecting
    link.refuse("10.0.0.2:7701", "a call already in flight was refused")
    channel.go.set()
    await asyncio.sleep(0.05)
    assert link.ready == ""
    assert link.current() == ""
    link.refuse("10.0.0.2:7701", "again")  # a second refusal changes nothing
    assert link.ready == ""
    await link.close()


async def test_a_leader_hint_names_the_cluster_the_balancer_named() -> None:
    from pqueue.client import Client

    async with Client("127.0.0.1:1", max_retries=0) as client:
        plain = client._hint_stubs("10.0.0.2:7701")
        assert plain.marks == ()  # no balancer named a cluster: as before
        client._link.offer("", "prod-1")
        hinted = client._hint_stubs("10.0.0.2:7701")
        assert hinted.marks == ((CLUSTER_KEY, "prod-1"),)
        assert client.direct_marks() == ((DIRECT_KEY, "1"), (CLUSTER_KEY, "prod-1"))
        assert client._hint_stubs("10.0.0.2:7701") is hinted  # kept
