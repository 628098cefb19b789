"""gRPC's I/O for pq's own processes: imported by ``pqueue.cli`` before
anything imports ``grpc`` (the setting is read once, at that import).

grpcio 1.85 moves each call's I/O through its EventEngine threads, which
hand every completion to the asyncio loop: measured here (docs/benchmarks.md,
"gRPC's I/O path"), a stream message costs 0.6-0.7x the CPU on gRPC's older
poller path, and pq node's CPU per job falls by about a tenth. pq's programs
(node, balancer, worker, web, client commands) take that path unless
``GRPC_EXPERIMENTS`` is already set. A program using the SDK decides for
itself: it sets the variable before it imports grpc, or not.

gRPC plans to remove these experiments in a later release; with grpcio
pinned, this stays as measured, and after an upgrade the variable is
ignored (the default path again), never an error.
"""

from __future__ import annotations

import os

#: What ``GRPC_EXPERIMENTS`` is set to when it is unset.
POLLER_PATH = "-event_engine_client,-event_engine_listener,-event_engine_for_all_other_endpoints"

os.environ.setdefault("GRPC_EXPERIMENTS", POLLER_PATH)
