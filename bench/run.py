"""pqueue end to end, as users run it, beside the queues they would pick instead.

    python -m bench.run [--quick] [-o json] [--before FILE ...] ...   (make bench; make bench-quick)

Four systems, one run, every scenario on each in turn (each scenario starts
one system further along, ``cell_order``, so no column always runs first;
and each pqueue cell runs on a fresh cluster unless ``--reuse-cluster``):

- pqueue: 3 ``pq node`` processes on SQLite (fsync per group commit), through
  a ``pq balancer`` process, and directly at the leader;
- the PostgreSQL ``SKIP LOCKED`` queue (``bench.pg.Pgmq``: pgmq's table, one
  transaction per enqueue, per fetch-and-lock and per fenced completion;
  ``PQ_BENCH_PG_DSN``, default the local ``test`` database);
- NATS JetStream R3, where ``nats-server`` is installed: three servers of
  our own, a work-queue stream with 3 replicas, publish acks, a durable pull
  consumer with explicit acks.

Scenarios (``--seconds`` of load each; producers and consumers run in two
processes of their own per system, ``bench.agent``):

- single-job e2e: 16 producer tasks sharing one client, each enqueueing one
  job per call in a loop; consumers with 16 slots (pqueue: a ``Worker``);
- 100-job batches e2e: the same with 100 jobs per enqueue and per fetch;
- fixed loads (open loop, ``--loads``): enqueues issued at a fixed rate
  whatever the system does; latency from when each call was due;
- 200 clients: 100 producers and 100 consumers, each its own client
  (PostgreSQL: pools of at most ``--pg-max-conns`` connections a side).

Each cell reports jobs/s, latency from the enqueue call to the handler
(p50/p99/max), CPU of every process in the path per job (/proc), errors,
the backlog (open loop) and a history check (``bench.e2e.check_history``).
The table, a JSON document and a PNG are saved under ``--out-dir``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import asyncpg

from bench import before_tree
from bench.e2e import ROOT, CellRunner, Scenario, machine_busy, until_quiet
from bench.host import HostWatch
from bench.pg import DEFAULT_PG_DSN
from bench.plot import plot
from bench.report import (
    before_cell_text,
    before_tree_name,
    history_text,
    load_before,
    ratios,
    table,
    targets,
)
from bench.spec import PAYLOAD_BYTES, CellSpec
from bench.systems import (
    PQ_MODES,
    NatsCluster,
    NatsSystem,
    PgSystem,
    PqCluster,
    PqSystem,
    System,
    nats_binary,
)

SYSTEM_KEYS = ("pq-balancer", "pq-direct", "pq-proxy", "postgres", "nats")
LABELS = {
    "pq-balancer": "pqueue via balancer",
    "pq-direct": "pqueue direct",
    "pq-proxy": "pqueue via balancer, proxy only",
    "postgres": "PostgreSQL SKIP LOCKED",
    "nats": "NATS JetStream R3",
}
SCENARIO_KEYS = ("single", "batch", "load", "clients")


def scenarios(args: argparse.Namespace) -> list[Scenario]:
    c = args.concurrency
    half = args.clients // 2
    out = [
        Scenario(
            "single",
            f"single-job e2e ({c} producers, {c} consumer slots)",
            *(1, c, 1, c, 1),
            short="single jobs",
        ),
        Scenario(
            "batch",
            f"100-job batches e2e ({c} + {c} tasks)",
            *(100, c, 1, c, 1),
            short="100-job batches",
        ),
    ]
    for rate in args.loads:
        title = f"fixed load {rate:,.0f} jobs/s (open loop)"
        out.append(
            Scenario(f"load@{rate:g}", title, 1, c, 1, c, 1, rate, short=f"{rate:,.0f} jobs/s")
        )
    title = f"{args.clients} clients ({half} producers, {half} consumers)"
    short = f"{args.clients} clients"
    out.append(Scenario("clients", title, 1, half, half, half, half, short=short))
    return [s for s in out if s.key.split("@")[0] in args.scenarios]


class Say:
    """Progress on stderr."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.prefix = ""

    def __call__(self, text: str) -> None:
        if not self.quiet:
            print(f"{self.prefix}{text}", file=sys.stderr, flush=True)


