"""``pq cluster status`` on a secured cluster: it carries --token and TLS to every node."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from pqueue.node.auth import Verifier, issue
from tests.certs import Authority
from tests.inproc import Cluster, node_tokens

SECRET = b"s" * 32
PQ = (sys.executable, "-m", "pqueue.cli")


async def test_cluster_status_honours_token_and_mutual_tls(tmp_path: Path) -> None:
    ca = Authority.new()
    tls = {i: ca.tls(f"n{i}") for i in (1, 2, 3)}
    cluster = Cluster(
        tmp_path,
        tls=lambda i: tls[i],
        verifier=Verifier(SECRET),
        peer_token=node_tokens(SECRET),
    )
    await cluster.start()
    try:
        leader = await cluster.leader()
        cert, key = ca.issue("operator")
        files = {"ca": ca.pem, "cert": cert, "key": key}
        for name, data in files.items():
            (tmp_path / name).write_bytes(data)
        tls_flags = ["--tls-ca", str(tmp_path / "ca")]
        tls_flags += ["--tls-cert", str(tmp_path / "cert"), "--tls-key", str(tmp_path / "key")]
        operator = issue(SECRET, "ops", ["admin"], 600)

        async def status(*flags: str) -> tuple[int, bytes, bytes]:
            proc = await asyncio.create_subprocess_exec(
                *PQ, "--endpoint", cluster.addresses[leader], "-o", "json", *flags,
                "--timeout-s", "5", "cluster", "status",
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            out, err = await proc.communicate()
            assert proc.returncode is not None
            return proc.returncode, out, err

        code, out, err = await status("--token", operator, *tls_flags)
        assert code == 0, err
        rows = json.loads(out)
        assert [r["node"] for r in rows] == ["n1", "n2", "n3"]
        assert sorted(r["role"] for r in rows) == ["follower", "follower", "leader"]
        assert {r["leader"] for r in rows} == {f"n{leader}"}
        assert {r["cluster"] for r in rows} == {"pqueue"}  # the default, recorded by each node
        # Without the token the nodes refuse it, and it says so (not a table of "down").
        code, _, err = await status(*tls_flags)
        assert code == 1
        assert b"UNAUTHENTICATED" in err
    finally:
        await cluster.stop()
