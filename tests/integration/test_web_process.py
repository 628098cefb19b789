"""The real ``pq web`` process as ``make cluster`` starts it: the curl examples
of docs/http-api.md run as written (against this cluster's web port) and answer
what the page shows; plain urllib calls reach every kind of answer. (The
README tour's own curl lines run in tests/integration/test_readme_tour.py.)"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tests.docs import markdown
from tests.integration.test_dev_cluster import dev_cluster, stop, until_ready

ROOT = Path(__file__).resolve().parents[2]
#: Fields whose values differ from run to run (a lease's expiry time).
VOLATILE = {"lease_expires_at_ms"}


def docs_example() -> tuple[str, list[str]]:
    """docs/http-api.md's first curl block and the output block after it."""
    section = markdown.section(ROOT / "docs" / "http-api.md", "HTTP/JSON API")
    blocks = re.findall(r"```(\w*)\n(.*?)```", section, re.S)
    (i, (_, script)) = next((i, b) for i, b in enumerate(blocks) if b[0] == "sh")
    _, output = blocks[i + 1]
    return script, output.strip().splitlines()


def same(expected: Any, got: Any) -> bool:
    if isinstance(expected, dict):
        return (
            isinstance(got, dict)
            and expected.keys() == got.keys()
            and all(k in VOLATILE or same(v, got[k]) for k, v in expected.items())
        )
    if isinstance(expected, list):
        return (
            isinstance(got, list)
            and len(expected) == len(got)
            and all(same(e, g) for e, g in zip(expected, got, strict=True))
        )
    return bool(expected == got)


def http(method: str, url: str, body: Any = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        with e:
            return e.code, json.loads(e.read())


async def test_the_documented_curl_examples_run_against_the_dev_cluster(tmp_path: Path) -> None:
    script, expected = docs_example()
    assert "127.0.0.1:7780" in script
    proc = await dev_cluster(tmp_path / "c", "--base-port", "0", "--metrics-port", "0")
    try:
        lines = await until_ready(proc)
        url = lines[0].split()[1]
        assert url.startswith("http://127.0.0.1:")
        web = url.removeprefix("http://")

        ran = await asyncio.to_thread(
            subprocess.run,
            ["bash", "-euo", "pipefail", "-c", script.replace("127.0.0.1:7780", web)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert ran.returncode == 0, ran.stderr
        got = ran.stdout.strip().splitlines()
        assert len(got) == len(expected), (got, expected)
        for want, have in zip(expected, got, strict=True):
            if want.startswith(("{", "[")):
                assert same(json.loads(want), json.loads(have)), (want, have)
            else:
                assert want == have

        # Plain HTTP from Python: the description, a tenant's queue, refusals.
        status, doc = await asyncio.to_thread(http, "GET", f"{url}/openapi.json")
        assert (status, doc["openapi"]) == (200, "3.1.0")
        status, made = await asyncio.to_thread(
            http, "POST", f"{url}/v1/queues/acme%2Fmail/jobs", {"payload": "hi"}
        )
        assert status == 201
        status, job = await asyncio.to_thread(
            http, "GET", f"{url}/v1/queues/acme%2Fmail/jobs/{made['job_id']}"
        )
        assert (status, job["queue"], job["state"]) == (200, "acme/mail", "ready")
        status, err = await asyncio.to_thread(http, "GET", f"{url}/v1/queues/nope")
        assert (status, err["error"]["code"]) == (404, "NOT_FOUND")
        status, err = await asyncio.to_thread(
            http, "POST", f"{url}/v1/queues/emails/jobs/1/requeue", {"delay_ms": -1}
        )
        assert (status, err["error"]["field"]) == (400, "delay_ms")  # the node's own check
        status, err = await asyncio.to_thread(
            http, "POST", f"{url}/v1/queues/emails/jobs/2/requeue", {}
        )
        assert (status, err["error"]["code"]) == (409, "FAILED_PRECONDITION")
        assert "READY" in err["error"]["message"]
        # pq web says whether auth is on once the cluster answers its probe
        # (every second until then: the cluster may start after it).
        web_log = tmp_path / "c" / "web.log"
        for _ in range(150):
            if "auth is OFF" in web_log.read_text():
                break
            await asyncio.sleep(0.1)
        assert "auth is OFF" in web_log.read_text()
    finally:
        await stop(proc)
    assert proc.returncode == 0