def _csv(kind: type[float] | type[str]) -> Any:
    def parse(text: str) -> list[Any]:
        return [kind(x) for x in text.split(",") if x]

    return parse


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a smoke run: 1 s cells, small counts")
    p.add_argument("--seconds", type=float, help="load per cell (default 10; --quick 1)")
    p.add_argument("--loads", type=_csv(float), help="open-loop jobs/s (default 500,2000)")
    p.add_argument("--clients", type=int, help="the many-clients scenario (default 200)")
    p.add_argument("--concurrency", type=int, default=16, help="producers and consumer slots")
    p.add_argument(
        "--systems",
        type=_csv(str),
        default=list(SYSTEM_KEYS),
        help="a subset of: " + ",".join(SYSTEM_KEYS),
    )
    p.add_argument(
        "--scenarios",
        type=_csv(str),
        default=list(SCENARIO_KEYS),
        help="a subset of: " + ",".join(SCENARIO_KEYS),
    )
    p.add_argument(
        "--drain-timeout",
        type=float,
        help="s for the consumers to finish (default 120; --quick 30)",
    )
    p.add_argument(
        "--pg-max-conns", type=int, default=20, help="PostgreSQL connections a side at most"
    )
    p.add_argument(
        "--pg-wakeup",
        choices=("notify", "poll"),
        default="poll",
        help="idle PostgreSQL consumers: LISTEN/NOTIFY or poll",
    )
    p.add_argument("--pg-poll-ms", type=float, default=10.0, help="with --pg-wakeup poll")
    p.add_argument(
        "--before",
        type=Path,
        action="append",
        default=[],
        help="an earlier run's JSON (repeatable; the lowest CPU per job counts): "
        "e.g. bench/baselines/before-issue-15-*.json",
    )
    p.add_argument(
        "--before-commit",
        metavar="COMMIT",
        help="measure this commit's tree here, in this run, for the CPU target "
        f"(make bench: {before_tree.BEFORE_ISSUE_15}, the tree before issue 15; "
        "from this checkout's history)",
    )
    p.add_argument(
        "--before-tree",
        type=Path,
        metavar="DIR",
        help="the same, from a checkout of that tree already on disk (over --before-commit)",
    )
    p.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "out")
    p.add_argument("--keep", action="store_true", help="keep the data dirs and process logs")
    p.add_argument(
        "--reuse-cluster",
        action="store_true",
        help="one pqueue cluster for every cell (default: a fresh one per pqueue cell)",
    )
    p.add_argument(
        "--peer-transport",
        choices=("tcp", "grpc"),
        default="tcp",
        help="pqueue's consensus messages: the TCP peer transport (--peer-ports, as make "
        "cluster runs) or gRPC streams (nodes without --peer-ports)",
    )
    p.add_argument(
        "--submits",
        choices=("stream", "call"),
        default="stream",
        help="how the SDK sends its Submit batches: on an open SubmitStream (its "
        "default) or as Submit calls (Client(stream_submits=False))",
    )
    p.add_argument(
        "--node-arg",
        action="append",
        default=[],
        metavar="FLAG",
        help="an extra `pq node` flag for every node, e.g. --node-arg=--mix-wait-ms=0 (repeatable)",
    )
    p.add_argument("-o", "--output", choices=("table", "json"), default="table")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    args = p.parse_args(argv)
    quick = args.quick
    args.seconds = args.seconds or (1.0 if quick else 10.0)
    args.loads = args.loads or ([200.0, 500.0] if quick else [500.0, 2000.0])
    args.clients = args.clients or (20 if quick else 200)
    args.drain_timeout = args.drain_timeout or (30.0 if quick else 120.0)
    for name, chosen, allowed in (
        ("--systems", args.systems, SYSTEM_KEYS),
        ("--scenarios", args.scenarios, SCENARIO_KEYS),
    ):
        if unknown := set(chosen) - set(allowed):
            p.error(f"{name}: unknown {', '.join(sorted(unknown))}")
    return args


T = TypeVar("T")


def cell_order(systems: Sequence[T], scenario_index: int) -> list[T]:
    """The order a scenario's cells run in: rotated by one system per
    scenario, so no column always runs first (a machine warms up, and with
    ``--reuse-cluster`` a later pqueue cell meets a cluster that has served
    more)."""
    if not systems:
        return []
    k = scenario_index % len(systems)
    return [*systems[k:], *systems[:k]]


