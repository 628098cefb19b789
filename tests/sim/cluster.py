"""A deterministic simulation of N Multi-Paxos replicas, driven by one seed.

Everything random comes from ``random.Random(seed)``, so a failing run
replays exactly from its seed. Per step: nodes tick (each at its own rate:
clock drift), due messages are delivered, a client may propose, nodes take
their ``Ready`` batches, and each node may or may not fsync what it has taken
(unsynced writes die with a crash). Faults: message drops, duplicates and
delays (reordering), partitions (symmetric, one-way, flapping), crashes and
restarts. After ``fault_steps`` the network heals and everyone restarts; the
run must then finish every client operation.
"""

from __future__ import annotations

import heapq
import json
import random
from dataclasses import dataclass, field

from consensus.blob import Blob, MemoryBlob, read_all
from consensus.messages import NOOP, Accept, Message, Ready, Record
from consensus.replica import Config, DurableState, Replica, Role
from tests.sim.checker import Checker, SafetyViolation, chain


@dataclass(frozen=True)
class Faults:
    drop: float = 0.05
    duplicate: float = 0.03
    max_delay: int = 4
    crash: float = 0.004
    restart: float = 0.05
    partition: float = 0.01
    heal: float = 0.05
    fsync: float = 0.7

    @staticmethod
    def none() -> Faults:
        return Faults(0, 0, 1, 0, 1, 0, 1, 1)


@dataclass
class Disk:
    """What survives a crash."""

    promised: tuple[int, int] = (0, 0)
    records: dict[int, Record] = field(default_factory=dict)
    commit_index: int = 0
    snapshot: tuple[int, Blob] | None = None


class App:
    """A toy state machine: the values applied, in slot order, and a hash chain."""

    def __init__(self) -> None:
        self.index = 0
        self.values: list[bytes] = []
        self.hash = b""

    def apply(self, slot: int, value: bytes) -> None:
        if slot != self.index + 1:
            raise SafetyViolation(f"applied slot {slot} after {self.index}")
        self.index = slot
        self.values.append(value)
        self.hash = chain(self.hash, value)

    def snapshot(self) -> bytes:
        return json.dumps([v.hex() for v in self.values]).encode()

    def restore(self, index: int, data: bytes) -> None:
        self.values = [bytes.fromhex(v) for v in json.loads(data)]
        self.index = index
        self.hash = b""
        for value in self.values:
            self.hash = chain(self.hash, value)


class SimNode:
    def __init__(self, node_id: int, nodes: tuple[int, ...], sim: Simulation) -> None:
        self.id = node_id
        self.sim = sim
        self.config = Config(
            node_id=node_id, nodes=nodes, election_ticks=10, heartbeat_ticks=2, **sim.budgets
        )
        self.disk = Disk()
        self.tick_rate = sim.rng.uniform(0.6, 1.0)  # clock drift
        self.up = True
        self.unsynced: list[Ready] = []
        self.replica = sim.replica_cls(self.config, random.Random(sim.rng.random()))
        self.app = App()
        self.pending: dict[int, bytes] = {}  # slot -> value we proposed there
        self.read_states: list[tuple[int, int]] = []  # confirmed read indexes

    def crash(self) -> None:
        self.up = False
        self.unsynced = []  # never fsynced: gone
        self.pending = {}

    def restart(self) -> None:
        durable = DurableState(
            promised=self.disk.promised,
            records=dict(self.disk.records),
            commit_index=self.disk.commit_index,
            snapshot=self.disk.snapshot,
        )
        self.replica = self.sim.replica_cls(
            self.config, random.Random(self.sim.rng.random()), durable
        )
        self.app = App()
        if self.disk.snapshot is not None:
            index, blob = self.disk.snapshot
            self.app.restore(index, read_all(blob))
        self.up = True
        self.sim.checker.on_restart(self.id, self.replica.promised)

    def take_ready(self) -> None:
        was_leader = self.replica.role is Role.LEADER
        ready = self.replica.ready()
        if ready.promised is None:
            # The shell's one exception to persist-then-send: a leader's
            # Accepts to other nodes leave at once, before this Ready is
            # durable (a crash may lose its records after they left).
            early = [m for m in ready.messages if isinstance(m, Accept) and m.dst != self.id]
            for msg in early:
                self.sim.send(msg)
            ready.messages = [m for m in ready.messages if not any(m is e for e in early)]
        self.read_states += ready.read_states
        for ctx, index in ready.read_states:
            self.sim.checker.on_read(self.id, ctx, index)
        if not ready.empty():
            self.unsynced.append(ready)
        if not was_leader and self.replica.role is Role.LEADER:
            self.sim.checker.on_leader(self.id, self.replica.recovered)

    def fsync(self) -> None:
        """Persist what was taken, then send, then apply: the shell's order
        (a leader's Accepts to others already left, in ``take_ready``)."""
        readies, self.unsynced = self.unsynced, []
        for ready in readies:
            if ready.promised is not None:
                self.disk.promised = ready.promised
                self.sim.checker.on_persist_promise(self.id, ready.promised)
            for record in ready.records:
                self.disk.records[record.slot] = record
            if ready.commit_index is not None:
                self.disk.commit_index = max(self.disk.commit_index, ready.commit_index)
            if ready.snapshot is not None:
                index, blob = ready.snapshot
                self.disk.snapshot = ready.snapshot
                self.disk.records = {s: r for s, r in self.disk.records.items() if s > index}
                self.app.restore(index, read_all(blob))
                self.pending = {}
            for msg in ready.messages:
                self.sim.send(msg)
            for slot, value in ready.committed:
                self.app.apply(slot, value)
                self.sim.checker.on_apply(self.id, slot, value, self.app.hash)
                if self.pending.pop(slot, None) == value:
                    self.sim.ack(value, slot)
        if self.app.index - (self.disk.snapshot or (0,))[0] >= self.sim.snapshot_every:
            blob = MemoryBlob(self.app.snapshot())
            self.replica.compact(self.app.index, blob)
            self.disk.snapshot = (self.app.index, blob)
            self.disk.records = {s: r for s, r in self.disk.records.items() if s > self.app.index}


