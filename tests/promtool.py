"""promtool (Debian's prometheus package) for the metrics and config checks.

Where it is missing these tests skip, saying so; CI installs it and sets
``PQ_TEST_REQUIRE_PROMTOOL``, and then a missing promtool is a failure.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest


def promtool() -> str:
    """promtool's path, or skip (fail under ``PQ_TEST_REQUIRE_PROMTOOL``)."""
    path = shutil.which("promtool")
    if path is None:
        why = "promtool not installed (Debian package prometheus; .ci/run installs it)"
        if os.environ.get("PQ_TEST_REQUIRE_PROMTOOL"):
            pytest.fail(why)
        pytest.skip(why)
    return path


def check(*args: str, stdin: bytes | None = None) -> None:
    """Run ``promtool check ARGS``; fail with its output unless it passes."""
    done = subprocess.run(
        [promtool(), "check", *args], input=stdin, capture_output=True, timeout=60
    )
    assert done.returncode == 0, (done.stdout + done.stderr).decode()
