"""Multi-Paxos as a library: only the algorithm, no IO (see ``consensus.replica``)."""

from __future__ import annotations

from consensus.blob import Blob, BlobSink, MemoryBlob, read_all
from consensus.messages import NOOP, ZERO, Ballot, Message, Ready, Record, Role, SoftState
from consensus.replica import Config, DurableState, Replica, ReplicaStatus

__all__ = [
    "NOOP",
    "ZERO",
    "Ballot",
    "Blob",
    "BlobSink",
    "Config",
    "DurableState",
    "MemoryBlob",
    "Message",
    "Ready",
    "Record",
    "Replica",
    "ReplicaStatus",
    "Role",
    "SoftState",
    "read_all",
]
