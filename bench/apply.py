"""What the replicated state machine costs per job, with no IO at all.

Every node applies every entry: ``features.check_entry``, then
``QueueMachine.apply_entry``, then ``events.derive`` (the ``Watch`` events
every replica keeps a ring of); the leader also stamps each entry with the
features it needs (``features.required_by``) and checks each command's
(``QueueNode.check_features``'s walk). This replays two workloads shaped as
``make bench``'s cells write them into the log, in one process, and prints
microseconds per job for each step, so a change to the pure core is
measured without a cluster, gRPC or a disk in the way (quote ratios:
``--compare DIR`` alternates rounds with another checkout's core):

- ``batch``: entries of one 100-job enqueue, then a lease of 100, then an
  ack of those 100 (the 100-job batches cell);
- ``single``: per 16 jobs, an entry with one 16-job enqueue, then one
  with their lease and the ack of the 16 before: the single-job cell's log
  since session 8, whose 16 producers' jobs go in one ``Submit``, a
  command each (a cell's log read in session 10: 2,382 entries of 1.39
  commands, every command 16 jobs: "e", "l+a", "e", "l+a"...). Since
  session 14 the cell's log holds one entry a round ("e+l+a": the leader
  holds one side's commands for the other's); the workload keeps the
  two-entry shape, so its figures compare with earlier sessions'.

"all" is the process's CPU for the whole replay, the driver's own work
(making the commands, encoding and decoding each entry) included. Time
moves 2 ms an entry; each workload runs ``--jobs`` jobs after a warm-up
of a tenth of that, on a queue of its own, on a machine with lifecycle
records on (as every cluster since the lifecycle release).

    python -m bench.apply [--jobs 50000] [--rounds 3] [--compare DIR] [-o json]
    python -m bench.apply --instructions [--compare DIR]

``--instructions`` counts instead of timing: each workload runs under
valgrind's callgrind at two sizes (``--jobs`` and three times that), and
the difference in instructions executed, over the difference in jobs, is
the cost of a job: the same figure on a quiet host and a noisy one, every
time (a shared machine's CPU time moves 30 % between rounds). It counts
the whole replay (the driver's commands and encoding too), so a change to
the core shows as a smaller share of it.

``--follower`` measures a follower instead: every entry is applied twice,
by the driver's machine (the leader: its answers make the next commands)
and by a second one that answers nobody, as a replica applies what another
node proposed (``apply_entry(respond=False)`` since session 20: no lease
answer is built). The check, apply and derive steps are the second
machine's (the stamp stays the leader's); "all" and the instruction
counts take in both machines, so compare them between trees as
differences, not ratios (``--instructions`` prints the difference a job).

    python -m bench.apply --instructions --follower [--compare DIR]

``--snapshot`` times what a snapshot costs the node's loop instead: a
queue holding 18,000 waiting jobs (compact rows) and 10,000 completed
records (the default ``completed_max``) is frozen seven times; it prints
the median of ``freeze`` (on the loop: every job in flight waits for it)
and of serializing the head (``SnapshotView.head_bytes``, on the
snapshot thread since session 19; an older core does it inside
``freeze``).

    python -m bench.apply --snapshot [--compare DIR]
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pqueue.core import features, snapshot
from pqueue.core.machine import QueueMachine
from pqueue.v1 import log_pb2 as logpb
from pqueue.v1 import queue_pb2 as pb

derive: Callable[..., object] | None
try:
    from pqueue.core.events import derive
except ImportError:  # a core from before Watch (``--compare`` an older tree)
    derive = None

#: Whether this core's stamp and gate leave out the features already known.
KNOWN_FEATURES = "known" in inspect.signature(features.required_by).parameters
#: Whether this core applies an entry without answering (a follower's apply).
QUIET_APPLY = "respond" in inspect.signature(QueueMachine.apply_entry).parameters

ROOT = Path(__file__).resolve().parents[1]
PAYLOAD = b"x" * 64
STEPS = ("stamp", "check", "apply", "derive")
#: Jobs per ``Submit`` in the single-job cell (its 16 producers share a client).
SUBMIT_JOBS = 16
Entry = list[logpb.Command]


class Replay:
    """A machine fed entries at 2 ms apart, timing each step (``follower``:
    each entry is applied by a second machine too, as a follower, and its
    steps are the ones timed)."""

    def __init__(self, follower: bool = False) -> None:
        self.machine = QueueMachine()
        self.follower = QueueMachine() if follower else None
        self.now = 1_000_000
        self.spent = dict.fromkeys(STEPS, 0)
        self.apply([logpb.Command(tick=logpb.Tick(lifecycle=True))])

    def apply(self, commands: Entry) -> list[Any]:
        clock = time.perf_counter_ns
        m = self.machine
        t0 = clock()
        if KNOWN_FEATURES:  # the leader's gate for each command, then its stamp
            known = m.features
            for command in commands:
                features.required(command, known)
            stamp = features.required_by(commands, known)
        else:  # a core from before stamps left known features out
            for command in commands:
                features.required(command)
            stamp = features.required_by(commands)
        t1 = clock()
        self.now += 2
        entry = logpb.LogEntry(
            index=m.applied_index + 1, time_ms=self.now, commands=commands,
            required_features=stamp,
        )  # fmt: skip
        # A follower decodes what the leader sent: measure that entry.
        entry = logpb.LogEntry.FromString(entry.SerializeToString())
        if self.follower is not None:  # the leader's apply, untimed: its answers drive
            effects = m.apply_entry(entry)
            if derive is not None:
                derive(entry, effects, m)
            m = self.follower
        t2 = clock()
        features.check_entry(entry, features.SUPPORTED)
        t3 = clock()
        if self.follower is None:
            effects = mine = m.apply_entry(entry)
        elif QUIET_APPLY:
            mine = m.apply_entry(entry, respond=False)
        else:
            mine = m.apply_entry(entry)
        t4 = clock()
        if derive is not None:
            derive(entry, mine, m)
        t5 = clock()
        spent = self.spent
        spent["stamp"] += t1 - t0
        spent["check"] += t3 - t2
        spent["apply"] += t4 - t3
        spent["derive"] += t5 - t4
        for result in effects.results:
            if isinstance(result, Exception):
                raise result
        return list(effects.results)


def _leased(result: Any) -> list[pb.JobLease]:
    return [pb.JobLease(job_id=j.job_id, lease_id=j.lease_id) for j in result.jobs]


def batch(replay: Replay, queue: str, jobs: int) -> Iterator[None]:
    """One 100-job enqueue, one lease of 100, one ack of 100, per 100 jobs."""
    for _ in range(jobs // 100):
        specs = [pb.JobSpec(payload=PAYLOAD) for _ in range(100)]
        replay.apply([logpb.Command(enqueue=pb.EnqueueBatchRequest(queue=queue, jobs=specs))])
        lease = pb.LeaseRequest(queue=queue, max_jobs=100, lease_ms=30_000)
        [leased] = replay.apply([logpb.Command(lease=lease)])
        ack = pb.AckRequest(queue=queue, leases=_leased(leased))
        replay.apply([logpb.Command(ack=ack)])
        yield


def single(replay: Replay, queue: str, jobs: int) -> Iterator[None]:
    """Per 16 jobs, two entries: the enqueue of a 16-job ``Submit`` (one
    command), then the lease of those 16 (a ``Consume`` push) with the ack
    of the 16 before (a ``Consume`` settle)."""
    acks: list[logpb.Command] = []
    for _ in range(jobs // SUBMIT_JOBS):
        specs = [pb.JobSpec(payload=PAYLOAD) for _ in range(SUBMIT_JOBS)]
        replay.apply([logpb.Command(enqueue=pb.EnqueueBatchRequest(queue=queue, jobs=specs))])
        lease = pb.LeaseRequest(queue=queue, max_jobs=SUBMIT_JOBS, lease_ms=30_000)
        [leased, *_] = replay.apply([logpb.Command(lease=lease), *acks])
        acks = [logpb.Command(ack=pb.AckRequest(queue=queue, leases=_leased(leased)))]
        yield


WORKLOADS: dict[str, Callable[[Replay, str, int], Iterator[None]]] = {
    "batch": batch,
    "single": single,
}


def run_workload(name: str, jobs: int, follower: bool = False) -> dict[str, float]:
    """µs per job of each step, and in all, for ``jobs`` jobs of ``name``
    (rounded down to whole entries of the workload; "jobs" says how many
    were acked; ``follower``: see ``Replay``)."""
    replay = Replay(follower)
    queue = f"bench-{name}"
    replay.apply([logpb.Command(create_queue=pb.CreateQueueRequest(queue=queue))])
    for _ in WORKLOADS[name](replay, queue, max(jobs // 10, 100)):
        pass  # warm-up: the machine holds records, as one that has served
    replay.spent = dict.fromkeys(STEPS, 0)
    acked_before = replay.machine.queues[queue].counters.acked
    gc.collect()
    start = time.process_time_ns()
    for _ in WORKLOADS[name](replay, queue, jobs):
        pass
    cpu = time.process_time_ns() - start
    acked = replay.machine.queues[queue].counters.acked - acked_before
    if acked <= 0:
        raise SystemExit(f"{name}: no job went through (--jobs {jobs} is under one round)")
    out = {step: replay.spent[step] / 1000 / acked for step in STEPS}
    out["all"] = cpu / 1000 / acked
    out["jobs"] = acked
    return out


def _measure(tree: Path, name: str, jobs: int, follower: bool = False) -> dict[str, float]:
    """One round in a fresh process: this driver, ``tree``'s core."""
    env = dict(os.environ, PYTHONPATH=str(tree))
    done = subprocess.run(
        [sys.executable, __file__, "--one", name, "--jobs", str(jobs)]
        + (["--follower"] if follower else []),
        env=env,
        capture_output=True,
        text=True,
    )
    if done.returncode:
        raise SystemExit(f"a round with {tree}'s core failed:\n{done.stderr}")
    return dict(json.loads(done.stdout))


