"""``hiertrain bench fleet-planner``: the fleet planner on random heterogeneous fleets.

- exactness: small fleets (1-3 devices, 1-4 units) against brute force;
- speed and quality: 4x8, 8x12 and 16x20 (devices x units) within the planning budget, the
  plan's iteration time against every baseline (EdgeSplit's alternating algorithm, all-local,
  all-edge, all-cloud, per-device HierTrain), all under the same cost model
  (:mod:`hiertrain.planner.fleet`). A PNG of the speedups beside the JSON.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path
from typing import Any

from hiertrain.planner import fleet as F
from hiertrain.planner import fleetpolicies as FP

SIZES = ((4, 8), (8, 12), (16, 20))
BUDGET_S = 0.8  # the search's; with its seeds, under 1 s in all


def bench(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(0)
    small = [F.random_fleet(rng, rng.randint(1, 3), rng.randint(1, 4)) for _ in range(300)]
    equal = sum(abs(F.solve(f).iteration_s - F.brute_force(f).iteration_s) <= 1e-9 * F.brute_force(f).iteration_s
                for f in small)
    rows = []
    for devices, units in SIZES:
        for seed in range(args.repeat):
            fleet = F.random_fleet(random.Random(1000 * devices + seed), devices, units)
            t0 = time.perf_counter()
            plan = F.solve(fleet, budget_s=BUDGET_S)
            solve_s = time.perf_counter() - t0
            others = {p: FP.baseline(fleet, p).iteration_s for p in FP.POLICIES[1:]}
            rows.append({"devices": devices, "units": units, "seed": seed, "solve_s": round(solve_s, 3),
                         "optimal": plan.parts["optimal"], "iteration_s": plan.iteration_s,
                         "baselines_s": others,
                         "speedup": {p: round(t / plan.iteration_s, 3) for p, t in others.items()}})
    summary = {f"{d}x{u}": {
        "solve_s_max": max(r["solve_s"] for r in rows if (r["devices"], r["units"]) == (d, u)),
        "proved_optimal": sum(r["optimal"] for r in rows if (r["devices"], r["units"]) == (d, u)),
        "speedup_median": {p: statistics.median(r["speedup"][p] for r in rows if (r["devices"], r["units"]) == (d, u))
                           for p in FP.POLICIES[1:]},
        "never_worse": all(min(r["speedup"].values()) >= 1 - 1e-9 for r in rows if (r["devices"], r["units"]) == (d, u)),
    } for d, u in SIZES}
    result = {"bench": "fleet-planner", "budget_s": BUDGET_S,
              "exact": {"instances": len(small), "equal_to_brute_force": int(equal)},
              "summary": summary, "rows": rows}
    if args.out:
        _plot(result, Path(args.out).with_suffix(".png"))
    return result


def _plot(result: dict[str, Any], path: Path) -> None:
    from hiertrain.bench.plot import bars

    sizes = list(result["summary"])
    bars(path, [f"{s} (devices x units)" for s in sizes],
         {p: [result["summary"][s]["speedup_median"][p] for s in sizes] for p in FP.POLICIES[1:]},
         ylabel="baseline's time / hiertrain's (median)", log=True,
         title=f"fleet planner against the baselines, planned within {result['budget_s']:g} s")
