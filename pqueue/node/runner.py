"""Entry point of ``pq node``: logging, event loop, serve until a signal."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from pqueue.errors import PQueueError
from pqueue.node.queue_node import NodeConfig
from pqueue.node.replicated import ClusterConfig
from pqueue.node.server import NodeServer, ServerConfig
from pqueue.storage import open_storage
from pqueue.wire.logs import LogFormat, describe, flush_logs, setup_logging
from pqueue.wire.loop import (
    GC_YOUNG,
    collector_tuned,
    new_event_loop,
    raise_fd_limit,
    serving_process,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class NodeOptions:
    """Everything ``pq node`` was told."""

    data_dir: Path
    node_id: int
    server: ServerConfig
    peers: dict[int, str] | None = None
    #: Each node's TCP peer port (``--peer-ports``); None: gRPC streams only.
    peer_ports: dict[int, int] | None = None
    #: Identity on disk (``pqueue.node.identity``): the cluster's name, and whether a
    #: new member set may replace the one the data dir recorded.
    cluster_id: str | None = None
    accept_member_change: bool = False
    store: str | None = None
    pg_schema: str | None = None
    #: Snapshot once this many bytes of entries were applied since the last.
    snapshot_log_bytes: int = 32 << 20
    log_level: str = "INFO"
    log_format: LogFormat = "text"
    #: Snapshot (and compact the log) every this many applied entries.
    snapshot_every_entries: int = 10_000
    #: How long an idle leader holds one side's entry for the other's (``ClusterConfig``).
    mix_wait_ms: float = 2.0
    #: Group commit: entries proposed and not yet chosen at once (``ClusterConfig``).
    open_entries: int = 1
    #: The cyclic collector's youngest threshold (``pqueue.wire.loop.GC_YOUNG``).
    gc_young: int = GC_YOUNG


OPEN_BANNER = (
    "AUTH IS OFF: anyone who can reach %s may enqueue, lease, read and delete "
    "any queue. Fine for a laptop; give --auth-key-file anywhere else."
)


class _Doing:
    """What the node was doing, for the line that says why it stopped."""

    what = "starting"


async def _serve(o: NodeOptions, doing: _Doing) -> bool:
    # Always this node's id, alone too: the data dir's identity is checked against it.
    cluster = ClusterConfig(
        node_id=o.node_id,
        addresses=dict(o.peers or {}),
        peer_ports=dict(o.peer_ports) if o.peer_ports is not None else None,
        cluster_id=o.cluster_id,
        accept_member_change=o.accept_member_change,
        data_dir=str(o.data_dir),
        mix_wait_ms=o.mix_wait_ms,
        open_entries=o.open_entries,
    )
    storage = open_storage(
        o.store or f"sqlite:{o.data_dir}", o.pg_schema or f"pq_n{o.node_id}", spool_dir=o.data_dir
    )
    logger.info("node %s stores its log in %s", o.node_id, storage.describe())
    node_config = NodeConfig(
        node_id=f"n{o.node_id}",
        snapshot_every_entries=o.snapshot_every_entries,
        snapshot_log_bytes=o.snapshot_log_bytes,
    )
    server = NodeServer(storage, o.server, node_config, cluster=cluster)
    with collector_tuned(o.gc_young):
        return await _start_and_serve(o, server, doing)


async def _start_and_serve(o: NodeOptions, server: NodeServer, doing: _Doing) -> bool:
    doing.what = "recovering its log and starting to serve"
    await server.start()
    # The recovered state is frozen too: full collections stop rescanning it.
    async with serving_process(server.metrics.registry):
        doing.what = "serving"
        if o.server.verifier is None:
            logger.warning(OPEN_BANNER, server.address)
        else:
            logger.info("node %s checks %s bearer tokens", o.node_id, o.server.verifier.algorithm)
        if o.server.tls is not None:
            mutual = "mutual TLS: peers, balancers and clients need a certificate from the CA"
            logger.info(
                "node %s serves TLS%s", o.node_id, f" ({mutual})" if o.server.tls.mutual else ""
            )
        # Tell scripts and `pq dev-cluster` where we listen (port 0 resolved).
        tmp = o.data_dir / "ADDRESS.tmp"
        tmp.write_text(server.address + "\n")
        tmp.replace(o.data_dir / "ADDRESS")
        return await server.serve_until_signal()


#: glibc's ``mallopt`` parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def pin_malloc_thresholds() -> bool:
    """Keep glibc returning big freed blocks to the OS (whether it could).

    Log entries of batched enqueues are ~130 KB each and short-lived. glibc
    raises its mmap threshold after freeing such a block, so later ones come
    from the heap and stay in the RSS once freed: a node filled with a
    million jobs settled ~30 MB higher (399 against 370 MB). Pinning the
    thresholds (as ``MALLOC_MMAP_THRESHOLD_`` would) keeps blocks over
    128 KiB mapped and trims the heap's top past 1 MiB.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to pin
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, 128 << 10)) and bool(mallopt(_M_TRIM_THRESHOLD, 1 << 20))


def run_node(o: NodeOptions) -> int:
    """Run one node until SIGTERM/SIGINT; exit status 0 on a clean stop."""
    setup_logging(o.log_level, f"n{o.node_id}", o.log_format)
    raise_fd_limit()  # one descriptor per client connection: the default 1,024 is few
    pin_malloc_thresholds()
    doing = _Doing()
    try:
        o.data_dir.mkdir(parents=True, exist_ok=True)  # ADDRESS goes there, whatever the store
        with asyncio.Runner(loop_factory=new_event_loop) as runner:
            clean = runner.run(_serve(o, doing))
    except (PQueueError, OSError, ValueError) as exc:
        # Never an empty line: the type, what it was doing, and for an error
        # that says nothing itself (a bare TimeoutError), where it came from.
        logger.error(
            "node %s cannot run (while %s): %s",
            o.node_id,
            doing.what,
            describe(exc),
            exc_info=exc if not str(exc).strip() else None,
        )
        flush_logs()  # the log's last lines before the error line
        print(
            f"error: node {o.node_id} cannot run (while {doing.what}): {describe(exc)}",
            file=sys.stderr,
        )
        return 1
    if not clean:
        flush_logs()
        print(
            f"error: node {o.node_id} stopped: its log failed (see the log above)", file=sys.stderr
        )
        return 1
    return 0
