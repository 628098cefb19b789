"""Metrics and logs of a running cluster: a 3-node cluster and a balancer in one
process (real gRPC, real HTTP scrapes), and a real ``pq node`` process."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from pqueue.client import Client
from pqueue.errors import InvalidArgumentError
from pqueue.node.metrics import NodeCollector, NodeMetrics
from pqueue.node.queue_node import NodeConfig, QueueNode
from pqueue.node.server import NodeServer, ServerConfig
from pqueue.storage.sqlite import SqliteStorage
from pqueue.v1 import log_pb2 as logpb
from pqueue.v1 import queue_pb2 as pb
from pqueue.v1 import queue_pb2_grpc as pbg
from pqueue.wire.logs import JsonFormatter, TextFormatter
from tests import promtool
from tests.deploy.dashboard import dashboard_metric_names
from tests.deploy.k8s import autoscaling_metric_names
from tests.integration.test_balancer import Setup, balanced

#: Families the issue asks every node to export.
NODE_FAMILIES = {
    "pq_grpc_server_handled_total",
    "pq_grpc_server_handling_seconds",
    "pq_queue_jobs",
    "pq_queue_oldest_ready_age_seconds",
    "pq_queue_jobs_enqueued_total",
    "pq_queue_jobs_leased_total",
    "pq_queue_jobs_acked_total",
    "pq_queue_jobs_nacked_total",
    "pq_queue_jobs_expired_total",
    "pq_queue_jobs_dead_lettered_total",
    "pq_queue_jobs_completed_total",
    "pq_queue_jobs_cancelled_total",
    "pq_queue_jobs_ttl_expired_total",
    "pq_queue_paused",
    "pq_consensus_leader",
    "pq_consensus_ballot_round",
    "pq_consensus_commit_index",
    "pq_consensus_applied_index",
    "pq_consensus_elections_total",
    "pq_consensus_replication_lag_entries",
    "pq_consensus_batch_commands",
    "pq_storage_fsync_seconds",
    "pq_snapshot_seconds",
    "pq_snapshot_bytes",
    "pq_snapshot_last_timestamp_seconds",
    "pq_process_cpu_seconds_total",
    "pq_process_resident_memory_bytes",
    "pq_peer_link_transport",
    "pq_peer_messages_dropped_total",
    "pq_peer_tcp_batches_total",
    "pq_peer_tcp_broken_total",
    "pq_peer_tcp_turned_away_total",
    "pq_peer_refused_total",
    "pq_peer_spoofed_messages_total",
}
BALANCER_FAMILIES = {
    "pq_grpc_server_handled_total",
    "pq_grpc_server_handling_seconds",
    "pq_balancer_backend_weight",
    "pq_balancer_picks_total",
    "pq_balancer_ejections_total",
    "pq_balancer_retries_total",
    "pq_process_cpu_seconds_total",
    "pq_process_resident_memory_bytes",
}

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return str(r.read().decode())


def family_names(text: str) -> set[str]:
    """Family names as exposed: counters with ``_total``, histograms without suffixes."""
    names = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name + ("_total" if family.type == "counter" else ""))
    return names


def samples(text: str) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(s: Samples, name: str, **labels: str) -> float:
    return s[(name, frozenset(labels.items()))]


@pytest.fixture
async def setup(tmp_path: Path) -> AsyncIterator[Setup]:
    async with balanced(tmp_path, metrics=True) as s:
        yield s


async def some_traffic(address: str) -> None:
    """Four jobs in: one acked, one nacked to the dead letters, one expired (dead
    at once), one ready; one bad call."""
    async with Client(address, max_retries=0) as c:
        await c.create_queue("q", pb.QueueConfig(max_attempts=1, max_priority=5))
        for priority in (1, 2, 3):
            await c.enqueue("q", b"job", priority=priority)
        [first] = await c.lease("q")
        await c.ack("q", first.job_id, first.lease_id)
        [second] = await c.lease("q")
        await c.nack("q", second.job_id, second.lease_id, reason="boom")
        await c.enqueue("q", b"too late", priority=4, expires_at_ms=1)
        with pytest.raises(InvalidArgumentError):
            await c.enqueue("q", b"x", priority=9)


async def test_every_node_and_the_balancer_export_every_family_and_pass_promtool(
    setup: Setup,
) -> None:
    await some_traffic(setup.balancer.address)
    await setup.cluster.settled()
    leader = await setup.cluster.leader()
    texts = {
        i: await asyncio.to_thread(scrape, s.metrics_server.address)
        for i, s in setup.cluster.servers.items()
        if s.metrics_server is not None
    }
    assert len(texts) == 3
    balancer_text = await asyncio.to_thread(scrape, setup.balancer.metrics_address)
    for text in (*texts.values(), balancer_text):
        promtool.check("metrics", stdin=text.encode())
    for i, text in texts.items():
        missing = NODE_FAMILIES - family_names(text)
        assert not missing, f"n{i} lacks {sorted(missing)}"
    assert not BALANCER_FAMILIES - family_names(balancer_text)

    # The figures are the cluster's: replicated state reads the same on every node.
    for i, text in texts.items():
        s = samples(text)
        assert value(s, "pq_queue_jobs", queue="q", state="ready") == 1
        assert value(s, "pq_queue_jobs", queue="q", state="dead") == 2
        assert value(s, "pq_queue_jobs", queue="q", state="leased") == 0
        assert value(s, "pq_queue_jobs", queue="q", state="cancelled") == 0
        assert value(s, "pq_queue_jobs_enqueued_total", queue="q") == 4
        assert value(s, "pq_queue_jobs_leased_total", queue="q") == 2
        assert value(s, "pq_queue_jobs_acked_total", queue="q") == 1
        assert value(s, "pq_queue_jobs_nacked_total", queue="q") == 1
        assert value(s, "pq_queue_jobs_dead_lettered_total", queue="q") == 2
        assert value(s, "pq_queue_jobs_ttl_expired_total", queue="q") == 1
        assert value(s, "pq_queue_jobs_cancelled_total", queue="q") == 0
        assert value(s, "pq_queue_paused", queue="q") == 0
        assert value(s, "pq_consensus_leader") == (1 if i == leader else 0)
        assert value(s, "pq_consensus_applied_index") == value(s, "pq_consensus_commit_index")
        assert value(s, "pq_storage_fsync_seconds_count") > 0
        assert value(s, "pq_node_info", node=f"n{i}", version=value_label(s, "pq_node_info")) == 1
        lag = {dict(k[1])["peer"] for k in s if k[0] == "pq_consensus_replication_lag_entries"}
        assert lag == ({str(p) for p in texts if p != i} if i == leader else set())
        # Every link to a peer sends over TCP; each node takes batches on its peer port.
        for p in texts:
            for lane in ("bulk", "small") if p != i else ():
                assert value(s, "pq_peer_link_transport", peer=str(p), lane=lane, transport="tcp")
        assert value(s, "pq_peer_tcp_batches_total") > 0
        assert value(s, "pq_peer_tcp_broken_total") == 0
    s = samples(texts[leader])
    assert value(s, "pq_consensus_batch_commands_count") > 0
    created = {"service": "pqueue.v1.Admin", "method": "CreateQueue", "code": "OK"}
    assert value(s, "pq_grpc_server_handled_total", **created) == 1
    # The SDK sent its calls in Submits on a SubmitStream the balancer
    # carried; the bad job failed alone inside one.
    assert value(s, "pq_node_submit_stream_requests_total") >= 1
    assert sum(value(samples(t), "pq_consensus_elections_total") for t in texts.values()) >= 1
    b = samples(balancer_text)
    carried = [
        v for k, v in b.items() if k[0] in ("pq_balancer_streams_open", "pq_balancer_streams_total")
    ]
    assert sum(carried) >= 1
    assert value(b, "pq_balancer_backend_leader", backend=setup.backend(leader)) == 1


async def test_a_snapshot_reports_its_time_and_size(tmp_path: Path) -> None:
    metrics = NodeMetrics()
    config = NodeConfig(snapshot_every_entries=4)
    async with QueueNode(SqliteStorage(tmp_path), config, observer=metrics) as node:
        for n in range(6):
            await node.propose(logpb.Command(create_queue=pb.CreateQueueRequest(queue=f"q{n}")))
        for _ in range(1000):  # taken in the background: up to 10 s
            if node.log.status().snapshot_index:
                break
            await asyncio.sleep(0.01)
        assert node.log.status().snapshot_index > 0
    taken = metrics.registry.get_sample_value("pq_snapshot_seconds_count")
    assert (taken or 0) >= 1
    assert (metrics.registry.get_sample_value("pq_snapshot_seconds_sum") or 0) > 0
    assert (metrics.registry.get_sample_value("pq_snapshot_bytes") or 0) > 0
    assert (metrics.registry.get_sample_value("pq_snapshot_last_timestamp_seconds") or 0) > 0


def value_label(s: Samples, name: str) -> str:
    [labels] = [dict(k[1]) for k in s if k[0] == name]
    return labels["version"]


async def test_every_metric_the_dashboard_queries_is_exported(setup: Setup) -> None:
    await some_traffic(setup.balancer.address)
    exported: set[str] = set()
    for server in setup.cluster.servers.values():
        assert server.metrics_server is not None
        exported |= family_names(await asyncio.to_thread(scrape, server.metrics_server.address))
    exported |= family_names(await asyncio.to_thread(scrape, setup.balancer.metrics_address))
    used = dashboard_metric_names()
    assert len(used) >= 15  # the dashboard is not empty
    assert used <= exported, f"the dashboard queries what nobody exports: {used - exported}"
    scaling = autoscaling_metric_names()
    assert scaling == {"pq_queue_jobs", "pq_queue_oldest_ready_age_seconds"}
    assert scaling <= exported, f"the autoscalers read what nobody exports: {scaling - exported}"


TIME = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}"
REQUEST_LINE = re.compile(
    rf"^{TIME} \[INFO\] (?P<route>\S+): Received (?P<method>\w+) request for "
    r"(?P<uri>grpc://[\d.]+:\d+(?P<path>/\S+)\?request_id=(?P<rid>[\w-]+)) from IP: (?P<ip>\S+)$"
)
#: A call's error line ("..., 2.4 ms)"), or one operation's of a Submit that
#: answered OK (", op 0, enqueue)": ``observe.log_op_failure``).
ERROR_LINE = re.compile(
    rf"^{TIME} \[ERROR\] (?P<route>\S+): (?P<message>(?P<code>[A-Z_]+): .+ "
    r"\(request_id=(?P<rid>[\w-]+), (?:[\d.]+ ms|op \d+, \w+)\))$"
)


def lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    text = TextFormatter("test")
    return [text.format(r) for r in caplog.records if r.name == "pqueue.requests"]


async def test_request_and_error_lines_carry_the_node_and_one_request_id_end_to_end(
    setup: Setup, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pqueue.requests")
    async with Client(setup.balancer.address, max_retries=0) as c:
        await c.create_queue("q", pb.QueueConfig(max_priority=5))
    caplog.clear()
    async with grpc.aio.insecure_channel(setup.balancer.address) as channel:
        queue = pbg.QueueStub(channel)
        job = pb.JobSpec(payload=b"x", priority=1)
        await queue.Enqueue(
            pb.EnqueueRequest(queue="q", job=job), metadata=(("x-request-id", "my-req-1"),)
        )
        with pytest.raises(grpc.aio.AioRpcError):
            await queue.Enqueue(pb.EnqueueRequest(queue="q", job=pb.JobSpec(priority=9)))
    # A server logs a call's end just after its answer is on the wire.
    deadline = time.monotonic() + 5
    while len([m for m in map(ERROR_LINE.match, lines(caplog)) if m]) < 2:
        assert time.monotonic() < deadline, lines(caplog)
        await asyncio.sleep(0.02)
    requests = [m for m in map(REQUEST_LINE.match, lines(caplog)) if m]
    errors = [m for m in map(ERROR_LINE.match, lines(caplog)) if m]
    leader = f"n{await setup.cluster.leader()}"
    # The caller's own id, through the balancer to the leader (which, as
    # the Enqueue Manager, carried the lone call in a Submit of one).
    mine = [m for m in requests if m["rid"] == "my-req-1"]
    assert {m["route"] for m in mine} == {
        "balancer/pqueue.v1.Queue/Enqueue",
        f"{leader}/pqueue.v1.Queue/Submit",
    }
    for m in mine:
        assert m["ip"] == "127.0.0.1"
    # A call without one gets one at the balancer, and the node logs the same.
    others = [m for m in requests if m["rid"] != "my-req-1"]
    assert len(others) == 2
    assert len({m["rid"] for m in others}) == 1
    # The refused call: one error line on the node (its operation's, in the
    # Submit that carried it) and one on the balancer, same id.
    assert {m["route"] for m in errors} == {
        "balancer/pqueue.v1.Queue/Enqueue",
        f"{leader}/pqueue.v1.Queue/Submit",
    }
    assert {m["rid"] for m in errors} == {others[0]["rid"]}
    assert all(m["code"] == "INVALID_ARGUMENT" and "priority" in m["message"] for m in errors)


async def test_a_follower_forwarding_passes_the_request_id_and_the_callers_ip(
    setup: Setup, caplog: pytest.LogCaptureFixture
) -> None:
    leader = await setup.cluster.leader()
    follower = next(i for i in setup.cluster.servers if i != leader)
    async with Client(setup.backend(leader), max_retries=0) as c:
        await c.create_queue("q")
    caplog.set_level(logging.INFO, logger="pqueue.requests")
    async with grpc.aio.insecure_channel(setup.backend(follower)) as channel:
        await pbg.QueueStub(channel).Enqueue(
            pb.EnqueueRequest(queue="q", job=pb.JobSpec(payload=b"x")),
            metadata=(("x-request-id", "fwd-1"),),
        )
    routes = {
        m["route"]: m["ip"]
        for m in map(REQUEST_LINE.match, lines(caplog))
        if m and m["rid"] == "fwd-1"
    }
    assert routes == {
        f"n{follower}/pqueue.v1.Queue/Enqueue": "127.0.0.1",
        f"n{leader}/pqueue.v1.Queue/Enqueue": "127.0.0.1",
    }


def test_json_lines_hold_the_same_fields() -> None:
    record = logging.LogRecord(
        "pqueue.requests", logging.INFO, __file__, 1, "Received %s", ("X",), None
    )
    record.route = "n2/pqueue.v1.Queue/Lease"
    record.request_id = "abc"
    line = json.loads(JsonFormatter("n2").format(record))
    assert line["level"] == "INFO"
    assert line["node"] == "n2"
    assert line["route"] == "n2/pqueue.v1.Queue/Lease"
    assert line["message"] == "Received X"
    assert line["request_id"] == "abc"
    assert re.fullmatch(TIME, line["time"])
    plain = logging.LogRecord(
        "pqueue.node.replicated", logging.INFO, __file__, 1, "became leader", (), None
    )
    assert json.loads(JsonFormatter("n2").format(plain))["route"] == "n2/pqueue.node.replicated"
    assert re.fullmatch(
        rf"{TIME} \[INFO\] n2/pqueue\.node\.replicated: became leader",
        TextFormatter("n2").format(plain),
    )


def test_a_node_process_logs_json_and_serves_metrics(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "pqueue.cli", "node", "--data-dir", str(tmp_path / "n1")]
    cmd += ["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--log-format", "json"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        os.set_blocking(proc.stderr.fileno(), True)
        deadline = time.monotonic() + 30
        metrics = ""
        seen: list[dict[str, object]] = []
        while not metrics and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            seen.append(json.loads(line))  # every line is one JSON object
            found = re.search(r"metrics on http://(\S+)/metrics", str(seen[-1]["message"]))
            metrics = found.group(1) if found else ""
        assert metrics, f"no metrics address in {seen}"
        assert all(entry["node"] == "n1" for entry in seen)
        assert any("became leader" in str(entry["message"]) for entry in seen)
        text = scrape(metrics)
        assert 'pq_node_info{node="n1"' in text
        assert "pq_consensus_leader 1.0" in text
        # The process watches its event loop (pq node's runner, not a server).
        assert 'pq_event_loop_lag_seconds_bucket{le="+Inf"}' in text
        for generation in "012":
            assert f'pq_gc_pause_seconds_count{{generation="{generation}"}}' in text
        promtool.check("metrics", stdin=text.encode())
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[NodeServer]:
    srv = NodeServer(
        SqliteStorage(tmp_path / "n1"),
        ServerConfig(listen="127.0.0.1:0", grace_s=1.0, metrics_listen="127.0.0.1:0"),
    )
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop()


async def node_samples(node: NodeServer) -> Samples:
    assert node.metrics_server is not None
    return samples(await asyncio.to_thread(scrape, node.metrics_server.address))


async def test_a_passed_deadline_is_deadline_exceeded_and_a_cancel_is_not_an_error(
    node: NodeServer, caplog: pytest.LogCaptureFixture
) -> None:
    async with Client(node.address, max_retries=0) as c:
        await c.create_queue("q")
    caplog.set_level(logging.INFO, logger="pqueue.requests")
    async with grpc.aio.insecure_channel(node.address) as channel:
        queue = pbg.QueueStub(channel)
        poll = pb.LeaseRequest(queue="q", wait_ms=5000)
        with pytest.raises(grpc.aio.AioRpcError) as late:
            await queue.Lease(poll, timeout=0.3)
        assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        call = queue.Lease(poll, timeout=30)
        await asyncio.sleep(0.3)  # parked on the node
        call.cancel()

        async def counted() -> bool:
            s = await node_samples(node)
            return ("pq_grpc_server_handled_total", _lease("CANCELLED")) in s

        deadline = time.monotonic() + 10
        while not await counted():
            assert time.monotonic() < deadline, "the cancelled poll was never counted"
            await asyncio.sleep(0.05)
    s = await node_samples(node)
    assert s[("pq_grpc_server_handled_total", _lease("DEADLINE_EXCEEDED"))] == 1
    errors = [m for m in map(ERROR_LINE.match, lines(caplog)) if m]
    assert [m["code"] for m in errors] == ["DEADLINE_EXCEEDED"]  # the cancel is not one


def _lease(code: str) -> frozenset[tuple[str, str]]:
    return frozenset({"service": "pqueue.v1.Queue", "method": "Lease", "code": code}.items())


async def test_machine_traffic_logs_at_debug_and_is_still_counted(
    node: NodeServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pqueue.requests")
    async with grpc.aio.insecure_channel(node.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        async for _ in stub.ServerReflectionInfo(iter([request])):
            pass
        await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        await pbg.AdminStub(channel).NodeStatus(pb.NodeStatusRequest())
        nope: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
            "/pqueue.v1.Queue/Nope"
        )
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await nope(b"")
        assert unknown.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert lines(caplog) == []
    s = await node_samples(node)
    reflection = {
        "service": "grpc.reflection.v1alpha.ServerReflection",
        "method": "ServerReflectionInfo",
        "code": "OK",
    }
    assert value(s, "pq_grpc_server_handled_total", **reflection) == 1
    assert not [k for k in s if dict(k[1]).get("method") == "Nope"]  # no label for a made-up name


async def test_queues_beyond_the_budget_are_summed_as_one_row(node: NodeServer) -> None:
    async with Client(node.address, max_retries=0) as c:
        for name in ("a", "b", "c", "d"):
            await c.enqueue(name, b"x")
        await c.lease("d")
    registry = CollectorRegistry()
    registry.register(NodeCollector(node.node, max_queues=2))
    s = samples(generate_latest(registry).decode())
    assert value(s, "pq_queue_jobs", queue="a", state="ready") == 1
    assert value(s, "pq_queue_jobs", queue="_other", state="ready") == 1  # c
    assert value(s, "pq_queue_jobs", queue="_other", state="leased") == 1  # d
    assert value(s, "pq_queue_jobs_enqueued_total", queue="_other") == 2
    assert {dict(k[1])["queue"] for k in s if k[0] == "pq_queue_jobs"} == {"a", "b", "_other"}
