"""``make bench``'s table, its ratios, and issue 15's "done when" targets."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench.host import describe as describe_host

LABEL_W = 26
CELL_W = 12
BALANCER, DIRECT, PG, NATS = "pq-balancer", "pq-direct", "postgres", "nats"
#: pqueue via the balancer with the SDK's look-aside off: the proxy's own figure.
PROXY = "pq-proxy"


def cell(result: dict[str, Any], scenario: str, system: str) -> dict[str, Any] | None:
    """The figures of one cell, or None if it did not run or failed."""
    for s in result["scenarios"]:
        if s["key"] == scenario:
            c: dict[str, Any] | None = s["cells"].get(system)
            return c if c and not c.get("error") else None
    return None


def _get(result: dict[str, Any], scenario: str, system: str, *path: str) -> float | None:
    value: Any = cell(result, scenario, system)
    for key in path:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return float(value) if isinstance(value, int | float) else None


def _over(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def ratios(result: dict[str, Any]) -> dict[str, float | None]:
    """Same-run ratios: throughput ours over theirs, p99 ours over theirs."""

    def rate(scenario: str, system: str) -> float | None:
        return _get(result, scenario, system, "jobs_per_s")

    out: dict[str, float | None] = {
        "single_balancer_over_postgres": _over(rate("single", BALANCER), rate("single", PG)),
        "single_balancer_over_nats": _over(rate("single", BALANCER), rate("single", NATS)),
        "single_direct_over_postgres": _over(rate("single", DIRECT), rate("single", PG)),
        "single_balancer_over_direct": _over(rate("single", BALANCER), rate("single", DIRECT)),
        "single_proxy_over_direct": _over(rate("single", PROXY), rate("single", DIRECT)),
        "batch_balancer_over_postgres": _over(rate("batch", BALANCER), rate("batch", PG)),
        "batch_direct_over_postgres": _over(rate("batch", DIRECT), rate("batch", PG)),
        "clients_balancer_over_postgres": _over(rate("clients", BALANCER), rate("clients", PG)),
    }
    for s in result["scenarios"]:
        if s["rate"]:
            out[_p99_key(s["rate"])] = _over(
                _get(result, s["key"], BALANCER, "latency_ms", "p99"),
                _get(result, s["key"], PG, "latency_ms", "p99"),
            )
    return out


def _p99_key(rate: float) -> str:
    return f"p99_at_{rate:g}_balancer_over_postgres"


def _x(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}x"


def _verdict(ok: bool | None) -> str:
    return "not measured" if ok is None else ("ok" if ok else "MISSED")


def targets(
    result: dict[str, Any],
    before: Sequence[dict[str, Any]] = (),
    before_tree: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Issue 15's "done when", each with its figure and ok / MISSED / not measured;
    ``before``: earlier runs, whose lowest CPU per job is today's figure;
    ``before_tree``: the tree before issue 15 measured in this run
    (``bench.before_tree``), which, when it has figures, is the one compared
    with (a figure from another machine or day is not)."""
    r = result["ratios"]
    out: list[dict[str, Any]] = []

    def add(what: str, value: str, ok: bool | None) -> None:
        out.append({"what": what, "value": value, "ok": ok})

    def at_least(key: str, bound: float) -> bool | None:
        v = r.get(key)
        return None if v is None else v >= bound

    # "via balancer" is the pq-balancer column: clients given the balancer's
    # address with the SDK's defaults (look-aside on); pq-proxy is not a target.
    via = f"via balancer ({BALANCER})"
    for key, what, bound in (
        ("single_balancer_over_postgres", f"single-job e2e {via} >= 2x PostgreSQL", 2.0),
        ("single_balancer_over_nats", f"single-job e2e {via} >= 1x NATS JetStream R3", 1.0),
        ("batch_balancer_over_postgres", f"100-job batches e2e {via} >= 1x PostgreSQL", 1.0),
    ):
        add(what, _x(r.get(key)), at_least(key, bound))
    for s in result["scenarios"]:
        if not s["rate"]:
            continue
        pg, ours = cell(result, s["key"], PG), cell(result, s["key"], BALANCER)
        what = f"at {s['rate']:,.0f} jobs/s offered: p99 {via} <= PostgreSQL's, backlog bounded"
        if pg is None or ours is None:
            add(what, "n/a", None)
        elif not pg["backlog"]["bounded"]:
            add(what, "PostgreSQL's backlog unbounded: not a load it sustains", None)
        else:
            p99, pg99 = ours["latency_ms"]["p99"], pg["latency_ms"]["p99"]
            bounded = ours["backlog"]["bounded"]
            value = f"{p99} ms vs {pg99} ms, backlog {'bounded' if bounded else 'UNBOUNDED'}"
            add(what, value, p99 is not None and pg99 is not None and p99 <= pg99 and bounded)
    key = "single_balancer_over_direct"
    add(f"single-job e2e: {BALANCER} >= 0.8x direct", _x(r.get(key)), at_least(key, 0.8))
    for system in (BALANCER, DIRECT):
        now = _get(result, "single", system, "cpu_us_per_job")
        what = f"CPU per single-job e2e job ({system}) <= 1/5 of before"
        if now is None:
            add(what, "n/a", None)
            continue
        if not (cell(result, "single", system) or {}).get("history", {}).get("ok", True):
            add(what, f"{now:,.0f} us/job, but this run's history check failed", None)
            continue
        was, source = _cpu_before(system, before, before_tree)
        if was is None:
            add(what, f"{now:,.0f} us/job, {source}", None)
        else:
            value = f"{now:,.0f} us vs {was:,.0f} us {source}: {was / now:.1f}x less"
            add(what, value, was >= 5 * now)
    cells = [c for s in result["scenarios"] for c in s["cells"].values() if not c.get("error")]
    failed = [c for c in cells if not c["history"]["ok"]]
    add(
        "history checks (nothing lost, none completed twice, queues empty)",
        f"{len(cells) - len(failed)}/{len(cells)} cells ok",
        not failed if cells else None,
    )
    return out