def snapshot_costs(waiting: int = 18_000, records: int = 10_000) -> dict[str, float]:
    """Median ms of ``freeze`` and of the head's serialization, over seven
    freezes of a machine holding ``waiting`` jobs and ``records`` records."""
    replay = Replay()
    queue = "bench-snapshot"
    replay.apply([logpb.Command(create_queue=pb.CreateQueueRequest(queue=queue))])
    for _ in batch(replay, queue, records):
        pass  # each round's 100 jobs end as completed records
    for _ in range(waiting // 100):
        specs = [pb.JobSpec(payload=PAYLOAD) for _ in range(100)]
        replay.apply([logpb.Command(enqueue=pb.EnqueueBatchRequest(queue=queue, jobs=specs))])
    froze, heads = [], []
    for _ in range(7):
        t0 = time.perf_counter()
        view = snapshot.freeze(replay.machine)
        t1 = time.perf_counter()
        head = view.head_bytes() if hasattr(view, "head_bytes") else None
        t2 = time.perf_counter()
        for _chunk in view.chunks(head) if head is not None else view.chunks():
            pass
        froze.append((t1 - t0) * 1000)
        heads.append((t2 - t1) * 1000)
    return {"freeze_ms": statistics.median(froze), "head_ms": statistics.median(heads)}


def _instructions(tree: Path, name: str, jobs: int, follower: bool = False) -> int:
    """Instructions one replay of ``jobs`` jobs executes, under callgrind."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "callgrind.out"
        done = subprocess.run(
            [
                "valgrind",
                "--tool=callgrind",
                f"--callgrind-out-file={out}",
                sys.executable,
                __file__,
                "--one",
                name,
                "--jobs",
                str(jobs),
                *(["--follower"] if follower else []),
            ],
            env=dict(os.environ, PYTHONPATH=str(tree), PYTHONHASHSEED="0"),
            capture_output=True,
            text=True,
        )
        if done.returncode:
            raise SystemExit(f"callgrind on {tree}'s core failed:\n{done.stderr[-2000:]}")
        for line in out.read_text().splitlines():
            if line.startswith(("summary:", "totals:")):
                return int(line.split()[1])
    raise SystemExit("callgrind wrote no totals")


def instructions_per_job(tree: Path, name: str, jobs: int, follower: bool = False) -> float:
    """Instructions a job of ``name`` costs: two replays' difference over
    their difference in jobs (start-up and imports cancel; each replay's
    warm-up is a tenth of its jobs, so it is counted in)."""
    small, large = jobs, 3 * jobs
    spent = _instructions(tree, name, large, follower) - _instructions(tree, name, small, follower)
    return spent / (1.1 * (large - small))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, help="jobs per workload and round (default 50000)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (each a fresh process)")
    parser.add_argument("--compare", type=Path, help="alternate rounds with this checkout's core")
    parser.add_argument(
        "--instructions",
        action="store_true",
        help="count instructions a job under valgrind's callgrind (deterministic; --jobs "
        "defaults to 2000 here) instead of timing rounds",
    )
    parser.add_argument(
        "--snapshot",
        action="store_true",
        help="time a snapshot's freeze (on the loop) and head (off it) instead",
    )
    parser.add_argument(
        "--follower",
        action="store_true",
        help="measure a follower's apply (a second machine that answers nobody)",
    )
    parser.add_argument("-o", dest="output", choices=("table", "json"), default="table")
    parser.add_argument("--one", choices=(*WORKLOADS, "snapshot"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.jobs is None:  # counting instructions runs far fewer jobs
        args.jobs = 2000 if args.instructions else 50_000
    if args.one == "snapshot":  # in the process _measure started
        print(json.dumps(snapshot_costs()))
        return 0
    if args.one:  # a round, in the process _measure started
        print(json.dumps(run_workload(args.one, args.jobs, args.follower)))
        return 0
    trees = [("this tree", ROOT)]
    if args.compare is not None:
        trees.insert(0, (str(args.compare.resolve()), args.compare.resolve()))
    if args.instructions:
        return _count(trees, args.jobs, args.output, args.follower)
    if args.snapshot:
        costs = {label: _measure(tree, "snapshot", 0) for label, tree in trees}
        if args.output == "json":
            print(json.dumps(costs, indent=2))
            return 0
        print("a snapshot of 18,000 waiting jobs and 10,000 records, median of 7, ms")
        print(f"{'tree':30} {'freeze (loop)':>14} {'head (thread)':>14}")
        for label, cost in costs.items():
            print(f"{label[-30:]:30} {cost['freeze_ms']:>14.1f} {cost['head_ms']:>14.1f}")
        return 0
    results: dict[str, dict[str, list[dict[str, float]]]] = {}
    for r in range(args.rounds):
        for name in WORKLOADS:
            for label, tree in trees:
                row = _measure(tree, name, args.jobs, args.follower)
                results.setdefault(label, {}).setdefault(name, []).append(row)
                if args.output == "table":
                    line = f"round {r + 1} {name:6} {label}: {row['all']:.1f} µs/job"
                    print(line, file=sys.stderr)
    if args.output == "json":
        print(json.dumps(results, indent=2))
        return 0
    print(f"µs of CPU per job ({args.jobs} jobs, {args.rounds} rounds: min to max)")
    print(f"{'tree':30} {'workload':8} " + " ".join(f"{s:>13}" for s in (*STEPS, "all")))
    for label, per in results.items():
        for name, rows in per.items():
            cells = []
            for step in (*STEPS, "all"):
                values = [row[step] for row in rows]
                cells.append(f"{min(values):6.1f}-{max(values):<6.1f}")
            print(f"{label[-30:]:30} {name:8} " + " ".join(cells))
    if args.compare is not None and len(results) == 2:
        [(a, pa), (_, pb_)] = results.items()
        for name in WORKLOADS:
            ratios = [y["all"] / x["all"] for x, y in zip(pa[name], pb_[name], strict=True)]
            print(
                f"{name}: this tree / {Path(a).name}: "
                f"{min(ratios):.2f}-{max(ratios):.2f}x (median {statistics.median(ratios):.2f})"
            )
    return 0


def _count(trees: list[tuple[str, Path]], jobs: int, output: str, follower: bool = False) -> int:
    """``--instructions``: a table (or JSON) of instructions a job, per tree
    and workload, and the ratio to the first tree with ``--compare``."""
    if shutil.which("valgrind") is None:
        raise SystemExit("--instructions needs valgrind (Debian package valgrind)")
    counts: dict[str, dict[str, float]] = {}
    for label, tree in trees:
        for name in WORKLOADS:
            counts.setdefault(label, {})[name] = instructions_per_job(tree, name, jobs, follower)
            if output == "table":
                print(f"{name:6} {label}: {counts[label][name]:,.0f}", file=sys.stderr)
    if output == "json":
        print(json.dumps(counts, indent=2))
        return 0
    print(f"instructions a job (callgrind, {jobs} and {3 * jobs} jobs)")
    print(f"{'tree':30} " + " ".join(f"{name:>12}" for name in WORKLOADS))
    for label, per in counts.items():
        print(f"{label[-30:]:30} " + " ".join(f"{per[name]:>12,.0f}" for name in WORKLOADS))
    if len(counts) == 2:
        [(a, first), (_, this)] = counts.items()
        for name in WORKLOADS:
            print(
                f"{name}: this tree / {Path(a).name}: {this[name] / first[name]:.3f}x "
                f"({this[name] - first[name]:+,.0f} a job)"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
