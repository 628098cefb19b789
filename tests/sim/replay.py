"""Replay one simulation from its seed: ``python -m tests.sim.replay SEED [--harsh]``."""

from __future__ import annotations

import argparse
import sys

from tests.sim.checker import SafetyViolation
from tests.sim.cluster import Faults, Simulation
from tests.sim.test_sweep import HARSH


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("seed", type=int)
    p.add_argument("--harsh", action="store_true", help="the harsh fault profile")
    p.add_argument("--nodes", type=int, default=3)
    args = p.parse_args()
    sim = Simulation(args.seed, nodes=args.nodes, faults=HARSH if args.harsh else Faults())
    try:
        sim.run()
    except SafetyViolation as exc:
        print(f"violation at step {sim.now}: {exc}")
        return 1
    applied = {i: n.app.index for i, n in sim.nodes.items()}
    print(f"seed {args.seed}: safe; {len(sim.ops)} ops, applied {applied}, {sim.now} steps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
