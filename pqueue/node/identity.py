"""Identity on disk: which node of which cluster a data dir belongs to.

A data dir (or a PostgreSQL schema) records, at its first start, its node
id, its cluster id and the members (id -> address) it was started with.
Every later start is checked against that record, and a node refuses to
start:

- as another node (``--node-id`` differs): two members would share one
  acceptor's promises, which breaks Paxos's quorum intersection;
- alone (no ``--peers``) on a dir of a multi-node cluster: a quorum of one
  elects itself and accepts writes the real cluster never sees (split brain);
- with another member set (ids), unless ``--accept-member-change`` says the
  operator means it;
- with another ``--cluster-id`` than the one recorded (another cluster's dir).

The cluster id: the ``--cluster-id`` an operator gives (the same on every
node's command line), or ``DEFAULT_CLUSTER_ID``. It is deliberately not a
random value each node draws: nodes would then need a round of messages to
agree on one before the first election, and a node whose dir was lost could
never learn it again. A name on the command line is shared by construction,
survives a lost dir, and is what separates two clusters on one machine
(``pq dev-cluster`` draws one per cluster directory and passes it to every
node). A later start without ``--cluster-id`` keeps the recorded one.

Addresses are recorded for the hint in refusals and updated when they
change: an address is where a member is reached (a node moves, a test puts
a proxy in between), not who it is. The member *ids* are what Paxos counts.

``check`` is pure: it takes the record and the wanted identity and returns
what to record, or raises ``IdentityError``. ``claim_identity`` runs it
against a store at start, before the store's acceptor state is used.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from pqueue.errors import PQueueError

if TYPE_CHECKING:
    from pqueue.storage.base import AcceptorState, Storage

logger = logging.getLogger(__name__)

#: The cluster id of a node started without ``--cluster-id``.
DEFAULT_CLUSTER_ID = "pqueue"
#: What a cluster id may be: it goes into shell hints and logs verbatim.
CLUSTER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


class IdentityError(PQueueError):
    """This data dir belongs to another node, cluster or member set: the node
    must not start (it would split the cluster or break a quorum)."""


@dataclass(frozen=True)
class Identity:
    """Who a data dir belongs to."""

    cluster_id: str
    node_id: int
    #: Every member, this node too: id -> "host:port" ("" for a node alone).
    members: dict[int, str] = field(default_factory=dict)

    def to_json(self) -> str:
        """The record as both stores keep it."""
        return json.dumps(
            {
                "cluster_id": self.cluster_id,
                "node_id": self.node_id,
                "members": {str(i): a for i, a in sorted(self.members.items())},
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> Identity:
        """The record back from ``to_json``."""
        raw = json.loads(text)
        return cls(
            cluster_id=str(raw["cluster_id"]),
            node_id=int(raw["node_id"]),
            members={int(i): str(a) for i, a in raw["members"].items()},
        )


def validate_cluster_id(cluster_id: str) -> str:
    """``cluster_id`` if well formed; ValueError otherwise."""
    if not CLUSTER_ID.match(cluster_id):
        raise ValueError(
            f"cluster id {cluster_id!r}: letters, digits, '.', '_' and '-', at most 63, "
            "a letter or digit first"
        )
    return cluster_id


def _peers(members: dict[int, str]) -> str:
    return ",".join(f"{i}={a}" if a else str(i) for i, a in sorted(members.items()))


def restart_hint(record: Identity, data_dir: str) -> str:
    """The command that starts this dir's node as what it is."""
    command = f"pq node --data-dir {data_dir} --node-id {record.node_id}"
    if record.cluster_id != DEFAULT_CLUSTER_ID:
        command += f" --cluster-id {record.cluster_id}"
    if len(record.members) > 1:
        command += f" --peers {_peers(record.members)}"
    hint = f"start it with `{command}` (and your usual --listen, store, auth and TLS flags)"
    if len(record.members) > 1:
        hint += f", or in a `make cluster` dev cluster `pq cluster start-node {record.node_id}`"
    return hint


