"""``pq`` as a user runs it: real processes, JSON output, one-line errors."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
import urllib.request
from pathlib import Path
from typing import Any

from pqueue.node.quotas import Quotas
from pqueue.node.server import NodeServer
from tests.inproc import one_node

PQ = (sys.executable, "-m", "pqueue.cli")


async def pq(address: str, *args: str, stdin: bytes = b"") -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *PQ,
        "--endpoint",
        address,
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate(stdin)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def pq_json(address: str, *args: str) -> Any:
    code, out, err = await pq(address, "-o", "json", *args)
    assert code == 0, err
    return json.loads(out)


async def test_cli_tour(server: NodeServer) -> None:
    a = server.address
    assert (await pq_json(a, "enqueue", "emails", "hello", "--priority", "5"))["job_id"] == 1
    await pq_json(a, "enqueue", "emails", "urgent", "--priority", "0", "--idempotency-key", "k1")
    assert (await pq_json(a, "enqueue", "emails", "urgent", "--idempotency-key", "k1"))["duplicate"]
    jobs = await pq_json(a, "lease", "emails", "--max", "2")
    assert [(j["payload"], j["priority"], j["attempt"]) for j in jobs] == [
        ("urgent", 0, 1),
        ("hello", 5, 1),
    ]
    assert set(jobs[0]) >= {"job_id", "lease_id", "priority", "payload", "attempt"}
    first, second = jobs
    await pq_json(a, "ack", "emails", str(first["job_id"]), str(first["lease_id"]))
    nack = await pq_json(
        a,
        "nack",
        "emails",
        str(second["job_id"]),
        str(second["lease_id"]),
        "--reason",
        "nope",
        "--delay-ms",
        "0",
    )
    assert nack["state"] == "ready"
    job = await pq_json(a, "job", "emails", str(second["job_id"]))
    assert (job["state"], job["errors"][0]["reason"]) == ("ready", "nope")
    [stats] = await pq_json(a, "stats", "emails")
    assert (stats["ready"], stats["acked_total"]) == (1, 1)
    [queue] = await pq_json(a, "queues")
    assert queue["queue"] == "emails"

    code, out, _ = await pq(a, "stats")
    assert code == 0
    assert out.splitlines()[0].split()[:3] == ["QUEUE", "READY", "DELAYED"]


async def test_binary_payload_is_base64_in_json(server: NodeServer) -> None:
    code, _, err = await pq(server.address, "enqueue", "bin", "-", stdin=b"\xff\xfe\x00")
    assert code == 0, err
    [job] = await pq_json(server.address, "lease", "bin")
    assert (job["payload"], job["payload_encoding"]) == ("//4A", "base64")


async def test_dead_letter_commands(server: NodeServer) -> None:
    a = server.address
    await pq_json(a, "queue", "create", "q", "--max-attempts", "1")
    await pq_json(a, "enqueue", "q", "x")
    [job] = await pq_json(a, "lease", "q")
    await pq_json(a, "nack", "q", str(job["job_id"]), str(job["lease_id"]), "--reason", "bad")
    [dead] = await pq_json(a, "dead", "list", "q")
    assert dead["errors"][0]["reason"] == "bad"
    assert (await pq_json(a, "dead", "redrive", "q"))["redriven"] == 1
    [job] = await pq_json(a, "lease", "q")
    await pq_json(a, "nack", "q", str(job["job_id"]), str(job["lease_id"]))
    assert (await pq_json(a, "dead", "delete", "q", str(job["job_id"])))["deleted"] == 1
    assert (await pq_json(a, "queue", "purge", "q"))["purged"] == 0
    assert (await pq_json(a, "queue", "delete", "q"))["deleted_jobs"] == 0


ISO_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


async def test_jobs_list_pages_and_times(server: NodeServer) -> None:
    a = server.address
    await pq_json(a, "queue", "create", "q", "--max-attempts", "1")
    made = [(await pq_json(a, "enqueue", "q", f"p{k}", "--priority", str(k % 2)))["job_id"]
            for k in range(5)]  # fmt: skip
    order = made[0::2] + made[1::2]  # priority 0 first
    page = await pq_json(a, "jobs", "list", "q", "--state", "ready", "--limit", "2")
    assert [j["job_id"] for j in page["jobs"]] == order[:2]
    assert isinstance(page["jobs"][0]["ready_at_ms"], int)  # JSON keeps epoch ms
    rest = await pq_json(
        a, "jobs", "list", "q", "--state", "READY", "--page-token", page["next_page_token"]
    )
    assert [j["job_id"] for j in rest["jobs"]] == order[2:]
    assert rest["next_page_token"] == ""
    every = await pq_json(a, "jobs", "list", "q", "--state", "ready", "--limit", "1", "--all")
    assert [j["job_id"] for j in every["jobs"]] == order
    urgent = await pq_json(a, "jobs", "list", "q", "--state", "ready", "--max-priority", "0")
    assert [j["job_id"] for j in urgent["jobs"]] == made[0::2]

    # A table: times as ISO-8601 UTC, the next page's token on stderr.
    code, out, err = await pq(a, "jobs", "list", "q", "--state", "ready", "--limit", "2")
    assert code == 0, err
    header, *rows = out.splitlines()
    assert header.split()[:3] == ["JOB_ID", "PRIORITY", "READY_AT"]
    assert [int(r.split()[0]) for r in rows] == order[:2]
    assert ISO_MS.match(rows[0].split()[2])
    assert err.strip() == f"more: --page-token {page['next_page_token']}"

    # A dead job: `pq job` shows when it died and why, as ISO in the table.
    [job] = await pq_json(a, "lease", "q")
    await pq_json(a, "nack", "q", str(job["job_id"]), str(job["lease_id"]), "--reason", "no")
    shown = await pq_json(a, "job", "q", str(job["job_id"]))
    assert (shown["state"], shown["reason"]) == ("dead", "attempts exhausted")
    assert shown["finished_at_ms"] >= shown["enqueued_at_ms"] > 0
    code, out, err = await pq(a, "job", "q", str(job["job_id"]))
    assert code == 0, err
    header, row = out.splitlines()
    assert "FINISHED_AT" in header.split()
    assert "RESULT" not in header.split()  # unset fields stay out of the table
    assert "attempts exhausted" in row
    times = [cell for cell in row.split() if ISO_MS.match(cell)]
    assert len(times) == 3  # enqueued, ready, finished
    dead = await pq_json(a, "jobs", "list", "q", "--state", "dead")
    assert [j["job_id"] for j in dead["jobs"]] == [job["job_id"]]

    code, _, err = await pq(a, "jobs", "list", "q", "--state", "sleeping")
    assert code == 2
    assert "--state: 'sleeping': one of ready, delayed, leased, dead" in err
    code, _, err = await pq(a, "jobs", "list", "q", "--state", "ready", "--page-token", "zz")
    assert (code, err.strip()) == (
        1,
        "error: INVALID_ARGUMENT: --page-token: not a token this server gave",
    )


async def test_errors_are_one_line_and_non_zero(server: NodeServer) -> None:
    code, out, err = await pq(server.address, "ack", "emails", "1", "2")
    assert (code, out) == (1, "")
    assert err.strip() == "error: NOT_FOUND: queue 'emails' not found"
    code, _, err = await pq(server.address, "enqueue", "", "x")
    assert (code, err.strip()) == (1, "error: INVALID_ARGUMENT: QUEUE: must not be empty")
    code, _, err = await pq("127.0.0.1:1", "--timeout-s", "2", "stats")
    assert code == 1
    assert err.startswith("error: UNAVAILABLE: ")
    assert err.count("\n") == 1


async def test_endpoint_from_environment(server: NodeServer) -> None:
    proc = await asyncio.create_subprocess_exec(
        *PQ,
        "-o",
        "json",
        "stats",
        env={**os.environ, "PQ_ENDPOINT": server.address},
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await proc.communicate()
    assert (proc.returncode, json.loads(out)) == (0, [])


def _log_tails(root: Path) -> dict[str, str]:
    return {p.name: p.read_text()[-600:] for p in root.glob("n*.log")}


async def test_dev_cluster_starts_serves_and_stops(tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        *PQ,
        "dev-cluster",
        "--dir",
        str(tmp_path),
        "--base-port",
        "0",
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        lines: list[str] = []
        while not lines or not lines[-1].startswith("*** AUTH IS OFF"):
            line = await asyncio.wait_for(proc.stdout.readline(), 60)
            if not line:
                logs = await asyncio.to_thread(_log_tails, tmp_path)
                raise AssertionError(f"dev-cluster exited: {lines}; node logs: {logs}")
            lines.append(line.decode().strip())
        assert lines[0].startswith("web: http://127.0.0.1:")  # the web API's URL first
        assert lines[1].startswith("balancer: 127.0.0.1:")  # then the balancer's address
        assert lines[3].split()[:4] == ["NAME", "ADDRESS", "METRICS", "DATA_DIR"]
        # Every node's and the balancer's /metrics, as printed, answers.
        urls = {row.split()[0]: row.split()[2] for row in lines[4:8]}
        assert set(urls) == {"n1", "n2", "n3", "balancer"}
        for name, url in urls.items():
            text = await asyncio.to_thread(_get, url)
            assert "pq_process_cpu_seconds_total" in text
            if name != "balancer":
                assert f'pq_node_info{{node="{name}"' in text
        assert lines[8].split()[:2] == ["web", lines[0].split()[1].removeprefix("http://")]
        assert '"openapi"' in await asyncio.to_thread(_get, lines[0].split()[1] + "/openapi.json")
        balancer = lines[1].split()[1]
        [ready] = [line for line in lines if line.startswith("ready:")]
        address = ready.split("PQ_ENDPOINT=")[1].split()[0]
        assert address == balancer  # clients go through the balancer
        assert (await pq_json(address, "enqueue", "q", "x"))["job_id"] == 1
        status = await pq_json(address, "balancer", "status")
        assert len(status["backends"]) == 3
        assert sum(b["state"] == "leader" for b in status["backends"]) == 1
        proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as r:
        return str(r.read().decode())


async def test_global_flags_go_before_or_after_the_command(server: NodeServer) -> None:
    a = server.address
    await pq_json(a, "enqueue", "q", "x")
    code, out, err = await pq(a, "stats", "q", "-o", "json")
    assert code == 0, err
    assert json.loads(out)[0]["ready"] == 1
    code, out, err = await pq(a, "queue", "show", "q", "--output", "json", "--timeout-s", "5")
    assert code == 0, err
    assert json.loads(out)["queue"] == "q"
    # After the command, --endpoint wins over the one given before it.
    code, out, err = await pq("127.0.0.1:1", "stats", "--endpoint", a, "-o", "json")
    assert (code, json.loads(out)[0]["queue"]) == (0, "q"), err
    # Given before only: not overwritten by the command's parser.
    code, out, err = await pq(a, "-o", "json", "stats", "q")
    assert code == 0, err
    assert json.loads(out)[0]["queue"] == "q"


async def _interrupted(address: str, *args: str) -> tuple[int | None, str]:
    """``pq ARGS`` interrupted with SIGINT once it is under way (its stdin
    open: a command reading it waits)."""
    proc = await asyncio.create_subprocess_exec(
        *PQ, "--endpoint", address, *args, stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        await asyncio.sleep(1.5)  # imported, connected and waiting
        assert proc.returncode is None
        proc.send_signal(signal.SIGINT)
        _, err = await asyncio.wait_for(proc.communicate(), 20)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return proc.returncode, err.decode()


async def test_ctrl_c_is_one_line_and_exit_130(server: NodeServer) -> None:
    await pq_json(server.address, "queue", "create", "q")
    for args in (
        ("lease", "q", "--wait-ms", "60000"),
        ("watch", "q"),
        ("enqueue", "q", "-"),  # waiting for stdin
        ("enqueue", "q", "--file", "-"),
    ):
        code, err = await _interrupted(server.address, *args)
        assert code == 130, (args, err)
        assert "Traceback" not in err
        assert err.strip() == "interrupted", (args, err)


async def test_client_side_checks_fail_in_the_documented_form(server: NodeServer) -> None:
    a = server.address
    code, out, err = await pq(a, "job", "q", "-1")
    assert (code, out) == (2, "")
    assert err.strip() == "error: INVALID_ARGUMENT: JOB_ID: must be 1 or more, not -1"
    code, _, err = await pq(a, "enqueue", "q", "x", "--priority", str(1 << 31))
    assert code == 2
    assert err.splitlines()[-1].startswith("error: INVALID_ARGUMENT: argument --priority: ")
    code, _, err = await pq(a, "ack", "q", "1", "0")
    assert code == 2
    assert err.strip() == "error: INVALID_ARGUMENT: LEASE_ID: must be 1 or more, not 0"
    code, _, err = await pq(a, "enqueue", "q", "x", "--no-such-flag")
    assert code == 2
    assert err.splitlines()[-1] == "error: INVALID_ARGUMENT: unrecognized arguments: --no-such-flag"


async def test_a_refused_connection_says_where_and_what_to_check() -> None:
    code, out, err = await pq("127.0.0.1:1", "--timeout-s", "3", "stats")
    assert (code, out) == (1, "")
    assert err.strip() == (
        "error: UNAVAILABLE: no cluster at 127.0.0.1:1 (connection refused) — "
        "is --endpoint (PQ_ENDPOINT) right?"
    )


async def test_version() -> None:
    proc = await asyncio.create_subprocess_exec(*PQ, "--version", stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    assert proc.returncode == 0
    assert re.fullmatch(r"pq \d+\.\d+\.\d+\S*\n", out.decode())


async def test_server_errors_name_the_flags_typed(server: NodeServer) -> None:
    a = server.address
    await pq_json(a, "queue", "create", "q", "--max-priority", "9")
    code, _, err = await pq(a, "enqueue", "q", "x", "--priority", "10")
    assert code == 1
    assert err.startswith("error: INVALID_ARGUMENT: --priority: "), err
    # Refused by the node (the command line is fine): the fields in the
    # reason are flags too.
    code, _, err = await pq(a, "queue", "create", "r", "--lease-ms", str(13 * 3600 * 1000))
    assert (code, err.strip()) == (
        1,
        "error: INVALID_ARGUMENT: --lease-ms: must not exceed --max-lease-total-ms",
    )
    code, _, err = await pq(a, "queue", "create", "r", "--min-priority", "5", "--max-priority", "1")
    assert (code, err.strip()) == (
        1,
        "error: INVALID_ARGUMENT: --min-priority: must not exceed --max-priority",
    )


async def test_enqueue_from_json_lines_in_batches(server: NodeServer, tmp_path: Path) -> None:
    a = server.address
    lines = [json.dumps({"n": k}) for k in range(7)]
    lines.insert(3, "")  # blank lines are skipped
    lines.append(json.dumps({"payload": "urgent", "priority": -5, "group": "g"}))
    path = tmp_path / "jobs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    code, out, err = await pq(
        a, "-o", "json", "enqueue", "q", "--file", str(path), "--batch-size", "3", "--priority", "2"
    )
    assert code == 0, err
    done = json.loads(out)
    assert (done["enqueued"], done["duplicates"], len(done["job_ids"])) == (8, 0, 8)
    # Not a terminal: a plain count per batch.
    assert err.splitlines() == ["enqueued 3/8", "enqueued 6/8", "enqueued 8/8"]
    jobs = await pq_json(a, "lease", "q", "--max", "10")
    assert (jobs[0]["payload"], jobs[0]["priority"], jobs[0]["group"]) == ("urgent", -5, "g")
    assert [j["payload"] for j in jobs[1:]] == lines[:3] + lines[4:8]
    assert {j["priority"] for j in jobs[1:]} == {2}  # the flag is each line's default

    # stdin, and a bad line: its number, exit 2, nothing sent.
    bad = b'{"n": 1}\n{"payload": "x", "priority": "high"}\n'
    code, out, err = await pq(a, "enqueue", "r", "--file", "-", stdin=bad)
    assert (code, out) == (2, "")
    assert err.strip() == (
        'error: INVALID_ARGUMENT: stdin line 2: priority: expected an integer, got "high"'
    )
    code, _, err = await pq(a, "enqueue", "r", "--file", "-", stdin=b'{"n": 1}\n{nope\n')
    assert code == 2
    assert err.startswith("error: INVALID_ARGUMENT: stdin line 2: not JSON: ")
    code, _, err = await pq(a, "stats", "r")
    assert (code, err.strip()) == (1, "error: NOT_FOUND: queue 'r' not found")  # nothing sent

    # A line the server refuses: its line, and what went before it.
    await pq_json(a, "queue", "create", "bounded", "--max-priority", "9")
    text = b'"a"\n"b"\n{"payload": "c", "priority": 10}\n'
    code, _, err = await pq(a, "enqueue", "bounded", "--file", "-", "--batch-size", "2", stdin=text)
    assert code == 1
    assert err.splitlines()[-1].startswith("error: INVALID_ARGUMENT: stdin line 3: priority: "), err
    assert "(enqueued: the 2 jobs before line 3; none from it on)" in err


async def test_enqueue_file_refused_midway_says_how_many_went_in(tmp_path: Path) -> None:
    """Any refusal of a later batch, not only INVALID_ARGUMENT, says how many
    jobs went in before it: the file is not all-or-nothing once sending."""
    quotas = Quotas.parse("[defaults]\nmax_queue_depth = 4\n")
    async with one_node(tmp_path, quotas=quotas) as srv:
        text = b"".join(b'"%d"\n' % k for k in range(5))
        code, _, err = await pq(
            srv.address, "enqueue", "q", "--file", "-", "--batch-size", "3", stdin=text
        )
        assert code == 1
        last = err.splitlines()[-1]
        assert last.startswith("error: RESOURCE_EXHAUSTED: queue 'q' holds 3 jobs"), err
        assert last.endswith("(enqueued: the 3 jobs before line 4; none from it on)"), err
        assert (await pq_json(srv.address, "stats", "q"))[0]["ready"] == 3


async def test_new_flags_reach_the_api(server: NodeServer) -> None:
    a = server.address
    created = await pq_json(
        a, "queue", "create", "q", "--backoff-base-ms", "2000", "--backoff-max-ms", "9000",
        "--max-lease-total-ms", "60000", "--delete-when-idle", "--max-attempts", "1",
    )  # fmt: skip
    assert created["created"]
    config = (await pq_json(a, "queue", "show", "q"))["config"]
    assert (config["backoff_base_ms"], config["backoff_max_ms"]) == (2000, 9000)
    assert (config["max_lease_total_ms"], config["delete_when_idle"]) == (60000, True)

    # --release: not an attempt, so max_attempts 1 does not make the job dead.
    await pq_json(a, "enqueue", "q", "x")
    [job] = await pq_json(a, "lease", "q")
    nack = await pq_json(a, "nack", "q", str(job["job_id"]), str(job["lease_id"]), "--release")
    assert (nack["state"], nack["attempts"]) == ("ready", 0)

    # Multi-ack: JOB_ID:LEASE_ID pairs, all or none.
    for k in range(2):
        await pq_json(a, "enqueue", "q", f"m{k}")
    jobs = await pq_json(a, "lease", "q", "--max", "3")
    pairs = [f"{j['job_id']}:{j['lease_id']}" for j in jobs]
    acked = await pq_json(a, "ack", "q", *pairs)
    assert [r["job_id"] for r in acked] == [j["job_id"] for j in jobs]
    code, _, err = await pq(a, "ack", "q", pairs[0], "7")
    assert code == 2
    assert err.strip() == "error: INVALID_ARGUMENT: JOB_ID:LEASE_ID: '7': expected JOB_ID:LEASE_ID"

    # --not-before: an ISO time, delayed until then.
    when = "2100-01-01T00:00:00Z"
    job_id = (await pq_json(a, "enqueue", "later", "x", "--not-before", when))["job_id"]
    shown = await pq_json(a, "job", "later", str(job_id))
    assert (shown["state"], shown["ready_at_ms"]) == ("delayed", 4102444800000)


async def test_create_again_with_another_config_names_the_flags(server: NodeServer) -> None:
    a = server.address
    await pq_json(a, "queue", "create", "q", "--max-attempts", "3")
    again = await pq_json(a, "queue", "create", "q", "--max-attempts", "3")
    assert again["created"] is False  # the same config: no change
    code, _, err = await pq(a, "queue", "create", "q", "--max-attempts", "4", "--lease-ms", "9000")
    assert code == 1
    assert err.strip() == (
        "error: ALREADY_EXISTS: queue 'q' exists with a different config: "
        "--max-attempts is 3, asked 4; --lease-ms is 30000, asked 9000"
    )
