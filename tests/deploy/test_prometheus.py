"""deploy/prometheus.yml passes Prometheus' own check."""

from __future__ import annotations

from tests import promtool
from tests.deploy.files import PROMETHEUS


def test_promtool_check_config() -> None:
    promtool.check("config", str(PROMETHEUS))