def check(
    record: Identity | None,
    wanted: Identity,
    cluster_id_given: bool,
    accept_member_change: bool,
    where: str,
    seen_nodes: frozenset[int] = frozenset(),
    store: str = "",
) -> Identity:
    """What to record for a start as ``wanted`` on a dir that recorded ``record``.

    ``cluster_id_given``: the operator named the cluster (else a recorded id
    is kept). ``where``: the data dir, for messages; ``store``: where the
    record lives when not in that dir (a PostgreSQL schema).
    ``seen_nodes``: the node ids in the ballots the store holds (its promise
    and records), which tell a dir from before identity records that was a
    member. Raises ``IdentityError`` when the start would make this dir
    another node, another cluster's member, or a member of another member set.
    """
    if record is None:
        others = sorted(seen_nodes - {wanted.node_id})
        if len(wanted.members) == 1 and others and not accept_member_change:
            # A dir from before identity records: its ballots show it was in
            # a cluster with these nodes, so alone it would split from them.
            raise IdentityError(
                f"refusing to start alone (no --peers): {where} has no identity record "
                f"yet, but holds ballots of nodes {others}: it was a member of a cluster. "
                f"Start it with the --node-id and --peers it ran with."
            )
        return wanted  # first start: this is who the dir is from now on
    whose = (
        f"{where}{f' ({store})' if store else ''} belongs to node {record.node_id} of cluster "
        f"{record.cluster_id!r} "
        f"with members {_peers(record.members)}"
    )
    hint = restart_hint(record, where)
    if wanted.node_id != record.node_id:
        raise IdentityError(
            f"refusing to start as node {wanted.node_id}: {whose}; {hint}. "
            "A node never takes over another member's dir (it would vote twice)."
        )
    if cluster_id_given and wanted.cluster_id != record.cluster_id:
        raise IdentityError(
            f"refusing to start in cluster {wanted.cluster_id!r}: {whose}; {hint}. "
            "Give a new node of another cluster an empty data dir."
        )
    if sorted(wanted.members) != sorted(record.members) and not accept_member_change:
        if len(wanted.members) == 1 < len(record.members):
            raise IdentityError(
                f"refusing to start alone (no --peers): {whose}; {hint}. "
                "Alone it would elect itself and accept writes the cluster never sees."
            )
        raise IdentityError(
            f"refusing to start with members {sorted(wanted.members)}: {whose}; {hint}. "
            "To change the member set for good, stop every node and start each with the "
            "new --peers and --accept-member-change."
        )
    return Identity(record.cluster_id, record.node_id, dict(wanted.members))


class Claimant(Protocol):
    """What ``claim_identity`` needs of a ``ClusterConfig``."""

    @property
    def node_id(self) -> int: ...
    @property
    def addresses(self) -> dict[int, str]: ...
    @property
    def cluster_id(self) -> str | None: ...
    @property
    def accept_member_change(self) -> bool: ...
    @property
    def data_dir(self) -> str: ...


async def claim_identity(
    storage: Storage, config: Claimant, state: AcceptorState | None = None
) -> Identity:
    """Check ``config`` against the identity ``storage`` recorded (record it at
    the first start, update it when addresses or, if accepted, members change).
    ``state``: the store's acceptor state, whose ballots show the nodes a dir
    from before identity records ran with. Raises ``IdentityError`` when this
    start must not happen."""
    raw = await storage.load_identity()
    record = None if raw is None else Identity.from_json(raw)
    # A cluster of one records no address: it has no peer to reach it, and
    # its port may be drawn anew at each start.
    members = dict(config.addresses) if len(config.addresses) > 1 else {config.node_id: ""}
    wanted = Identity(config.cluster_id or DEFAULT_CLUSTER_ID, config.node_id, members)
    where = config.data_dir or storage.describe()
    described = storage.describe()
    store = "" if described in (f"sqlite:{where}", where) else described
    seen: set[int] = set()
    if state is not None:
        seen = {state.promised[1], *(r.ballot[1] for r in state.records)} - {0}
    new = check(
        record,
        wanted,
        config.cluster_id is not None,
        config.accept_member_change,
        where,
        frozenset(seen),
        store,
    )
    if new != record:
        await storage.save_identity(new.to_json())
        if record is None:
            logger.info(
                "%s is now node %d of cluster %r with members %s",
                where,
                new.node_id,
                new.cluster_id,
                _peers(new.members),
            )
        elif sorted(new.members) != sorted(record.members):
            logger.warning(
                "%s: members changed from %s to %s (--accept-member-change)",
                where,
                _peers(record.members),
                _peers(new.members),
            )
        else:
            logger.info("%s: peer addresses now %s", where, _peers(new.members))
    return new
