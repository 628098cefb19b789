"""``/metrics`` over HTTP, served on the event loop.

prometheus-client's own server runs in a thread; our collectors read the
queue state and the consensus replica, which only the event loop may touch
while it runs. So the scrape is answered on the loop: a plain HTTP/1.1
server that knows ``GET /metrics`` (text format 0.0.4, gzip if asked) and
nothing else. With a token (``pq node --metrics-token-file``), a scrape must
carry ``Authorization: Bearer <token>`` (Prometheus: ``authorization:
credentials_file``) or gets 401. A scrape is small work (a few hundred lines), done between
other callbacks; turning them into text (the costly part with many series)
runs in a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hmac
import logging
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from pqueue.wire.logs import describe

logger = logging.getLogger(__name__)

#: Longest request head accepted (a scrape's is a few hundred bytes).
_MAX_HEAD_BYTES = 16 * 1024
_READ_TIMEOUT_S = 10.0


def split_listen(listen: str) -> tuple[str, int]:
    """``host:port`` -> (host, port); raises ValueError on a bad address."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"metrics address {listen!r} must be HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


class _Collected(Collector):
    """Families already read, for formatting away from the loop."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterable[Metric]:
        return self.families


class MetricsServer:
    """Serves one registry at ``/metrics``; ``start`` binds, ``stop`` closes."""

    def __init__(self, registry: CollectorRegistry, listen: str, token: str | None = None) -> None:
        self.registry = registry
        #: The bearer token a scrape must carry; None: none needed.
        self.token = token
        self.host, self._port = split_listen(listen)
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        """The bound port (0 resolved once started)."""
        return self._port

    @property
    def address(self) -> str:
        return f"{self.host}:{self._port}"

    async def start(self) -> None:
        try:
            self._server = await asyncio.start_server(self._serve, self.host, self._port)
        except OSError as exc:
            raise OSError(
                f"cannot serve metrics on {self.host}:{self._port}: {describe(exc)}"
            ) from exc
        self._port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for task in list(self._conns):
            task.cancel()
        if self._conns:
            await asyncio.wait(self._conns)
        await self._server.wait_closed()
        self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        try:
            while await self._one(reader, writer):
                pass
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            pass
        except asyncio.CancelledError:
            pass  # stop(): end quietly (asyncio logs a cancelled connection task)
        finally:
            self._conns.discard(task)
            writer.close()
            with contextlib.suppress(OSError, asyncio.CancelledError):
                await writer.wait_closed()

    async def _one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Answer one request; whether the connection stays open."""
        async with asyncio.timeout(_READ_TIMEOUT_S):
            head = await reader.readuntil(b"\r\n\r\n")
        if len(head) > _MAX_HEAD_BYTES:
            return False
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        headers = {
            k.strip().lower(): v.strip()
            for k, _, v in (line.partition(":") for line in lines[1:] if line)
        }
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            await self._respond(writer, 400, b"bad request\n", "text/plain", False)
            return False
        method, target, version = parts
        keep = version == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
        path = target.split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            await self._respond(writer, 405, b"method not allowed\n", "text/plain", keep)
        elif not self._authorized(headers.get("authorization", "")):
            await self._respond(writer, 401, b"a bearer token is needed\n", "text/plain", keep)
        elif path == "/metrics":
            try:
                body = await self._render()
            except Exception:
                logger.exception("collecting metrics failed")
                await self._respond(
                    writer, 500, b"collecting metrics failed\n", "text/plain", False
                )
                return False
            gz = "gzip" in headers.get("accept-encoding", "")
            await self._respond(
                writer,
                200,
                gzip.compress(body, 1) if gz else body,
                CONTENT_TYPE_PLAIN_0_0_4,  # the classic text format every Prometheus 2 reads
                keep,
                gzipped=gz,
                head=method == "HEAD",
            )
        else:
            await self._respond(writer, 404, b"see /metrics\n", "text/plain", keep)
        return keep

    def _authorized(self, header: str) -> bool:
        if self.token is None:
            return True
        scheme, _, given = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            given.strip().encode(), self.token.encode()
        )

    async def _render(self) -> bytes:
        """Read every figure on the loop (cheap), format them in a thread (not)."""
        families = list(self.registry.collect())
        return await asyncio.to_thread(generate_latest, _Collected(families))

    @staticmethod
    async def _respond(
        writer: asyncio.StreamWriter,
        status: int,
        body: bytes,
        content_type: str,
        keep: bool,
        gzipped: bool = False,
        head: bool = False,
    ) -> None:
        reason = {
            200: "OK",
            400: "Bad Request",
            401: "Unauthorized",
            404: "Not Found",
            405: "Method Not Allowed",
            500: "Internal Server Error",
        }
        lines = [
            f"HTTP/1.1 {status} {reason[status]}",
            f"Content-Type: {content_type}",
            f"Content-Length: {len(body)}",
            f"Connection: {'keep-alive' if keep else 'close'}",
        ]
        if gzipped:
            lines.append("Content-Encoding: gzip")
        if status == 401:
            lines.append('WWW-Authenticate: Bearer realm="metrics"')
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        if not head:
            writer.write(body)
        await writer.drain()
