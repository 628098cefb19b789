"""The balancer's probes carry its token as its file holds it now: rotating
the file (as docs/security.md says to) keeps the nodes probed after the first token
expires. Read once at start, the token expired under the balancer and every
probe was refused (UNAUTHENTICATED), so every node was ejected."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from balancer.config import BalancerConfig
from balancer.pool import PoolConfig
from balancer.server import BalancerServer
from pqueue.client import Client
from pqueue.node.auth import BALANCER, Verifier, issue
from pqueue.wire.tokens import TokenFile
from tests.inproc import one_node

SECRET = b"r" * 32


def rotate(path: Path, tok: str) -> None:
    tmp = path.with_suffix(".new")
    tmp.write_text(tok + "\n")
    os.replace(tmp, path)


async def test_probes_use_the_rotated_balancer_token(tmp_path: Path) -> None:
    path = tmp_path / "balancer-token"
    short_ttl_s = 2
    rotate(path, issue(SECRET, "lb", [BALANCER], short_ttl_s, subject="lb-1"))
    expires_at = time.time() + short_ttl_s
    async with one_node(tmp_path, verifier=Verifier(SECRET, leeway_s=0)) as srv:
        balancer = BalancerServer(
            BalancerConfig(
                backends=(srv.address,),
                probe_interval_s=0.1,
                probe_timeout_s=0.5,
                pool=PoolConfig(report_expiry_s=1.0, slow_start_s=0.1),
                balancer_token=TokenFile(path),  # probes carry it (no probe token given)
                grace_s=0.5,
            )
        )
        await balancer.start()
        try:
            pool = balancer.backends.pool
            deadline = time.monotonic() + 10
            while pool.leader() is None:
                assert time.monotonic() < deadline, "the balancer never saw the leader"
                await asyncio.sleep(0.05)
            rotate(path, issue(SECRET, "lb", [BALANCER], 600, subject="lb-1"))
            # Past the first token's expiry, and the report expiry after it.
            await asyncio.sleep(max(0.0, expires_at - time.time()) + 1.5)
            backend = pool.backends[srv.address]
            assert "UNAUTHENTICATED" not in backend.last_error, "probes carried the old token"
            assert not backend.ejected, "the node was ejected: its probes were refused"
            # Reads go to the nodes the probes keep usable: this one still.
            producer = issue(SECRET, "acme", ["producer"], 600)
            async with Client(balancer.address, token=producer, timeout_s=5) as c:
                await c.enqueue("q", b"through the balancer")
                assert [s.queue for s in await c.stats("q")] == ["q"]
        finally:
            await balancer.stop()
