"""The Grafana dashboard's panels, queries and the metric families they read."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.deploy.files import DASHBOARD

#: A metric name of ours inside PromQL (after string literals are removed).
_METRIC = re.compile(r"(?<![A-Za-z0-9_:])pq_[a-z0-9_]+")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_HISTOGRAM_SUFFIX = re.compile(r"_(bucket|sum|count)$")


def load_dashboard(path: Path = DASHBOARD) -> dict[str, Any]:
    """The dashboard model."""
    data = json.loads(path.read_text())
    assert isinstance(data, dict)
    return data


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, rows included, and the panels inside collapsed rows."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def query_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel that shows data (all but rows)."""
    return (p for p in panels(dashboard) if p.get("type") != "row")


def exprs(dashboard: dict[str, Any]) -> Iterator[str]:
    """The PromQL of every panel target."""
    for panel in query_panels(dashboard):
        for target in panel.get("targets", []):
            if target.get("expr"):
                yield str(target["expr"])


def variable_queries(dashboard: dict[str, Any]) -> Iterator[str]:
    """The queries of the template variables (``label_values(...)``: Grafana's, not PromQL)."""
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query")
        if isinstance(query, dict):
            query = query.get("query")
        if query:
            yield str(query)
        if variable.get("definition"):
            yield str(variable["definition"])


def metric_names(query: str) -> set[str]:
    """The ``pq_`` metric families ``query`` reads: histogram series named by their family."""
    code = _STRING.sub('""', query)
    return {_HISTOGRAM_SUFFIX.sub("", name) for name in _METRIC.findall(code)}


def dashboard_metric_names(path: Path = DASHBOARD) -> set[str]:
    """Every ``pq_`` metric family the dashboard's panels and variables read."""
    dashboard = load_dashboard(path)
    names: set[str] = set()
    for query in (*exprs(dashboard), *variable_queries(dashboard)):
        names |= metric_names(query)
    return names
