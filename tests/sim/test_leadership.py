"""Pre-vote, leadership transfer and read index on the simulated cluster.

Deterministic runs (a seed, no random faults beyond what each test sets up):
each test states what an operator would see.
"""

from __future__ import annotations

import random

from consensus.messages import CatchupReply, Heartbeat, HeartbeatReply, PreVote
from consensus.replica import Config, Replica, Role
from tests.sim.cluster import Faults, SimNode, Simulation

#: Client traffic and a reliable network; partitions only where a test makes them.
QUIET = Faults(drop=0, duplicate=0, max_delay=2, crash=0, restart=1, partition=0, heal=0, fsync=1)


def _leader(sim: Simulation, steps: int = 400) -> SimNode:
    for _ in range(steps):
        sim.step(faulty=True)
        leaders = sim.leaders()
        if len(leaders) == 1 and all(
            n.replica.leader_id == leaders[0].id for n in sim.nodes.values()
        ):
            return leaders[0]
    raise AssertionError("no stable leader")


def _isolate(sim: Simulation, node: int) -> None:
    others = [i for i in sim.nodes if i != node]
    sim.blocked |= {(node, o) for o in others} | {(o, node) for o in others}


def test_a_node_cut_off_for_long_does_not_depose_the_leader_when_it_returns() -> None:
    for seed in range(5):
        sim = Simulation(seed, faults=QUIET, transfer_rate=0)
        leader = _leader(sim)
        ballot = leader.replica.ballot
        follower = next(n for n in sim.nodes.values() if n is not leader)
        _isolate(sim, follower.id)
        for _ in range(1500):  # dozens of election timeouts
            sim.step(faulty=True)
        # Cut off, it never raised its promise (pre-vote found no majority).
        promised = follower.replica.promised
        healed_at = leader.replica.commit_index
        sim.blocked.clear()
        for _ in range(300):
            sim.step(faulty=True)
        assert sim.leaders() == [leader], f"seed {seed}"
        assert leader.replica.ballot == ballot, f"seed {seed}: leader re-elected"
        assert follower.replica.leader_id == leader.id
        assert follower.replica.commit_index >= healed_at  # caught up
        assert promised <= ballot


def test_a_restarted_node_does_not_depose_the_leader() -> None:
    sim = Simulation(11, faults=QUIET, transfer_rate=0)
    leader = _leader(sim)
    ballot = leader.replica.ballot
    follower = next(n for n in sim.nodes.values() if n is not leader)
    follower.crash()
    for _ in range(400):
        sim.step(faulty=True)
    follower.restart()
    for _ in range(400):
        sim.step(faulty=True)
    assert sim.leaders() == [leader]
    assert leader.replica.ballot == ballot


def test_a_node_behind_the_majority_cannot_win_a_pre_vote() -> None:
    sim = Simulation(3, faults=QUIET, transfer_rate=0)
    leader = _leader(sim)
    behind = next(n for n in sim.nodes.values() if n is not leader)
    _isolate(sim, behind.id)
    for _ in range(300):
        sim.step(faulty=True)
    assert behind.replica.commit_index < leader.replica.commit_index
    # The leader dies; the node that fell behind is back but must not lead.
    leader.crash()
    sim.blocked.clear()
    for _ in range(600):
        sim.step(faulty=False)
        if sim.leaders():
            break
    (new,) = sim.leaders()
    assert new is not behind


def test_leadership_transfer_hands_over_without_losing_an_acknowledged_write() -> None:
    for seed in range(5):
        sim = Simulation(seed, faults=QUIET, transfer_rate=0)
        old = _leader(sim)
        target = old.replica.transfer_leadership()
        assert target
        assert target != old.id
        assert old.replica.propose(b"late") is None  # no new proposals while handing over
        for _ in range(200):
            sim.step(faulty=True)
            if sim.nodes[target].replica.role is Role.LEADER:
                break
        assert sim.nodes[target].replica.role is Role.LEADER, f"seed {seed}"
        assert old.replica.role is Role.FOLLOWER
        # Every operation acknowledged so far is still there, and the cluster
        # keeps taking writes under the new leader.
        sim.run(fault_steps=300)