# ------------------------------------------------------------------ table


def _n(v: float | None, fmt: str = ",.0f") -> str:
    return "-" if v is None else format(v, fmt)


def _latency(c: dict[str, Any]) -> str:
    lat = c["latency_ms"]
    if lat["p50"] is None:
        return "-"
    return f"{lat['p50']:,.1f}/{lat['p99']:,.1f}/{lat['max']:,.0f}"


def _backlog(c: dict[str, Any]) -> str:
    b = c["backlog"]
    if b is None or b["end"] is None:
        return "-"
    return f"max {b['max']:,}, end {b['end']:,} {'ok' if b['bounded'] else 'UNBOUNDED'}"


def history_text(c: dict[str, Any]) -> str:
    h = c["history"]
    if h["ok"]:
        return "ok" + (f" ({h['redelivered']} redelivered)" if h["redelivered"] else "")
    bad = [
        f"{k} {h[k]}"
        for k in ("lost", "duplicate_ids", "same_lease_twice", "double_completions", "left")
        if h.get(k)
    ]
    if not h.get("drained", True):
        bad.insert(0, "not drained")
    return "FAILED " + ", ".join(bad or [f"unexpected {h['unexpected']}"])


ROWS: list[tuple[str, Callable[[dict[str, Any]], str], bool]] = [
    ("jobs/s", lambda c: _n(c["jobs_per_s"]), False),
    ("latency p50/p99/max ms", _latency, False),
    ("CPU us per job", lambda c: _n(c["cpu_us_per_job"]), False),
    ("backlog", _backlog, True),
    ("errors", lambda c: f"{c['enqueue_errors'] + c['consume_errors']:,}", False),
    ("history check", history_text, False),
]


