"""Entry point of ``pq node``: logging, event loop, serve until a signal."""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path

from pqueue.errors import PQueueError
from pqueue.logs import LogFormat, setup_logging
from pqueue.node import NodeConfig
from pqueue.replicated import ClusterConfig
from pqueue.server import NodeServer, ServerConfig
from pqueue.storage import open_storage

logger = logging.getLogger(__name__)


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop where it is installed, asyncio's loop elsewhere."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency off Windows
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


async def _serve(
    data_dir: Path,
    listen: str,
    node_id: int,
    peers: dict[int, str] | None,
    grace_s: float,
    store: str | None,
    pg_schema: str | None,
    metrics_listen: str | None,
) -> bool:
    cluster = ClusterConfig(node_id=node_id, addresses=peers) if peers else None
    storage = open_storage(store or f"sqlite:{data_dir}", pg_schema or f"pq_n{node_id}")
    logger.info("node %s stores its log in %s", node_id, storage.describe())
    server = NodeServer(
        storage,
        ServerConfig(listen=listen, grace_s=grace_s, metrics_listen=metrics_listen),
        NodeConfig(node_id=f"n{node_id}"),
        cluster=cluster,
    )
    await server.start()
    # Tell scripts and `pq dev-cluster` where we listen (port 0 resolved).
    tmp = data_dir / "ADDRESS.tmp"
    tmp.write_text(server.address + "\n")
    tmp.replace(data_dir / "ADDRESS")
    return await server.serve_until_signal()


def run_node(
    data_dir: Path,
    listen: str,
    node_id: int,
    peers: dict[int, str] | None,
    log_level: str,
    grace_s: float,
    store: str | None = None,
    pg_schema: str | None = None,
    metrics_listen: str | None = None,
    log_format: LogFormat = "text",
) -> int:
    """Run one node until SIGTERM/SIGINT; exit status 0 on a clean stop."""
    setup_logging(log_level, f"n{node_id}", log_format)
    try:
        data_dir.mkdir(parents=True, exist_ok=True)  # ADDRESS goes there, whatever the store
        with asyncio.Runner(loop_factory=new_event_loop) as runner:
            clean = runner.run(
                _serve(data_dir, listen, node_id, peers, grace_s, store, pg_schema, metrics_listen)
            )
    except (PQueueError, OSError, ValueError) as exc:
        logger.error("node %s cannot run: %s", node_id, exc)
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if not clean:
        print(f"error: node {node_id} stopped: its log failed (see the log above)", file=sys.stderr)
        return 1
    return 0
