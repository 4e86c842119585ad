"""``hiertrain bench fleet-planner``: the fleet planner on random heterogeneous fleets.

- exactness: small fleets (1-3 devices, 1-4 units) against brute force;
- speed and quality: 4x8, 8x12 and 16x20 (devices x units) within the planning budget, the
  plan's iteration time against every baseline (EdgeSplit's alternating algorithm, all-local,
  all-edge, all-cloud, per-device HierTrain), all under the same cost model
  (:mod:`hiertrain.planner.fleet`). A PNG of the speedups beside the JSON.
- at scale (``--edges E --devices N``, :func:`scale`): N devices over E edge servers, each edge's fleet
  planned on its own (as each edge's coordinator does), and how plan time, the predicted step (and
  the fluid simulation's) and the bytes on each link grow with the devices on one edge. Goal: a
  100-device edge planned in <= 1 s, never worse than a baseline. What no edge's planner models: the
  cloud shared by the edges (its compute, and a WAN the edges share) - each edge sees a cloud of its own.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path
from typing import Any

from hiertrain.bench import sized
from hiertrain.errors import ConfigError
from hiertrain.planner import fleet as F
from hiertrain.planner import fleetpolicies as FP

SIZES = ((4, 8), (8, 12), (16, 20))
BUDGET_S = 0.8  # the search's; with its seeds, under 1 s in all


PER_EDGE = (10, 25, 50, 100)
SCALE_UNITS = 20
GOAL_DEVICES, GOAL_S = 100, 1.0
LONG_S = 10.0  # a search this long: how far the budget's plan is from what more time finds


def bench(args: argparse.Namespace) -> dict[str, Any]:
    if getattr(args, "edges", None):
        return scale(args)
    rng = random.Random(0)
    small = [F.random_fleet(rng, rng.randint(1, 3), rng.randint(1, 4)) for _ in range(sized(args, 300, 20))]
    equal = sum(abs(F.solve(f).iteration_s - F.brute_force(f).iteration_s) <= 1e-9 * F.brute_force(f).iteration_s
                for f in small)
    rows = []
    sizes = sized(args, SIZES, SIZES[:1])
    for devices, units in sizes:
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
    } for d, u in sizes}
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


# ------------------------------------------------------------------------------ at scale

def link_bytes(fleet: F.Fleet, paths: list[F.Path]) -> dict[str, float]:
    """Bytes per step on the shared device-edge medium and on the edge-cloud link under ``paths``."""
    medium = sum(sum(F.device_bytes(fleet, d, p.m)) for d, p in zip(fleet.devices, paths))
    wan = sum(F.cloud_bytes(fleet, d, p.k) for d, p in zip(fleet.devices, paths))
    return {"device_edge": medium, "edge_cloud": wan + F.sync_bytes(fleet, min((p.k for p in paths), default=fleet.units))}


def _planned(fleet: F.Fleet, long_s: float = 0.0) -> dict[str, Any]:
    """One edge's fleet planned as its coordinator plans it, against every baseline (and a search
    of ``long_s``)."""
    from hiertrain.planner.fleetsim import simulated_time

    t0 = time.perf_counter()
    plan = F.solve(fleet, budget_s=BUDGET_S)
    solve_s = time.perf_counter() - t0
    others = {}
    for p in FP.POLICIES[1:]:
        t0 = time.perf_counter()
        others[p] = (FP.baseline(fleet, p).iteration_s, time.perf_counter() - t0)
    return {"devices": len(fleet.devices), "solve_s": round(solve_s, 3), "optimal": plan.parts["optimal"],
            "iteration_s": plan.iteration_s, "simulated_s": simulated_time(fleet, list(plan.paths)),
            "baselines_s": {p: t for p, (t, _) in others.items()},
            "baseline_solve_s": {p: round(s, 3) for p, (_, s) in others.items()},
            "never_worse": all(t >= plan.iteration_s * (1 - 1e-9) for t, _ in others.values()),
            "bytes": link_bytes(fleet, list(plan.paths)),
            "paths_on_device": sum(p.m == fleet.units for p in plan.paths),
            "paths_raw_up": sum(p.m == 0 for p in plan.paths)} | (
        {"long_iteration_s": (long := F.solve(fleet, budget_s=long_s)).iteration_s, "long_optimal": long.parts["optimal"],
         "gap_to_long": plan.iteration_s / long.iteration_s - 1} if long_s else {})


def scale(args: argparse.Namespace) -> dict[str, Any]:
    edges = args.edges
    if args.devices < edges:
        raise ConfigError(f"--devices {args.devices} over --edges {edges}: every edge needs at least one device")
    sizes = [args.devices // edges + (e < args.devices % edges) for e in range(edges)]
    growth, per_edge, long_s = [], sized(args, PER_EDGE, PER_EDGE[:1]), sized(args, LONG_S, 1.0)
    for n in per_edge:
        for seed in range(args.repeat):
            growth.append(_planned(F.random_fleet(random.Random(7000 + 100 * n + seed), n, SCALE_UNITS), long_s))
            print(f"{n:4d} devices on an edge (seed {seed}): planned in {growth[-1]['solve_s']:.2f} s, "
                  f"{growth[-1]['iteration_s']:.3f} s/step, {100 * growth[-1]['gap_to_long']:.1f}% over a "
                  f"{long_s:g} s search", flush=True)
    sites = []
    for e, n in enumerate(sizes):
        sites.append(_planned(F.random_fleet(random.Random(9000 + e), n, SCALE_UNITS)))
    goal = [r for r in growth if r["devices"] == GOAL_DEVICES]
    by_n = {str(n): _growth_row([r for r in growth if r["devices"] == n]) for n in per_edge}
    result = {"bench": "fleet-planner-scale", "budget_s": BUDGET_S, "long_s": long_s, "units": SCALE_UNITS,
              "repeat": args.repeat,
              "growth": by_n, "deployment": {
                  "devices": sum(sizes), "edges": edges, "per_edge": sizes[0] if len(set(sizes)) == 1 else sizes,
                  "plan_s_max": max(r["solve_s"] for r in sites), "plan_s_total": sum(r["solve_s"] for r in sites),
                  "step_s_median": statistics.median(r["iteration_s"] for r in sites),
                  "step_s_max": max(r["iteration_s"] for r in sites),
                  "simulated_s_median": statistics.median(r["simulated_s"] for r in sites),
                  "medium_mb_per_step_total": sum(r["bytes"]["device_edge"] for r in sites) / 1e6,
                  "wan_mb_per_step_total": sum(r["bytes"]["edge_cloud"] for r in sites) / 1e6,
                  "never_worse": all(r["never_worse"] for r in sites)},
              "goal": {"devices": GOAL_DEVICES, "plan_s": GOAL_S},
              "meets_goal": all(r["solve_s"] <= GOAL_S and r["never_worse"] for r in goal) if goal else None,
              "rows": growth, "sites": sites}
    if args.out:
        _plot_scale(result, Path(args.out).with_suffix(".png"))
    return result


def _growth_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The figures of one fleet size over its seeds."""
    med = statistics.median
    return {**{k: med(r[k] for r in rows) for k in ("solve_s", "iteration_s", "simulated_s")},
            "solve_s_max": max(r["solve_s"] for r in rows),
            "medium_mb": med(r["bytes"]["device_edge"] for r in rows) / 1e6,
            "wan_mb": med(r["bytes"]["edge_cloud"] for r in rows) / 1e6,
            "never_worse": all(r["never_worse"] for r in rows),
            "gap_to_long_max": max(r["gap_to_long"] for r in rows),
            "optimal": sum(r["optimal"] for r in rows),
            "speedup_over_edgesplit": med(r["baselines_s"]["edgesplit"] / r["iteration_s"] for r in rows)}


def _plot_scale(result: dict[str, Any], path: Path) -> None:
    from hiertrain.bench.plot import axes

    ns = [int(n) for n in result["growth"]]
    with axes(path, (7.5, 3.6)) as ax:
        if ax is None:
            return
        g = result["growth"]
        ax.plot(ns, [g[str(n)]["solve_s_max"] for n in ns], "o-", label="plan time, worst (s)")
        ax.plot(ns, [g[str(n)]["iteration_s"] for n in ns], "s-", label="predicted step, median (s)")
        ax.plot(ns, [g[str(n)]["simulated_s"] for n in ns], "^--", label="simulated step, median (s)")
        ax.axhline(result["goal"]["plan_s"], color="grey", lw=0.8, ls=":")
        ax.set_xlabel("devices on one edge server")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(ns, [str(n) for n in ns])
        d = result["deployment"]
        ax.set_title(f"fleet planner at scale ({result['units']} units); {d['devices']} devices over {d['edges']} edges: "
                     f"plans <= {d['plan_s_max']:.2f} s each", fontsize=9)
        ax.legend(fontsize=8)
