"""The Grafana dashboard: loads, queries our data source, shows what operators need."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import yaml

from tests.deploy.dashboard import (
    dashboard_metric_names,
    exprs,
    load_dashboard,
    metric_names,
    query_panels,
)
from tests.deploy.files import DATASOURCES, load_yaml
from tests.promtool import promtool

#: What the issue asks the dashboard to show, by the metric each panel reads.
REQUIRED_METRICS = frozenset(
    {
        "pq_queue_jobs",  # ready / delayed / leased / dead / completed / cancelled
        "pq_queue_jobs_enqueued_total",  # rates
        "pq_queue_jobs_leased_total",
        "pq_queue_jobs_acked_total",
        "pq_queue_jobs_nacked_total",
        "pq_queue_jobs_expired_total",
        "pq_queue_jobs_dead_lettered_total",
        "pq_queue_jobs_completed_total",  # issue 16: the life of a job after delivery
        "pq_queue_jobs_cancelled_total",
        "pq_queue_jobs_ttl_expired_total",
        "pq_queue_paused",
        "pq_grpc_server_handling_seconds",  # p50 / p99 latency
        "pq_grpc_server_handled_total",  # errors by code
        "pq_queue_oldest_ready_age_seconds",
        "pq_consensus_leader",  # leader and elections
        "pq_consensus_elections_total",
        "pq_consensus_replication_lag_entries",
        "pq_balancer_backend_weight",
    }
)

#: Grafana's own variables, as a value Prometheus accepts in their place.
_GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$__range": "1h",
}


def provisioned_datasource() -> dict[str, Any]:
    sources = load_yaml(DATASOURCES)["datasources"]
    assert len(sources) == 1, "one provisioned data source, the dashboard's"
    source: dict[str, Any] = sources[0]
    return source


def test_metric_names_normalise_histograms_and_ignore_strings() -> None:
    query = (
        "histogram_quantile(0.99, sum by (le) (rate(pq_storage_fsync_seconds_bucket[1m]))) / "
        'sum(rate(pq_x_seconds_sum[1m])) + pq_x_seconds_count{job="pq_not_a_metric"} '
        "+ xpq_foo + pq_jobs_total"
    )
    assert metric_names(query) == {"pq_storage_fsync_seconds", "pq_x_seconds", "pq_jobs_total"}


def test_dashboard_loads_with_a_uid_and_unique_panel_ids() -> None:
    dashboard = load_dashboard()
    assert dashboard["uid"] == "pqueue"
    assert dashboard["title"]
    assert dashboard["schemaVersion"] >= 36
    assert dashboard.get("id") is None, "a provisioned dashboard carries no database id"
    ids = [p["id"] for p in query_panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"


def test_every_panel_has_a_query() -> None:
    dashboard = load_dashboard()
    shown = list(query_panels(dashboard))
    assert len(shown) >= 20
    for panel in shown:
        targets = panel.get("targets", [])
        assert targets, f"panel {panel['title']!r} has no target"
        for target in targets:
            assert str(target.get("expr", "")).strip(), f"{panel['title']!r}: an empty query"
        ref_ids = [t["refId"] for t in targets]
        assert len(ref_ids) == len(set(ref_ids)), f"{panel['title']!r}: refIds repeat"


def test_panels_fit_the_grid_without_overlapping() -> None:
    dashboard = load_dashboard()
    cells: dict[tuple[int, int], str] = {}
    for panel in dashboard["panels"]:
        pos = panel["gridPos"]
        assert pos["w"] > 0, panel["title"]
        assert 0 <= pos["x"] <= pos["x"] + pos["w"] <= 24, f"{panel['title']!r}: off the grid"
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                other = cells.setdefault((x, y), panel["title"])
                assert other == panel["title"], f"{panel['title']!r} overlaps {other!r}"


def test_queries_use_the_provisioned_data_source() -> None:
    source = provisioned_datasource()
    assert source["type"] == "prometheus"
    expected = {"type": "prometheus", "uid": source["uid"]}
    dashboard = load_dashboard()
    for panel in query_panels(dashboard):
        assert panel["datasource"] == expected, panel["title"]
        for target in panel["targets"]:
            assert target.get("datasource", expected) == expected, panel["title"]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            assert variable["datasource"] == expected, variable["name"]


# That every name read is exported by a running node or balancer is checked
# against a live scrape: tests/integration/test_observability.py.


def test_dashboard_shows_what_operators_need() -> None:
    missing = REQUIRED_METRICS - dashboard_metric_names()
    assert not missing, f"no panel reads {sorted(missing)}"


def test_queries_are_valid_promql(tmp_path: Path) -> None:
    """``promtool check rules`` parses each query, as a recording rule, once Grafana's
    variables are substituted."""
    dashboard = load_dashboard()
    substitutions = dict(_GRAFANA_VARIABLES)
    for variable in dashboard["templating"]["list"]:
        substitutions[f"${variable['name']}"] = variable.get("allValue") or ".*"
    pattern = re.compile("|".join(re.escape(v) for v in sorted(substitutions, key=len)[::-1]))
    rules = [
        {
            "record": f"dashboard:query_{i}",
            "expr": pattern.sub(lambda m: substitutions[m.group(0)], expr),
        }
        for i, expr in enumerate(exprs(dashboard))
    ]
    assert not any("$" in r["expr"] for r in rules), "a Grafana variable is left unsubstituted"
    path = tmp_path / "dashboard.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    done = subprocess.run(
        [promtool(), "check", "rules", str(path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(rules)} rules found" in done.stdout, done.stdout
