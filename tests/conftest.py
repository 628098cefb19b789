"""The whole suite's session: which PostgreSQL it tests against (``tests.pg``)."""

from __future__ import annotations

import os

import pytest

# First, before anything imports grpc: the suite's own process takes gRPC's
# I/O path as every `pq` process does (pqueue/cli/grpc_env.py), whichever
# tests are selected, and the `pq` processes it starts inherit it.
import pqueue.cli.grpc_env  # noqa: F401
from tests import pg


def pytest_configure(config: pytest.Config) -> None:
    pg.use(os.environ)


def pytest_report_header(config: pytest.Config) -> str:
    return pg.use(os.environ)
