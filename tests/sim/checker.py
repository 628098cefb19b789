"""Safety properties checked after every simulation step.

- at most one value is chosen per slot, and only a proposed one (or a no-op);
- a node's promised ballot never decreases, across crashes too;
- the applied sequences of any two replicas are prefix-related, and their
  state hashes agree at equal indexes;
- every client-acknowledged value survives: no node applies another value at
  its slot, and a new leader never re-proposes another value there;
- a confirmed read index covers every value acknowledged before the read
  began (linearizable reads).
"""

from __future__ import annotations

import hashlib
import itertools

from consensus.messages import NOOP, ZERO, Accepted, Ballot, HeartbeatReply, Message, Promise


class SafetyViolation(AssertionError):
    """A property that must always hold did not."""


def chain(previous: bytes, value: bytes) -> bytes:
    """The state hash after applying ``value`` on top of ``previous``."""
    return hashlib.sha256(previous + value).digest()


class Checker:
    def __init__(self) -> None:
        self.chosen: dict[int, bytes] = {}
        self.proposed: set[bytes] = {NOOP}
        self.acked: dict[bytes, int] = {}
        self.hashes: dict[int, bytes] = {}
        #: Per node: the highest ballot it ever promised in a reply it sent.
        self.promised_out: dict[int, Ballot] = {}
        self.durable_promised: dict[int, Ballot] = {}
        #: Per read (ctx): the highest slot acknowledged when it started.
        self.read_floor: dict[int, int] = {}

    def fail(self, what: str) -> None:
        raise SafetyViolation(what)

    def on_propose(self, value: bytes) -> None:
        self.proposed.add(value)

    def on_ack(self, value: bytes, slot: int) -> None:
        if self.chosen.get(slot, value) != value:
            self.fail(f"acked {value!r} at slot {slot}, where {self.chosen[slot]!r} was chosen")
        self.acked[value] = slot

    def on_apply(self, node: int, slot: int, value: bytes, state_hash: bytes) -> None:
        if value not in self.proposed:
            self.fail(f"node {node} applied {value!r} at slot {slot}, never proposed")
        first = self.chosen.setdefault(slot, value)
        if first != value:
            self.fail(f"slot {slot}: node {node} applied {value!r}, another applied {first!r}")
        known = self.hashes.setdefault(slot, state_hash)
        if known != state_hash:
            self.fail(f"node {node}: state hash differs from another replica at index {slot}")
        for acked_value, acked_slot in self.acked.items():
            if acked_slot == slot and acked_value != value:
                self.fail(
                    f"acked {acked_value!r} at slot {slot} lost: node {node} applied {value!r}"
                )

    def on_send(self, msg: Message) -> None:
        if isinstance(msg, Promise | Accepted | HeartbeatReply) and msg.ok:
            best = self.promised_out.get(msg.src, ZERO)
            self.promised_out[msg.src] = max(best, msg.ballot)

    def on_persist_promise(self, node: int, ballot: Ballot) -> None:
        if ballot < self.durable_promised.get(node, ZERO):
            self.fail(f"node {node}: durable promise went down to {ballot}")
        self.durable_promised[node] = ballot

    def on_restart(self, node: int, promised: Ballot) -> None:
        if promised < self.promised_out.get(node, ZERO):
            self.fail(
                f"node {node} restarted promising {promised}, "
                f"below the {self.promised_out[node]} it promised before the crash"
            )

    def on_leader(self, node: int, recovered: dict[int, bytes]) -> None:
        for value, slot in self.acked.items():
            if slot in recovered and recovered[slot] != value:
                self.fail(
                    f"new leader {node} re-proposes {recovered[slot]!r} at slot {slot}, "
                    f"where {value!r} was acknowledged"
                )

    def on_read_start(self, ctx: int) -> None:
        self.read_floor[ctx] = max(self.acked.values(), default=0)

    def on_read(self, node: int, ctx: int, index: int) -> None:
        """A confirmed read index must cover every write acknowledged before
        the read began (else the read is stale: not linearizable)."""
        floor = self.read_floor.pop(ctx, 0)
        if index < floor:
            self.fail(
                f"stale read at node {node}: read index {index}, "
                f"but slot {floor} was acknowledged before the read began"
            )

    def check_prefixes(self, applied: dict[int, list[bytes]]) -> None:
        logs = sorted(applied.items(), key=lambda kv: len(kv[1]))
        for (a, short), (b, long_) in itertools.pairwise(logs):
            if long_[: len(short)] != short:
                self.fail(f"applied logs of nodes {a} and {b} are not prefix-related")