async def start_systems(
    args: argparse.Namespace,
    tmp: Path,
    say: Say,
    started: list[Any],
    versions: dict[str, str],
) -> tuple[list[System], dict[str, str]]:
    """The systems that started (in the table's order) and why the others did
    not; what must be stopped is added to ``started`` as it starts."""
    systems: list[System] = []
    unavailable: dict[str, str] = {}
    if set(PQ_MODES) & set(args.systems):
        say("starting 3 pq nodes (SQLite, fsync) and a pq balancer")
        pq = PqCluster(
            tmp / "pq",
            fresh=not args.reuse_cluster,
            keep=args.keep,
            peer_tcp=args.peer_transport == "tcp",
            failed_logs=args.out_dir,
            node_args=tuple(args.node_arg),
        )
        started.append(pq)
        await pq.start()
        for key in PQ_MODES:
            if key in args.systems:
                systems.append(PqSystem(pq, key))
    if "postgres" in args.systems:
        dsn = os.environ.get("PQ_BENCH_PG_DSN", DEFAULT_PG_DSN)
        pg = PgSystem(dsn)
        try:
            await pg.start()
            started.append(pg)
            systems.append(pg)
            versions["postgres"] = await pg.version()
        except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
            unavailable["postgres"] = f"unavailable ({dsn}): {exc}"
    if "nats" in args.systems:
        binary = nats_binary()
        if binary is None:
            unavailable["nats"] = "nats-server is not installed (Debian package nats-server)"
        else:
            say("starting 3 nats-server processes (JetStream, clustered)")
            nc = NatsCluster(tmp / "nats", binary)
            started.append(nc)
            try:
                await nc.start()
                systems.append(NatsSystem(nc))
                versions["nats"] = nc.version()
            except (OSError, RuntimeError) as exc:
                unavailable["nats"] = f"did not start: {exc}"
    order = {k: i for i, k in enumerate(SYSTEM_KEYS)}
    systems.sort(key=lambda s: order[s.key])
    return systems, unavailable


async def run(args: argparse.Namespace, say: Say) -> dict[str, Any]:
    plan = scenarios(args)
    base = CellSpec(
        system="",
        target="",
        queue="",
        batch=1,
        producers=1,
        producer_clients=1,
        consumers=1,
        consumer_clients=1,
        seconds=args.seconds,
        pg_max_conns=args.pg_max_conns,
        pg_wakeup=args.pg_wakeup,
        pg_poll_ms=args.pg_poll_ms,
        stream_submits=args.submits == "stream",
    )
    result: dict[str, Any] = {
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "quick": args.quick,
        "cpus": os.cpu_count(),
        "seconds": args.seconds,
        "payload_bytes": PAYLOAD_BYTES,
        "clients": args.clients,
        "concurrency": args.concurrency,
        "pg_wakeup": args.pg_wakeup,
        "pg_poll_ms": args.pg_poll_ms,
        "pg_max_conns": args.pg_max_conns,
        "peer_transport": args.peer_transport,
        "submits": args.submits,
        "node_args": list(args.node_arg),
        "versions": {},
        "systems": [],
        "scenarios": [
            {
                "key": s.key,
                "title": s.title,
                "short": s.short,
                "batch": s.batch,
                "producers": s.producers,
                "producer_clients": s.producer_clients,
                "consumers": s.consumers,
                "consumer_clients": s.consumer_clients,
                "rate": s.rate,
                "cells": {},
            }
            for s in plan
        ],
    }
    host = HostWatch()  # before anything of this run starts
    tmp = Path(tempfile.mkdtemp(prefix="pq-bench-"))
    if args.keep:
        say(f"data dirs and logs under {tmp}")
    started: list[Any] = []
    runners: dict[str, CellRunner] = {}
    try:
        if "single" in args.scenarios and (args.before_commit or args.before_tree):
            # First, with nothing of this run's started yet.
            result["before_tree"] = await measure_before(args, say, tmp)
        systems, unavailable = await start_systems(args, tmp, say, started, result["versions"])
        result["systems"] = [
            {"key": k, "label": LABELS[k], "unavailable": unavailable.get(k, "")}
            for k in SYSTEM_KEYS
            if k in args.systems
        ]
        for key, why in unavailable.items():
            say(f"{LABELS[key]}: {why}")
        runners = {s.key: CellRunner(s, tmp, say) for s in systems}
        total = len(plan) * len(systems)
        n = 0
        for index, (scenario, out) in enumerate(zip(plan, result["scenarios"], strict=True)):
            for system in cell_order(systems, index):
                n += 1
                say(f"[{n}/{total}] {scenario.title} · {system.label}")
                say.prefix = "    "
                cell = await runners[system.key].run(scenario, base, args.drain_timeout)
                out["cells"][system.key] = cell
                if not cell.get("error"):
                    say(_summary(cell))
                say.prefix = ""
    finally:
        for r in runners.values():
            await r.stop()
        for s in reversed(started):
            await s.stop()
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    result["host"] = host.finish()  # after everything stopped
    result["ratios"] = ratios(result)
    result["before"] = [str(p) for p in args.before]
    result["targets"] = targets(
        result, [load_before(p) for p in args.before], result.get("before_tree")
    )
    return result


