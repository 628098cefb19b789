"""The README's tour, and its sequel in docs/semantics.md, run verbatim
against a real dev cluster.

The cluster is the one ``make cluster`` starts (``pq dev-cluster --dir
.cluster``: three ``pq node`` processes, a balancer and ``pq web``) on free
ports, in a scratch directory. Each line of every block marked ``<!-- tour
-->`` runs as written in bash, one at a time, with ``pq`` on the PATH (this
checkout's CLI) and ``PQ_ENDPOINT`` naming this cluster's balancer, as the
``ready:`` line tells users to set it; the only edit is the web address
``127.0.0.1:7780`` becoming this cluster's. Every line must exit 0 (one
whose comment says ``error: CODE`` must fail with that code); an output
block right after a tour block must be what the block's last lines print
(JSON compared field by field, a lease's expiry time aside); and a few lines
must print what their comments promise.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from tests.docs import markdown
from tests.integration.test_dev_cluster import dev_cluster, stop, until_ready
from tests.integration.test_web_process import same

TOUR_MARKER = "tour"
DEFAULT_WEB = "127.0.0.1:7780"
DEFAULT_BALANCER = "127.0.0.1:7700"

#: What a tour line's output must hold beyond exiting 0 (line -> check).
KEY_OUTPUTS = {
    "pq job emails 2": lambda out: "completed" in out and "password reset" in out,
    "pq stats": lambda out: "emails" in out,
    "pq stats emails -o json": lambda out: [s["queue"] for s in json.loads(out)] == ["emails"],
}


#: The pages whose tour blocks run, in this order, on one cluster.
TOUR_PAGES = (markdown.README, markdown.DOCS / "semantics.md")


def tour() -> list[tuple[markdown.Block, markdown.Block | None]]:
    """Each tour block with the output block right after it, if any."""
    out: list[tuple[markdown.Block, markdown.Block | None]] = []
    for page in TOUR_PAGES:
        out += page_tour(page)
    return out


def page_tour(page: Path) -> list[tuple[markdown.Block, markdown.Block | None]]:
    blocks = markdown.blocks(page)
    out: list[tuple[markdown.Block, markdown.Block | None]] = []
    for i, block in enumerate(blocks):
        if block.marker != TOUR_MARKER:
            continue
        assert block.language == "sh", f"{block.where()}: a tour block is a sh block"
        after = blocks[i + 1] if i + 1 < len(blocks) else None
        output = after if after is not None and after.language == "" and not after.marker else None
        out.append((block, output))
    return out


def command(line: str) -> str:
    """The key of ``line`` in KEY_OUTPUTS: the command without its comment."""
    return line.split("  #", 1)[0].split(" #", 1)[0].strip()


def run(line: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-euo", "pipefail", "-c", line],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def same_lines(expected: list[str], got: list[str]) -> bool:
    if len(expected) != len(got):
        return False
    for want, have in zip(expected, got, strict=True):
        if want.startswith(("{", "[")):
            if not same(json.loads(want), json.loads(have)):
                return False
        elif want.rstrip() != have.rstrip():
            return False
    return True


def test_the_tour_is_marked_and_starts_as_users_start() -> None:
    """The README has tour blocks, with pq and curl lines, after `make cluster`."""
    blocks = page_tour(markdown.README)
    lines = [c.text for b, _ in tour() for c in markdown.shell_lines(b)]
    assert len(blocks) >= 2
    assert len(page_tour(TOUR_PAGES[1])) >= 2
    assert any(x.startswith("pq lease ") for x in lines)
    assert any(x.startswith("curl ") for x in lines)
    assert set(KEY_OUTPUTS) <= {command(x) for x in lines}, "KEY_OUTPUTS names lines not in it"
    text = markdown.README.read_text()
    assert text.index("make cluster") < text.index(f"<!-- {TOUR_MARKER} -->")
    assert "make cluster" in markdown.section(markdown.README, "Five-minute tour")


async def test_the_readme_tour_runs_verbatim_against_a_dev_cluster(tmp_path: Path) -> None:
    work = tmp_path / "work"
    bin_dir = tmp_path / "bin"
    work.mkdir()
    bin_dir.mkdir()
    pq = bin_dir / "pq"  # this checkout's CLI, as `source .venv/bin/activate` gives it
    pq.write_text(f'#!/bin/sh\nexec {sys.executable} -m pqueue.cli "$@"\n')
    pq.chmod(0o755)
    root = str(markdown.ROOT)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
    }
    env.pop("PQ_TOKEN", None)

    proc = await dev_cluster(work / ".cluster", "--base-port", "0", "--metrics-port", "0")
    try:
        printed = await until_ready(proc)
        # What `make cluster` prints, line for line in shape (the ports differ).
        shown = markdown.blocks(markdown.README)
        i = next(n for n, b in enumerate(shown) if b.text.strip() == "make cluster")
        expected = [x.split()[0] for x in shown[i + 1].text.splitlines() if x.strip()]
        assert [x.split()[0] for x in printed if x.strip()] == expected, printed
        web = printed[0].split()[1].removeprefix("http://")
        balancer = next(x for x in printed if x.startswith("balancer: ")).split()[1]
        ready = printed[-1]
        assert ready.startswith(f"ready: export PQ_ENDPOINT={balancer}")
        env["PQ_ENDPOINT"] = balancer

        checked: set[str] = set()
        for block, output in tour():
            outs: list[str] = []
            for cmd in markdown.shell_lines(block):
                line = cmd.text.replace(DEFAULT_WEB, web)
                assert DEFAULT_BALANCER not in line, f"{cmd.where()}: rely on PQ_ENDPOINT"
                ran = await asyncio.to_thread(run, line, work, env)
                if failing := re.search(r"#.*\berror: ([A-Z_]+)", cmd.text):
                    assert ran.returncode == 1, f"{cmd.where()}: {cmd.text}: exit 0"
                    assert f"error: {failing.group(1)}" in ran.stderr, f"{cmd.where()}: {ran}"
                    continue
                assert ran.returncode == 0, f"{cmd.where()}: {cmd.text}\n{ran.stderr}"
                key = command(cmd.text)
                if key in KEY_OUTPUTS:
                    assert KEY_OUTPUTS[key](ran.stdout), f"{cmd.where()}: {ran.stdout}"
                    checked.add(key)
                outs += ran.stdout.strip("\n").splitlines()
            if output is not None:
                want = output.text.strip("\n").splitlines()
                got = outs[-len(want) :]
                assert same_lines(want, got), f"{output.where()}: shows\n{want}\nran\n{got}"
        assert checked == set(KEY_OUTPUTS)
    finally:
        await stop(proc)
    assert proc.returncode == 0
