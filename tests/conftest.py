"""The whole suite's session: which PostgreSQL it tests against (``tests.pg``)."""

from __future__ import annotations

import os

import pytest

from tests import pg


def pytest_configure(config: pytest.Config) -> None:
    pg.use(os.environ)


def pytest_report_header(config: pytest.Config) -> str:
    return pg.use(os.environ)