async def measure_before(args: argparse.Namespace, say: Say, tmp: Path) -> dict[str, Any]:
    """The old tree's single-job cells, one column at a time, each on a quiet
    machine (``bench.before_tree``): what the CPU target compares with."""
    systems = [k for k in before_tree.OLD_SYSTEMS if k in args.systems]
    done: dict[str, Any] = {
        "commit": "" if args.before_tree else args.before_commit,
        "tree": str(args.before_tree or ""),
        "cells": {},
        "settle": {},
        "error": "",
    }
    if not systems:
        done["error"] = f"none of {', '.join(before_tree.OLD_SYSTEMS)} asked for"
        return done
    load = before_tree.Load(args.seconds, args.concurrency, args.drain_timeout)
    try:
        if args.before_tree:
            tree = args.before_tree
        else:
            done["commit"] = await asyncio.to_thread(before_tree.resolve, args.before_commit)
            tree = await asyncio.to_thread(before_tree.checkout, done["commit"], tmp)
    except before_tree.BeforeTreeError as exc:
        done["error"] = str(exc)
        say(f"[before] not measured: {exc}")
        return done
    done["tree"] = str(tree)
    name = before_tree_name(done)
    for system in systems:
        # Each column on its own: one that fails leaves the other measured.
        say(f"[before] the tree before issue 15 ({name}): its single-job cell, {system}")
        try:
            waited_s, quiet = await until_quiet(machine_busy)
            done["settle"][system] = {"waited_s": round(waited_s, 1), "quiet": quiet}
            measured = await before_tree.measure(tree, system, load, args.out_dir / "before")
            cell = before_tree.summary(measured).get(system)
            if cell is None:
                raise before_tree.BeforeTreeError(f"its bench reported no {system} cell")
        except Exception as exc:  # never the whole bench: the table says why
            why = str(exc) if isinstance(exc, before_tree.BeforeTreeError) else repr(exc)
            cell = {"error": why}
        done["cells"][system] = cell
        say("    " + before_cell_text(cell))
    return done


def _summary(c: dict[str, Any]) -> str:
    lat = c["latency_ms"]
    text = (
        f"{c['jobs_per_s'] or 0:,.0f} jobs/s, p50 {lat['p50']} ms, p99 {lat['p99']} ms, "
        f"{c['cpu_us_per_job'] or 0:,.0f} us CPU/job, history {history_text(c)}"
    )
    if c["backlog"]:
        text += f", backlog max {c['backlog']['max']} end {c['backlog']['end']}"
    return text


def save(result: dict[str, Any], out_dir: Path) -> list[str]:
    """The JSON, then the table (its lines returned), then the plot."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"bench-{time.strftime('%Y%m%d-%H%M%S')}"
    files = {
        "table": str(stem.with_suffix(".txt")),
        "json": str(stem.with_suffix(".json")),
        "plot": str(stem.with_suffix(".png")),
    }
    result["files"] = files
    Path(files["json"]).write_text(json.dumps(result, indent=1) + "\n")
    lines = table(result)
    Path(files["table"]).write_text("\n".join(lines) + "\n")
    plot(result, Path(files["plot"]))
    return lines


async def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    say = Say(args.quiet)
    result = await run(args, say)
    lines = save(result, args.out_dir)
    files = result["files"]
    say(f"saved {files['table']}, {files['json']}, {files['plot']}")
    if args.output == "json":
        print(json.dumps(result, indent=1))
    else:
        print("\n".join(lines), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
