"""pq's processes take gRPC's poller I/O path (pqueue/cli/grpc_env.py), set
before grpc is imported, unless the environment already says otherwise."""

from __future__ import annotations

import os
import subprocess
import sys

from pqueue.cli.grpc_env import POLLER_PATH

PROBE = "import sys, os\nimport pqueue.cli\nprint(os.environ.get('GRPC_EXPERIMENTS', ''))\n"


def run(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-X", "importtime", "-c", PROBE],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )


def test_pq_sets_the_poller_path_before_grpc_is_imported() -> None:
    env = {k: v for k, v in os.environ.items() if k != "GRPC_EXPERIMENTS"}
    done = run(env)
    assert done.stdout.strip() == POLLER_PATH
    # -X importtime lists modules as they finish importing, on stderr.
    order = [line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines()]
    assert "grpc" in order
    assert order.index("pqueue.cli.grpc_env") < order.index("grpc")


def test_a_setting_of_the_operators_is_kept() -> None:
    done = run({**os.environ, "GRPC_EXPERIMENTS": "event_engine_client"})
    assert done.stdout.strip() == "event_engine_client"
