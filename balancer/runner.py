"""Entry point of ``pq balancer run``: logging, event loop, serve until a signal."""

from __future__ import annotations

import asyncio
import logging
import sys

from balancer.config import BalancerConfig
from balancer.errors import BalancerError
from balancer.server import BalancerServer
from pqueue.wire.logs import LogFormat, describe, setup_logging
from pqueue.wire.loop import collector_tuned, new_event_loop, raise_fd_limit, serving_process

logger = logging.getLogger(__name__)


async def _serve(config: BalancerConfig) -> None:
    server = BalancerServer(config)
    with collector_tuned(config.gc_young):
        await server.start()
        async with serving_process(server.metrics.registry):
            metrics = (
                f", metrics on http://{server.metrics_address}/metrics"
                if server.metrics_address
                else ""
            )
            print(f"balancer listening on {server.address}{metrics}", flush=True)
            await server.serve_until_signal()


def run_balancer(config: BalancerConfig, log_level: str, log_format: LogFormat = "text") -> int:
    """Run one balancer until SIGTERM/SIGINT; exit status 0 on a clean stop."""
    setup_logging(log_level, "balancer", log_format)
    raise_fd_limit()  # one descriptor per client connection: the default 1,024 is few
    try:
        config.validate()
        with asyncio.Runner(loop_factory=new_event_loop) as runner:
            runner.run(_serve(config))
    except (BalancerError, ValueError) as exc:
        logger.error("balancer cannot run: %s", describe(exc))
        print(f"error: {describe(exc)}", file=sys.stderr)
        return 1
    return 0
