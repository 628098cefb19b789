"""Real ``pq node`` processes for integration and fault tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path


class NodeProcess:
    """One ``pq node`` in its own process, on 127.0.0.1:0."""

    def __init__(self, data_dir: Path, node_id: str = "n1", extra: tuple[str, ...] = ()) -> None:
        self.data_dir = data_dir
        self.node_id = node_id
        #: More ``pq node`` flags (auth, quotas, TLS).
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None
        self.address = ""

    def start(self, timeout_s: float = 20.0) -> str:
        address_file = self.data_dir / "ADDRESS"
        address_file.unlink(missing_ok=True)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pqueue.cli", "node", "--data-dir", str(self.data_dir)]
        cmd += ["--listen", "127.0.0.1:0", "--node-id", self.node_id, "--grace-s", "1"]
        cmd += self.extra
        with (self.data_dir.parent / f"{self.node_id}.log").open("ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=log)
        deadline = time.monotonic() + timeout_s
        while not address_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"node {self.node_id} did not start (exit {self.proc.poll()})")
            time.sleep(0.05)
        self.address = address_file.read_text().strip()
        return self.address

    def kill9(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self, timeout_s: float = 15.0) -> int:
        """SIGTERM and wait; the exit status."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def ensure_stopped(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
