"""Multi-Paxos as a library: only the algorithm, no IO (see ``consensus.replica``)."""

from __future__ import annotations

from consensus.messages import NOOP, ZERO, Ballot, Message, Ready, Record, Role, SoftState
from consensus.replica import Config, DurableState, Replica, ReplicaStatus

__all__ = [
    "NOOP",
    "ZERO",
    "Ballot",
    "Config",
    "DurableState",
    "Message",
    "Ready",
    "Record",
    "Replica",
    "ReplicaStatus",
    "Role",
    "SoftState",
]