class Simulation:
    def __init__(
        self,
        seed: int,
        nodes: int = 3,
        faults: Faults | None = None,
        replica_cls: type[Replica] = Replica,
        snapshot_every: int = 25,
        ack_on_propose: bool = False,
        transfer_rate: float = 0.01,
        budgets: dict[str, int] | None = None,
    ) -> None:
        self.seed = seed
        #: Byte budgets for every node's Config (tiny ones force multi-part
        #: promises, chunked snapshots and bounded re-offers).
        self.budgets = budgets or {}
        self.rng = random.Random(seed)
        self.faults = faults or Faults()
        self.replica_cls = replica_cls
        self.snapshot_every = snapshot_every
        self.ack_on_propose = ack_on_propose  # a planted bug: reply before commit
        #: Per client step: the chance a leader is asked to hand leadership over.
        self.transfer_rate = transfer_rate
        self.checker = Checker()
        ids = tuple(range(1, nodes + 1))
        self.nodes = {i: SimNode(i, ids, self) for i in ids}
        self.now = 0
        self._seq = 0
        self.in_flight: list[tuple[int, int, Message]] = []
        self.blocked: set[tuple[int, int]] = set()
        self.flapping: tuple[int, int] | None = None
        self.ops: dict[bytes, int | None] = {}  # value -> acked slot
        self._next_op = 0
        # Reads draw from their own stream, so they perturb the runs little.
        self.read_rng = random.Random(seed ^ 0x5EAD)
        self._next_read = 0

    # ----------------------------------------------------------- plumbing

    def send(self, msg: Message) -> None:
        self.checker.on_send(msg)
        if msg.src == msg.dst:
            # Local delivery is never lost, but nothing orders it before the
            # network: a busy node may see a peer's vote before its own.
            self._enqueue(msg, self.rng.randint(1, self.faults.max_delay))
            return
        f = self.faults
        if (msg.src, msg.dst) in self.blocked or self.rng.random() < f.drop:
            return
        copies = 2 if self.rng.random() < f.duplicate else 1
        for _ in range(copies):
            self._enqueue(msg, self.rng.randint(1, f.max_delay))

    def _enqueue(self, msg: Message, delay: int) -> None:
        self._seq += 1
        heapq.heappush(self.in_flight, (self.now + delay, self._seq, msg))

    def ack(self, value: bytes, slot: int) -> None:
        if self.ops.get(value) is None:
            self.ops[value] = slot
            self.checker.on_ack(value, slot)

    def leaders(self) -> list[SimNode]:
        return [n for n in self.nodes.values() if n.up and n.replica.role is Role.LEADER]

    # -------------------------------------------------------------- steps

    def step(self, faulty: bool) -> None:
        self.now += 1
        rng = self.rng
        for node in self.nodes.values():
            if node.up and rng.random() < node.tick_rate:
                node.replica.tick()
        while self.in_flight and self.in_flight[0][0] <= self.now:
            _, _, msg = heapq.heappop(self.in_flight)
            target = self.nodes[msg.dst]
            if target.up and (msg.src, msg.dst) not in self.blocked:
                target.replica.step(msg)
        if rng.random() < 0.3:
            self._client(new_ops=faulty)
        for node in self.nodes.values():
            if node.up:
                node.take_ready()
                if rng.random() < (self.faults.fsync if faulty else 1.0):
                    node.fsync()
        if faulty:
            self._faults()
        if self.now % 50 == 0:
            self.checker.check_prefixes({i: n.app.values for i, n in self.nodes.items()})

    def _client(self, new_ops: bool) -> None:
        """Propose a new operation, or retry one not yet acknowledged; maybe read."""
        leaders = self.leaders()
        if not leaders:
            return
        if self.read_rng.random() < 0.2:
            # A linearizable read at any node that believes it leads (a stale
            # leader included): its read index must cover every ack so far.
            self._next_read += 1
            reader = self.read_rng.choice(leaders)
            if reader.replica.read_index(self._next_read):
                self.checker.on_read_start(self._next_read)
        if self.read_rng.random() < self.transfer_rate:
            # An operator stops the leader gracefully: it hands leadership over.
            self.read_rng.choice(leaders).replica.transfer_leadership()
        leader = self.rng.choice(leaders)
        waiting = [v for v, slot in self.ops.items() if slot is None]
        if waiting and (not new_ops or self.rng.random() < 0.3):
            value = self.rng.choice(waiting)  # a client retry (the app dedups)
        elif not new_ops:
            return
        else:
            self._next_op += 1
            value = f"op-{self._next_op}".encode()
            self.ops[value] = None
        self.checker.on_propose(value)
        slot = leader.replica.propose(value)
        if slot is not None:
            leader.pending[slot] = value
            if self.ack_on_propose:
                self.ack(value, slot)

    def _faults(self) -> None:
        rng, f = self.rng, self.faults
        ids = list(self.nodes)
        for node in self.nodes.values():
            if node.up and rng.random() < f.crash:
                node.crash()
            elif not node.up and rng.random() < f.restart:
                node.restart()
        if rng.random() < f.partition:
            kind = rng.choice(["symmetric", "one-way", "flapping"])
            a = rng.choice(ids)
            others = [i for i in ids if i != a]
            if kind == "symmetric":
                self.blocked |= {(a, b) for b in others} | {(b, a) for b in others}
            elif kind == "one-way":
                self.blocked.add((a, rng.choice(others)))
            else:
                self.flapping = (a, rng.choice(others))
        if self.flapping and rng.random() < 0.3:
            pair = self.flapping
            self.blocked ^= {pair, (pair[1], pair[0])}
        if rng.random() < f.heal:
            self.blocked.clear()
            self.flapping = None

    def run(self, fault_steps: int = 1500, settle_steps: int = 1500) -> None:
        """Faults for a while, then heal everything: all operations must finish."""
        try:
            for _ in range(fault_steps):
                self.step(faulty=True)
            self.blocked.clear()
            self.flapping = None
            for node in self.nodes.values():
                if not node.up:
                    node.restart()
            for _ in range(settle_steps):
                self.step(faulty=False)
                if self._settled():
                    return
            raise SafetyViolation(f"no progress after faults stopped: {self._progress()}")
        except SafetyViolation as exc:
            raise SafetyViolation(f"seed {self.seed}: {exc}") from exc

    def _settled(self) -> bool:
        if any(slot is None for slot in self.ops.values()):
            return False
        indexes = {n.app.index for n in self.nodes.values()}
        return len(indexes) == 1 and self.leaders() != []

    def _progress(self) -> str:
        pending = sum(1 for s in self.ops.values() if s is None)
        applied = {i: n.app.index for i, n in self.nodes.items()}
        roles = {i: n.replica.role.value for i, n in self.nodes.items()}
        return f"{pending} ops pending, applied {applied}, roles {roles}"


__all__ = ["NOOP", "Faults", "Simulation"]