def table(result: dict[str, Any]) -> list[str]:
    systems = result["systems"]
    rows: list[tuple[str, list[str]]] = []  # (label, cells); no cells: a scenario's title
    for s in result["scenarios"]:
        rows.append((s["title"], []))
        for label, show, open_loop_only in ROWS:
            if open_loop_only and not s["rate"]:
                continue
            cells = []
            for system in systems:
                c = s["cells"].get(system["key"])
                if system["unavailable"]:
                    text = "n/a" if label == "jobs/s" else ""
                elif c is None:
                    text = ""
                elif c.get("error"):
                    text = "FAILED" if label == "jobs/s" else ""
                else:
                    text = show(c)
                cells.append(text)
            rows.append(("  " + label, cells))
    widths = [
        max(CELL_W, len(system["label"]) + 2, *(len(cells[i]) + 2 for _, cells in rows if cells))
        for i, system in enumerate(systems)
    ]
    lines = [
        f"make bench, {result['when']}: {result['cpus']} CPUs, {result['seconds']:g} s of load "
        f"a cell, {result['payload_bytes']}-byte payloads"
        + (" (--quick)" if result["quick"] else ""),
        "; ".join(
            [
                *result["versions"].values(),
                "idle PostgreSQL consumers "
                + (
                    f"poll every {result['pg_poll_ms']:g} ms"
                    if result["pg_wakeup"] == "poll"
                    else "LISTEN for each enqueue's NOTIFY"
                ),
                "pqueue's peers over "
                + ("gRPC streams" if result.get("peer_transport") == "grpc" else "TCP"),
                "the SDK's Submits "
                + ("as calls" if result.get("submits") == "call" else "on a stream"),
                *(["pq node " + " ".join(result["node_args"])] if result.get("node_args") else []),
            ]
        ),
        *([line] if (line := describe_host(result.get("host"))) else []),
        "",
        "".ljust(LABEL_W)
        + "".join(s["label"].ljust(w) for s, w in zip(systems, widths, strict=True)),
    ]
    for label, cells in rows:
        if not cells:
            lines.append(label)
            continue
        text = "".join(c.ljust(w) for c, w in zip(cells, widths, strict=True))
        lines.append((label.ljust(LABEL_W) + text).rstrip())
    for system in systems:
        if system["unavailable"]:
            lines.append(f"{system['label']}: {system['unavailable']}")
    for s in result["scenarios"]:
        for key, c in s["cells"].items():
            if c.get("error"):
                lines.append(f"FAILED {s['title']} / {key}: {c['error']}")
    r = result["ratios"]
    lines += [
        "",
        "ratios (this run): single-job e2e via balancer "
        f"{_x(r['single_balancer_over_postgres'])} PostgreSQL, "
        f"{_x(r['single_balancer_over_nats'])} NATS, "
        f"{_x(r['single_balancer_over_direct'])} direct "
        f"(proxy only: {_x(r['single_proxy_over_direct'])} direct); "
        f"100-job batches via balancer {_x(r['batch_balancer_over_postgres'])} PostgreSQL "
        f"(direct {_x(r['batch_direct_over_postgres'])}); "
        f"{result['clients']} clients via balancer "
        f"{_x(r['clients_balancer_over_postgres'])} PostgreSQL",
    ]
    p99 = [
        f"{s['rate']:,.0f}/s {_x(r.get(_p99_key(s['rate'])))}"
        for s in result["scenarios"]
        if s["rate"]
    ]
    if p99:
        lines.append("p99 at fixed loads, via balancer over PostgreSQL: " + ", ".join(p99))
    if old := result.get("before_tree"):
        lines.append(before_tree_line(old))
    lines += ["", "targets (issue 15, done when):"]
    for t in result["targets"]:
        lines.append(f"  {t['what']}: {t['value']}: {_verdict(t['ok'])}")
    return lines


def _cpu_before(
    system: str, before: Sequence[dict[str, Any]], before_tree: dict[str, Any] | None
) -> tuple[float | None, str]:
    """``system``'s CPU per single job before, and where it is from; or None
    and why there is none. The tree measured in this run, when asked for,
    is the only source (a file from another machine is not one then)."""
    if not before_tree:
        was = min(
            (v for b in before if (v := _get(b, "single", system, "cpu_us_per_job"))),
            default=None,
        )
        if was is None:
            return None, "no --before or --before-commit"
        return was, "before (--before: another run, another machine perhaps)"
    old = (before_tree.get("cells") or {}).get(system) or {}
    if old.get("error") or not old.get("cpu_us_per_job"):
        why = old.get("error") or before_tree.get("error") or "no cell"
    elif not old.get("history_ok"):
        why = "its history check failed"  # a run that lost or doubled jobs is no figure
    else:
        name = before_tree_name(before_tree)
        return old["cpu_us_per_job"], f"before, measured in this run ({name})"
    return None, f"the tree before not measured: {why}"


def before_tree_name(before_tree: dict[str, Any] | None) -> str:
    """How the table names the old tree: its commit (a full id cut to 12), or
    where it was."""
    if not before_tree:
        return ""
    commit = str(before_tree.get("commit") or "")
    if re.fullmatch(r"[0-9a-f]{40}", commit):
        commit = commit[:12]
    return commit or str(before_tree.get("tree") or "")


def before_cell_text(cell: dict[str, Any]) -> str:
    """One old cell: its throughput and CPU per job, or how it failed."""
    if cell.get("error"):
        return f"FAILED: {cell['error']}"
    text = f"{cell['jobs_per_s'] or 0:,.0f} jobs/s, {cell['cpu_us_per_job'] or 0:,.0f} us CPU/job"
    return text + ("" if cell.get("history_ok") else " (history check FAILED)")


def before_tree_line(old: dict[str, Any]) -> str:
    """The old tree's single-job figures from this run, and why any are missing."""
    head = f"before issue 15 ({before_tree_name(old)}), single-job e2e in this run: "
    parts = [f"{key} {before_cell_text(c)}" for key, c in sorted(old.get("cells", {}).items())]
    if old.get("error"):
        parts.append(f"not measured: {old['error']}")
    return head + ("; ".join(parts) or "no cells")


def load_before(path: Path) -> dict[str, Any]:
    """A saved run (``-o json`` or the JSON file a run saves)."""
    before: dict[str, Any] = json.loads(path.read_text())
    return before
