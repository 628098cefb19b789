"""A soak: random faults back to back under load, then the history check.

Marked slow: ``make test-all`` runs it (``PQ_SOAK_S`` sets its length).
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from pathlib import Path

import pytest

from tests.faults import workload
from tests.faults.cluster import ProcCluster
from tests.faults.history import History


@pytest.mark.slow
@pytest.mark.timeout(900)
async def test_random_faults_for_a_while(tmp_path: Path) -> None:
    seed = int(os.environ.get("PQ_SOAK_SEED", "1"))
    rng = random.Random(seed)
    duration_s = float(os.environ.get("PQ_SOAK_S", "60"))
    cluster = ProcCluster(tmp_path, partitionable=True)
    await cluster.start()
    history = History()
    stop = asyncio.Event()
    faults: list[str] = []
    try:
        load = asyncio.create_task(workload.run(cluster.endpoint, history, stop))
        deadline = time.monotonic() + duration_s
        while time.monotonic() < deadline:
            await asyncio.sleep(rng.uniform(1.0, 3.0))
            leader = await cluster.leader()
            victim = rng.choice([leader, *cluster.ports])
            kind = rng.choice(["kill", "pause", "isolate"])
            faults.append(f"{kind} n{victim}{' (leader)' if victim == leader else ''}")
            if kind == "kill":
                cluster.kill9(victim)
                await asyncio.sleep(rng.uniform(0.5, 2.0))
                cluster.launch(victim)
            elif kind == "pause":
                cluster.pause(victim)
                await asyncio.sleep(rng.uniform(0.5, 2.0))
                cluster.resume(victim)
            else:
                cluster.isolate(victim)
                await asyncio.sleep(rng.uniform(0.5, 2.0))
                cluster.heal()
            await cluster.leader()
        stop.set()
        await load
        await workload.drain(cluster.endpoint, history, timeout_s=120)
        counts = history.check()
        print(f"\nseed {seed}, {len(faults)} faults: {', '.join(faults)}\n{counts}")
        history.assert_safe()
    finally:
        stop.set()
        await cluster.stop()
