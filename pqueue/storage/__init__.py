"""Durable storage of a node's acceptor state and snapshots, behind one ``Storage`` protocol."""

from __future__ import annotations

from pqueue.storage.base import AcceptorState, Storage, StoredSnapshot, open_storage

__all__ = ["AcceptorState", "Storage", "StoredSnapshot", "open_storage"]
