"""The role names a token carries, and a peer token's subject.

The vocabulary every program shares: ``pq token issue`` writes these names,
the node checks them (``pqueue.node.principal``, ``pqueue.node.auth``), and the
CLI lists them in its help, without loading the node's verifier.
"""

from __future__ import annotations

PRODUCER = "producer"
CONSUMER = "consumer"
ADMIN = "admin"
#: A node of the cluster: may speak the peer (consensus) protocol. No other
#: role implies it, not even admin: a peer's messages decide what is committed.
PEER = "peer"
#: A balancer: may tell a node which client it forwards a call for
#: (``x-forwarded-for``) and nothing else; no other role implies it.
BALANCER = "balancer"
ROLES = frozenset((PRODUCER, CONSUMER, ADMIN, PEER, BALANCER))
#: A peer token's subject names the node it speaks for: ``node:<id>``.
NODE_SUBJECT_PREFIX = "node:"
#: Clock skew allowed on a token's ``exp``, ``nbf`` and ``iat`` by default.
DEFAULT_LEEWAY_S = 5.0


def node_subject(node_id: int) -> str:
    """The subject of node ``node_id``'s peer token."""
    return f"{NODE_SUBJECT_PREFIX}{node_id}"
