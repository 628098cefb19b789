"""The /metrics endpoint as Prometheus (and a confused client) would use it."""

from __future__ import annotations

import asyncio
import gzip
import logging
from collections.abc import Iterable

import pytest
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from pqueue.wire.metrics_http import MetricsServer


async def request(port: int, raw: bytes) -> tuple[str, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        await writer.drain()
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in head[1:] if h)}
        head_only = raw.startswith(b"HEAD ")
        body = b"" if head_only else await reader.readexactly(int(headers["content-length"]))
        return head[0], headers, body
    finally:
        writer.close()
        await writer.wait_closed()


async def test_metrics_are_served_plain_or_gzipped_and_nothing_else() -> None:
    registry = CollectorRegistry()
    Counter("pq_test_things", "Things.", registry=registry).inc(3)
    server = MetricsServer(registry, "127.0.0.1:0")
    await server.start()
    try:
        status, headers, body = await request(
            server.port, b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        assert status == "HTTP/1.1 200 OK"
        assert headers["content-type"].startswith("text/plain; version=0.0.4")
        assert b"pq_test_things_total 3.0" in body
        status, headers, body = await request(
            server.port, b"GET /metrics HTTP/1.1\r\nAccept-Encoding: gzip\r\n\r\n"
        )
        assert headers["content-encoding"] == "gzip"
        assert b"pq_test_things_total 3.0" in gzip.decompress(body)
        status, _, _ = await request(server.port, b"GET /other HTTP/1.1\r\n\r\n")
        assert status == "HTTP/1.1 404 Not Found"
        status, _, _ = await request(server.port, b"POST /metrics HTTP/1.1\r\n\r\n")
        assert status == "HTTP/1.1 405 Method Not Allowed"
        status, _, _ = await request(server.port, b"nonsense\r\n\r\n")
        assert status == "HTTP/1.1 400 Bad Request"
        status, headers, body = await request(server.port, b"HEAD /metrics HTTP/1.0\r\n\r\n")
        assert status == "HTTP/1.1 200 OK"
        assert int(headers["content-length"]) > 0
    finally:
        await server.stop()


async def test_a_client_that_never_finishes_its_request_does_not_block_stop() -> None:
    server = MetricsServer(CollectorRegistry(), "127.0.0.1:0")
    await server.start()
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(b"GET /metr")
        await writer.drain()
        await asyncio.sleep(0.05)
        await asyncio.wait_for(server.stop(), 5)
        assert await reader.read() == b""  # closed on us
    finally:
        writer.close()


class Broken(Collector):
    def collect(self) -> Iterable[Metric]:
        raise RuntimeError("boom")


async def test_a_failing_collector_is_a_500_and_the_server_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    registry = CollectorRegistry()
    broken = Broken()
    registry.register(broken)
    server = MetricsServer(registry, "127.0.0.1:0")
    await server.start()
    try:
        status, _, _ = await request(server.port, b"GET /metrics HTTP/1.1\r\n\r\n")
        assert status == "HTTP/1.1 500 Internal Server Error"
        assert "collecting metrics failed" in caplog.text
        registry.unregister(broken)
        status, _, _ = await request(server.port, b"GET /metrics HTTP/1.1\r\n\r\n")
        assert status == "HTTP/1.1 200 OK"
    finally:
        await server.stop()


async def test_stopping_with_a_kept_alive_scrape_open_is_quiet(
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = MetricsServer(CollectorRegistry(), "127.0.0.1:0")
    await server.start()
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(b"GET /metrics HTTP/1.1\r\n\r\n")  # keep-alive: Prometheus's way
        await writer.drain()
        await reader.readuntil(b"\r\n\r\n")
        await server.stop()
        await asyncio.sleep(0.1)  # asyncio reports a mishandled task on a later callback
    finally:
        writer.close()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