def test_a_transfer_to_an_unreachable_target_is_abandoned() -> None:
    sim = Simulation(5, faults=QUIET, transfer_rate=0)
    leader = _leader(sim)
    target = next(i for i in sim.nodes if i != leader.id)
    _isolate(sim, target)
    leader.replica.transfer_leadership(target)
    for _ in range(60):  # a few election timeouts
        sim.step(faulty=True)
    assert leader.replica.role is Role.LEADER
    assert leader.replica.transfer_target == 0
    assert leader.replica.propose(b"after") is not None


def test_read_index_needs_a_majority_round_after_the_read() -> None:
    sim = Simulation(8, faults=QUIET, transfer_rate=0)
    leader = _leader(sim)
    for _ in range(50):
        sim.step(faulty=True)
    leader.replica.ready()  # drain
    commit = leader.replica.commit_index
    assert leader.replica.read_index(7)
    ready = leader.replica.ready()
    assert ready.read_states == []  # not before a quorum answered
    rounds = [m for m in ready.messages if isinstance(m, Heartbeat) and m.ctx]
    assert {m.dst for m in rounds} == {i for i in sim.nodes if i != leader.id}
    # One follower echoes the round: with the leader that is a majority of 3.
    hb = rounds[0]
    leader.replica.step(
        HeartbeatReply(hb.dst, leader.id, hb.ballot, True, hb.ballot, commit, hb.ctx)
    )
    assert leader.replica.ready().read_states == [(7, commit)]


def test_a_cut_off_leader_never_confirms_a_read() -> None:
    sim = Simulation(9, faults=QUIET, transfer_rate=0)
    leader = _leader(sim)
    mine = 10**9  # apart from the simulated clients' own read ids
    _isolate(sim, leader.id)
    confirmed_before = len(leader.read_states)
    assert leader.replica.read_index(mine + 1)
    for _ in range(400):
        sim.step(faulty=True)
    assert leader.read_states[confirmed_before:] == []
    assert leader.replica.role is Role.FOLLOWER  # check quorum made it step down
    assert not leader.replica.read_index(mine + 2)
    new = [n for n in sim.leaders() if n is not leader]
    assert new
    assert new[0].replica.ballot > leader.replica.ballot
    # The new leader's reads are confirmed, at an index covering all it committed.
    assert new[0].replica.read_index(mine + 5)
    for _ in range(20):
        sim.step(faulty=True)
    mine_confirmed = [index for ctx, index in new[0].read_states if ctx == mine + 5]
    assert len(mine_confirmed) == 1
    assert mine_confirmed[0] >= leader.replica.commit_index


def _pre_votes(replica: Replica) -> list[PreVote]:
    return [m for m in replica.ready().messages if isinstance(m, PreVote)]


def _far_behind_follower() -> Replica:
    """Node 3, told by leader 1 that 1,000 slots are chosen; it holds none."""
    replica = Replica(Config(node_id=3, nodes=(1, 2, 3)), random.Random(1))
    replica.step(Heartbeat(1, 3, (1, 1), 1000))
    replica.ready()
    return replica


def test_a_node_still_catching_up_does_not_campaign() -> None:
    replica = _far_behind_follower()
    sent: list[PreVote] = []
    for slot in range(1, 200):  # the leader is gone, catch-up data still flows
        replica.step(CatchupReply(2, 3, ((slot, b"x"),), 1000))
        replica.tick()
        sent += _pre_votes(replica)
    assert replica.commit_index == 199
    assert sent == []
    # Once the data stops, it may ask (voters judge it by its commit index).
    for _ in range(3 * replica.config.election_ticks):
        replica.tick()
        sent += _pre_votes(replica)
    assert sent
    assert {m.commit_index for m in sent} == {199}
    assert replica.promised == (1, 1)  # asking raised nothing
