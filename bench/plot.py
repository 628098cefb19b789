"""``make bench``'s figure: a PNG of one run (matplotlib, no display needed)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
from matplotlib.axes import Axes

COLORS = {
    "pq-balancer": "#1f77b4",
    "pq-direct": "#6baed6",
    "pq-proxy": "#9467bd",
    "postgres": "#d62728",
    "nats": "#2ca02c",
}

Value = Callable[[dict[str, Any]], float | None]


def _bars(
    ax: Axes,
    result: dict[str, Any],
    scenarios: list[dict[str, Any]],
    value: Value,
    label: str,
) -> None:
    systems = [s for s in result["systems"] if not s["unavailable"]]
    width = 0.8 / max(1, len(systems))
    drawn = 0
    for i, system in enumerate(systems):
        xs, ys = [], []
        for j, s in enumerate(scenarios):
            c = s["cells"].get(system["key"])
            v = value(c) if c and not c.get("error") else None
            if v:
                xs.append(j + (i - (len(systems) - 1) / 2) * width)
                ys.append(v)
        bars = ax.bar(xs, ys, width, label=system["label"], color=COLORS.get(system["key"]))
        ax.bar_label(bars, fmt="{:,.0f}", fontsize=7, rotation=90, padding=2)
        drawn += len(ys)
    ax.set_xticks(range(len(scenarios)), [s["short"] for s in scenarios], fontsize=8)
    ax.set_ylabel(label)
    if not drawn:
        ax.text(0.5, 0.5, "not measured", ha="center", transform=ax.transAxes)
        return
    ax.set_yscale("log")
    ax.margins(y=0.25)


def plot(result: dict[str, Any], path: Path) -> Path:
    scenarios = result["scenarios"]
    closed = [s for s in scenarios if not s["rate"]]
    loads = [s for s in scenarios if s["rate"]]
    fig, axes = plt.subplots(2, 2, figsize=(14, 9))
    ax = axes[0][0]
    _bars(ax, result, closed, lambda c: c["jobs_per_s"], "jobs/s end to end")
    ax.set_title("throughput, closed loop (log)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    ax = axes[0][1]
    _bars(ax, result, loads, lambda c: c["latency_ms"]["p99"], "ms, enqueue call to handler")
    ax.set_title("p99 latency at fixed offered loads (log)")
    ax = axes[1][0]
    _bars(ax, result, scenarios, lambda c: c["cpu_us_per_job"], "us of CPU per job, all processes")
    ax.set_title("CPU per end-to-end job (log)")
    ax = axes[1][1]
    styles = ["-", "--", ":", "-."]
    for k, s in enumerate(loads):
        for system in result["systems"]:
            c = s["cells"].get(system["key"])
            if not c or c.get("error") or not c["backlog"]:
                continue
            ts = [t for t, _ in c["backlog"]["samples"]]
            bs = [max(b, 0) for _, b in c["backlog"]["samples"]]
            ax.plot(
                ts,
                bs,
                styles[k % len(styles)],
                color=COLORS.get(system["key"]),
                label=f"{system['label']} @ {s['rate']:,.0f}/s",
            )
    ax.set_title("backlog at fixed offered loads (jobs offered, not yet completed)")
    ax.set_xlabel("s since the load started")
    ax.set_ylabel("jobs")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.suptitle(
        f"make bench, {result['when']}: {result['cpus']} CPUs, {result['seconds']:g} s a cell"
        + (" (--quick)" if result["quick"] else "")
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
