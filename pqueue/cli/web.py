"""``pq web``: serve the HTTP/JSON API (``pqueue.web``) in front of the cluster
at ``--endpoint`` (the balancer), until SIGTERM or Ctrl-C.

Registering the command loads no web stack; running it does.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from typing import Any

log = logging.getLogger("pqueue.web")

#: Seconds open requests (event streams) get to end when the process stops.
SHUTDOWN_GRACE_S = 1


def register(sub: Any) -> None:
    """The ``web`` subparser."""
    p = sub.add_parser(
        "web",
        help="serve the web dashboard and the HTTP/JSON API (/v1/) in front of the cluster",
        description="Serve the web dashboard (/) and the HTTP/JSON API (/v1/, "
        "/openapi.json) in front of the cluster at --endpoint. "
        "A request's 'Authorization: Bearer' token is passed on to the cluster; "
        "--token/--token-file (global options) is used for requests without one.",
    )
    p.set_defaults(run=run_web)
    p.add_argument("--listen", default="127.0.0.1:7780", help="HOST:PORT (port 0: any)")
    p.add_argument(
        "--allowed-host",
        action="append",
        dest="allowed_hosts",
        metavar="HOST",
        help="a Host header to answer (repeat for more; '*.example.com' for subdomains); "
        "default: 127.0.0.1, localhost and ::1 when --listen is on loopback, else any",
    )
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")


#: The Host names a browser on this machine uses for a loopback listener.
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")


def allowed_hosts(listen_host: str, given: list[str] | None) -> list[str]:
    """The Host headers pq web answers: those given, else this machine's
    names for a loopback listener (a DNS-rebinding page cannot reach it), else
    any (behind a proxy or in a container, say; name them with
    ``--allowed-host`` in production)."""
    if given:
        return given
    return list(LOOPBACK_HOSTS) if listen_host in LOOPBACK_HOSTS else ["*"]


def _host_port(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"--listen wants HOST:PORT, got {listen!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


async def auth_state(endpoint: str, **options: Any) -> str | None:
    """One startup line on the cluster's auth, from a call without a token;
    None while the cluster does not answer."""
    from pqueue.client import Client
    from pqueue.web.auth import probe_auth

    options = {**options, "token": None}
    async with Client(endpoint, timeout_s=3.0, max_retries=1, **options) as c:
        on = await probe_auth(c)
    if on is None:
        log.debug("cluster at %s not reachable", endpoint)
        return None
    if on:
        return (
            "auth is ON at the cluster: requests need 'Authorization: Bearer TOKEN'"
            " (or pq web --token)"
        )
    return (
        f"auth is OFF at the cluster {endpoint}: anyone who reaches this port "
        "can read and change every queue"
    )


async def announce_auth(endpoint: str, **options: Any) -> None:
    """Say whether the cluster's auth is on, once it answers (a cluster
    starting beside this process may take a few seconds)."""
    said = False
    while (state := await auth_state(endpoint, **options)) is None:
        if not said:
            log.info("cluster at %s not reachable yet; serving anyway", endpoint)
            said = True
        await asyncio.sleep(1.0)
    (log.warning if "OFF" in state else log.info)(state)


async def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from pqueue.cli.client import client_options
    from pqueue.web.app import ClientPool, build_app

    options = client_options(args)
    host, port = _host_port(args.listen)
    pool = ClientPool(
        args.endpoint, token=options["token"], tls=options["tls"], timeout_s=args.timeout_s
    )
    app = build_app(pool, allowed_hosts(host, args.allowed_hosts))
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        lifespan="on",
        # The dashboard's event streams never end on their own: on shutdown,
        # wait this long for them, then cancel them (which ends their watches).
        timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            await task
            return 1
        await asyncio.sleep(0.02)
    bound = server.servers[0].sockets[0].getsockname()[1]
    url = f"http://{host}:{bound}"
    log.info(
        "web: %s (dashboard at /, API under /v1/, OpenAPI at /openapi.json) -> %s",
        url,
        args.endpoint,
    )
    announcing = asyncio.create_task(announce_auth(args.endpoint, tls=options["tls"]))
    try:
        await task
    finally:
        announcing.cancel()
    return 0


def run_web(args: argparse.Namespace) -> int:
    """Serve until SIGTERM or Ctrl-C (uvicorn's own handlers stop it)."""
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        print(
            f"error: FAILED_PRECONDITION: pq web needs pip install 'pqueue[web]' ({e})",
            file=sys.stderr,
        )
        return 1
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return asyncio.run(serve(args))
    except (OSError, ValueError) as e:
        from pqueue.cli.failure import exit_code, failure_line

        print(failure_line(e), file=sys.stderr)
        return exit_code(e)
