"""A flooding tenant beside a calm one: does the calm tenant's lease latency hold?

One ``pq node`` process with auth and a tenants file. Tenant ``calm`` has
a queue filled ahead and 4 consumers that lease and ack one job per call;
we time each lease. Tenant ``flood`` runs 16 producers, in a process of their own, that
enqueue as fast as they can. Four runs, the same node setup each time:

- calm alone (the baseline);
- the flood held to its quota (``enqueue_per_s``), its SDK waiting out each
  refusal's pushback (polite);
- the same, but going again at once when refused (rude);
- the flood with no quota, to show what the quota buys.

    python -m bench.tenants [--seconds 8]      (make bench-tenants)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from pqueue.client import Client, job_spec
from pqueue.errors import PQueueError, ResourceExhaustedError
from pqueue.node.auth import issue
from tests.proc import NodeProcess

SECRET = b"bench-secret-bench-secret-bench-secret"
CALM_CONSUMERS = 4
FLOOD_PRODUCERS = 16


def _p(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else 0


async def _run(tmp: Path, name: str, flood_quota: str | None, flood: str, seconds: float) -> str:
    (tmp / "secret").write_bytes(SECRET)
    tenants = "[defaults]\n"
    if flood_quota is not None:
        tenants += f"[tenants.flood]\n{flood_quota}\n"
    (tmp / "tenants.toml").write_text(tenants)
    node = NodeProcess(
        tmp / name / "n1",
        extra=("--auth-key-file", str(tmp / "secret"), "--tenants", str(tmp / "tenants.toml")),
    )
    address = node.start()
    calm_token = issue(SECRET, "calm", ["producer", "consumer"], 3600)
    flood_token = issue(SECRET, "flood", ["producer"], 3600)
    stop = asyncio.Event()
    latencies: list[float] = []
    flood_ok = flood_refused = 0
    try:
        async with Client(address, token=calm_token, timeout_s=30) as calm:
            for _ in range(20):  # enough for the whole run
                await calm.enqueue_batch("work", [job_spec(b"x" * 256)] * 1000)

            async def consume() -> None:
                while not stop.is_set():
                    started = time.perf_counter()
                    jobs = await calm.lease("work")
                    latencies.append(time.perf_counter() - started)
                    for job in jobs:
                        await calm.ack("work", job.job_id, job.lease_id)

            flooder = None
            if flood:  # a process of its own: it must not slow the calm client's loop
                flooder = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "bench.tenants", "--flood", address, flood_token,
                    "--seconds", str(seconds), *(["--polite"] if flood == "polite" else []),
                    stdout=asyncio.subprocess.PIPE,
                )  # fmt: skip
            tasks = [asyncio.create_task(consume()) for _ in range(CALM_CONSUMERS)]
            await asyncio.sleep(seconds)
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
            if flooder is not None:
                out, _ = await flooder.communicate()
                flood_ok, flood_refused = json.loads(out)
    finally:
        node.terminate()
    ms = sorted(x * 1000 for x in latencies)
    flood_cell = (
        f"flood accepted {flood_ok / seconds:7.0f}/s, refused {flood_refused / seconds:7.0f}/s"
        if flood
        else "no flood"
    )
    return (
        f"{name:<26} calm leases {len(ms) / seconds:6.0f}/s  p50 {_p(ms, 50):6.1f} ms  "
        f"p99 {_p(ms, 99):6.1f} ms   {flood_cell}"
    )


async def _flood(address: str, token: str, seconds: float, polite: bool) -> None:
    """The flooding tenant's producers; prints [accepted, refused]. Polite ones use
    the SDK's retries, which wait out each refusal's pushback."""
    ok = refused = 0
    deadline = time.monotonic() + seconds

    async def produce(client: Client) -> None:
        nonlocal ok, refused
        while time.monotonic() < deadline:
            try:
                await client.enqueue("spam", b"y" * 256)
                ok += 1
            except ResourceExhaustedError:
                refused += 1

    retries = 1000 if polite else 0
    async with Client(address, token=token, timeout_s=30, max_retries=retries) as client:
        await asyncio.gather(*(produce(client) for _ in range(FLOOD_PRODUCERS)))
        refused += client.retries
    print(json.dumps([ok, refused]))


async def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--flood-rate", type=float, default=200.0, help="the flood's quota, jobs/s")
    p.add_argument("--flood", nargs=2, metavar=("ADDRESS", "TOKEN"), help=argparse.SUPPRESS)
    p.add_argument("--polite", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.flood:
        await _flood(args.flood[0], args.flood[1], args.seconds, args.polite)
        return 0
    quota = f"enqueue_per_s = {args.flood_rate}"
    print(
        f"1 node; calm: {CALM_CONSUMERS} consumers leasing 1 job per call; "
        f"flood: {FLOOD_PRODUCERS} producers in a process of their own, {args.seconds:g} s each; "
        "polite: the SDK waits out each refusal's pushback; rude: it goes again at once"
    )
    with tempfile.TemporaryDirectory(prefix="pq-bench-tenants-") as tmp:
        for name, flood_quota, flood in (
            ("calm alone", None, ""),
            (f"flood at {args.flood_rate:g}/s, polite", quota, "polite"),
            (f"flood at {args.flood_rate:g}/s, rude", quota, "rude"),
            ("flood without quota", None, "rude"),
        ):
            print(f"  running {name}...", file=sys.stderr, flush=True)
            try:
                print(
                    await _run(Path(tmp), name.replace(" ", "-"), flood_quota, flood, args.seconds)
                )
            except PQueueError as exc:
                print(f"{name}: failed: {exc}")
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
