"""The consensus core reports leadership changes in ``Ready`` and answers
queries through a frozen ``Replica.status()`` (the shell reads no fields)."""

from __future__ import annotations

import dataclasses
import itertools
import random

import pytest

from consensus import Config, Ready, Replica, ReplicaStatus, Role, SoftState

NODES = (1, 2, 3)


class Net:
    """Three replicas, a reliable network, every Ready handled at once."""

    def __init__(self) -> None:
        self.replicas = {
            n: Replica(Config(node_id=n, nodes=NODES), random.Random(n)) for n in NODES
        }
        #: Per node, every soft state and election its Readys reported.
        self.soft: dict[int, list[SoftState]] = {n: [] for n in NODES}
        self.elections: dict[int, list[tuple[int, int]]] = {n: [] for n in NODES}

    def _take(self, node: int) -> Ready:
        r = self.replicas[node]
        ready = r.ready()
        if ready.soft_state is not None:
            # What is reported is the replica's view at that moment.
            live = SoftState(r.role, r.leader_id, r.leader_ballot, r.ballot)
            assert ready.soft_state == live
            self.soft[node].append(ready.soft_state)
        self.elections[node].extend(ready.elections)
        return ready

    def run(self, ticks: int) -> None:
        for _ in range(ticks):
            for r in self.replicas.values():
                r.tick()
            busy = True
            while busy:
                busy = False
                for node in NODES:
                    ready = self._take(node)
                    for msg in ready.messages:
                        self.replicas[msg.dst].step(msg)
                        busy = True

    def leader(self) -> int:
        [leader] = [n for n, r in self.replicas.items() if r.role is Role.LEADER]
        return leader


def test_an_election_is_reported_as_it_happens_and_every_node_learns_the_leader() -> None:
    net = Net()
    net.run(60)
    leader = net.leader()
    ballot = net.replicas[leader].ballot
    assert ballot in net.elections[leader]  # phase 1 at that ballot was reported
    assert net.soft[leader][-1] == SoftState(Role.LEADER, leader, ballot, ballot)
    assert any(s.role is Role.CANDIDATE and s.ballot == ballot for s in net.soft[leader])
    for node in NODES:
        if node != leader:
            last = net.soft[node][-1]
            assert (last.role, last.leader_id, last.leader_ballot) == (
                Role.FOLLOWER,
                leader,
                ballot,
            )
    # Consecutive reports differ: a soft state is sent only when it changed.
    for reports in net.soft.values():
        assert all(a != b for a, b in itertools.pairwise(reports))


def test_a_quiet_cluster_reports_no_soft_state_and_no_election() -> None:
    net = Net()
    net.run(60)
    leader = net.leader()
    before = {n: (len(net.soft[n]), len(net.elections[n])) for n in NODES}
    net.run(20)  # heartbeats only
    assert {n: (len(net.soft[n]), len(net.elections[n])) for n in NODES} == before
    assert net.leader() == leader


def test_a_fresh_replica_reports_nothing_until_something_changes() -> None:
    r = Replica(Config(node_id=1, nodes=NODES), random.Random(1))
    assert r.ready().empty()


def test_status_is_a_frozen_copy() -> None:
    net = Net()
    net.run(60)
    leader = net.replicas[net.leader()]
    status = leader.status()
    assert isinstance(status, ReplicaStatus)
    assert (status.role, status.leader_id, status.ballot) == (
        Role.LEADER,
        leader.id,
        leader.ballot,
    )
    assert status.commit_index == leader.commit_index
    assert status.emitted == leader.emitted
    assert status.next_slot == leader.next_slot
    assert status.peer_commit == leader.peer_commit
    assert status.nodes == NODES
    with pytest.raises(dataclasses.FrozenInstanceError):
        status.role = Role.FOLLOWER  # type: ignore[misc]
    status.peer_commit[99] = 1  # a copy: the replica is untouched
    assert 99 not in leader.peer_commit
    leader.propose(b"x")
    net.run(1)
    assert leader.status().commit_index == status.commit_index + 1  # a new copy per call
