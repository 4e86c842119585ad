"""``hiertrain bench energy``: seconds against joules per step for the fleet testbed's devices.

The fleet is the one ``bench fleet`` runs (:func:`hiertrain.demo.fleet_specs`: Pi 3-, Pi 4- and
Jetson-class devices by CPU quota, their radios, the shared medium), its timings measured here as the
testbed measures them (each device class under its CPU quota, where cgroups can be set), each
device drawing its class's power (:data:`hiertrain.power.CLASSES`). At each medium rate:

- **the Pareto front** of plans: for deadlines swept from the fastest plan's seconds to those of the
  plan that spends least, the plan of least device joules within each (:func:`hiertrain.planner.fleetenergy.fleet_energy`,
  exact), its seconds and the devices' joules per step;
- **a budgeted plan**: the fastest with no device above a budget halfway between the most one device
  spends in the fastest plan and in the least-energy one (:func:`~hiertrain.planner.fleetenergy.fleet_budget`);
- **every policy's plan** (the time-optimal one, EdgeSplit's, per-device HierTrain, all-edge, all-cloud,
  all-local), predicted seconds and modeled joules; with ``--from`` a ``bench fleet`` JSON of the same
  testbed, also each policy's *measured* seconds there and its joules at those seconds;
- **the saving at equal deadline**: against EdgeSplit's and per-device HierTrain's plans, the least
  device joules of a plan no slower than theirs.

- **a paced plan**: each device's average watts capped halfway between its idle draw and what it draws
  in the fastest plan (a budget per hour), the step paced to keep them (:func:`~hiertrain.planner.fleetenergy.fleet_budget`).

With ``--testbed`` (root) every plan above is also *run* on the fleet testbed (:func:`on_testbed`): its
measured seconds per step, and the saving at equal deadline measured, run against run. The joules are
the power model's everywhere (these machines have no RAPL, and the devices are emulated), at the
measured seconds where there are some.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from hiertrain.bench import quick
from hiertrain.bench.plot import axes

BASELINES = ("hiertrain", "edgesplit", "per-device-hiertrain", "all-edge", "all-cloud", "all-local")
SWEEP = 12


def testbed_fleet(model: str, devices: int, medium_mbps: float, cloud_mbps: float, work: Path, *,
                  quotas: bool = True) -> tuple[Any, str, tuple[Path, dict]]:
    """The testbed's fleet with measured timings and each device's class's power model, how the
    device timings were had (measured under CPU quotas, or not: no cgroups here), and the profiles
    (the servers', each quota's device's: a testbed run plans from the same)."""
    from hiertrain.demo import fleet_specs
    from hiertrain.lab import cgroup
    from hiertrain.lab.jobs import measure_profiles
    from hiertrain.planner import fleetfile as FF
    from hiertrain.power import CLASSES
    from hiertrain.profile import Profile

    quotas = quotas and cgroup.available() is None
    specs = fleet_specs(devices, quotas=quotas)
    servers, per_quota = measure_profiles(model, max(1, 16 // devices), work, {s.quota for s in specs})
    rows = [(s.name, Profile.load(per_quota[s.quota]), s.samples, s.rate_mbps, s.private, CLASSES[s.name.split("-")[0]])
            for s in specs]
    fleet = FF.from_profiles(Profile.load(servers), rows, medium_mbps=medium_mbps, cloud_mbps=cloud_mbps)
    return fleet, "measured under each class's CPU quota" if quotas else "measured at full speed (no cgroups here)", \
        (servers, per_quota)


def devices_j(fleet: Any, plan: Any) -> tuple[float, float]:
    """(the devices' joules per step, the most any one device spends)."""
    from hiertrain.planner.fleetenergy import fleet_joules

    j = fleet_joules(fleet, plan)
    per = [j[d.name] for d in fleet.devices]
    return sum(per), max(per)


def _point(fleet: Any, plan: Any) -> dict[str, Any]:
    total, most = devices_j(fleet, plan)
    return {"seconds": plan.iteration_s, "devices_j": total, "max_device_j": most,
            "optimal": plan.parts.get("optimal", True),
            "paths": {d.name: [p.m, p.k] for d, p in zip(fleet.devices, plan.paths)}}


def front(fleet: Any) -> list[dict[str, Any]]:
    """The time/energy Pareto front: the least-energy plan within each of :data:`SWEEP` deadlines from
    the fastest plan's seconds to those of the plan that spends least (exact), dominated ones dropped."""
    from hiertrain.planner import fleet as F
    from hiertrain.planner.fleetenergy import fleet_energy

    fastest, thrifty = F.solve(fleet), fleet_energy(fleet)
    points = []
    for i in range(SWEEP + 1):
        deadline = fastest.iteration_s * (thrifty.iteration_s / fastest.iteration_s) ** (i / SWEEP)
        points.append({"deadline_s": deadline, **_point(fleet, fleet_energy(fleet, deadline * (1 + 1e-9)))})
    kept: list[dict[str, Any]] = []
    for p in sorted(points, key=lambda p: (p["seconds"], p["devices_j"])):
        if not kept or p["devices_j"] < kept[-1]["devices_j"] * (1 - 1e-9):
            kept.append(p)
    return kept


def budgeted(fleet: Any, budget_j: float) -> dict[str, Any]:
    """The fastest plan with no device above ``budget_j`` per step."""
    from hiertrain.planner.fleetenergy import fleet_budget

    return {"budget_j": budget_j, **_point(fleet, fleet_budget(fleet, {d.name: budget_j for d in fleet.devices}))}


def bench(args: argparse.Namespace) -> dict[str, Any]:
    points = [float(p) for p in args.medium.split(",")]
    measured = json.loads(Path(args.source).read_text()) if args.source else None
    cloud = measured["cloud_mbps"] if measured else 5.0
    with tempfile.TemporaryDirectory(prefix="hiertrain-bench-energy-") as tmp:
        base, timings, profiles = testbed_fleet(args.model, args.devices or 4, points[0], cloud, Path(tmp),
                                                quotas=not quick(args) or args.testbed)  # quick: at full speed
        rows = _rows(base, points, measured, cloud)
        if args.testbed:
            on_testbed(args, base, profiles, rows, Path(tmp))
    result = {"bench": "energy", "model": args.model, "device_timings": timings, "cloud_mbps": cloud,
              "devices": [{"name": d.name, "samples": d.samples, "radio_mbps": d.rate_mbps, "private": d.private,
                           "power": d.power.to_json()} for d in base.devices],
              "measured_from": args.source, "rows": rows, "summary": _summary(rows)}
    if args.out:
        _plot(Path(args.out).with_suffix(".png"), rows)
    return result


def _rows(base: Any, points: list[float], measured: Any, cloud: float) -> list[dict[str, Any]]:
    """Each medium rate's front, policies, savings at equal deadline, budgeted and paced plans (the cost
    model's seconds; with ``measured``, a bench fleet's measured seconds of each policy beside)."""
    from hiertrain.errors import PlanError
    from hiertrain.planner import fleet as F
    from hiertrain.planner import fleetpolicies as FP
    from hiertrain.planner.fleetenergy import fleet_budget, fleet_energy, fleet_joules

    rows = []
    for medium in points:
        fleet = replace(base, medium_mbps=medium)
        policies = {}
        for policy in BASELINES:
            plan = FP.baseline(fleet, policy)
            total, most = devices_j(fleet, plan)
            joules = fleet_joules(fleet, plan)
            row = {"seconds": plan.iteration_s, "devices_j": total, "max_device_j": most,
                   "joules": {d.name: joules[d.name] for d in fleet.devices},
                   "paths": {d.name: [p.m, p.k] for d, p in zip(fleet.devices, plan.paths)}}
            ran = next((r for r in (measured or {}).get("rows", []) if r["medium_mbps"] == medium
                        and r["policy"] == policy), None)
            if ran is not None:  # what the testbed measured for this policy, its joules at those seconds
                paths = [F.Path(*ran["paths"][d.name]) for d in fleet.devices]
                at = replace(F.plan_of(policy, fleet, paths), iteration_s=ran["measured_s"])
                row["measured"] = {"seconds": ran["measured_s"], "devices_j": devices_j(fleet, at)[0],
                                   "paths": ran["paths"]}
            policies[policy] = row
        saving = {}
        for policy in ("edgesplit", "per-device-hiertrain"):
            ours = _point(fleet, fleet_energy(fleet, policies[policy]["seconds"] * (1 + 1e-9)))
            saving[policy] = {"deadline_s": policies[policy]["seconds"], "theirs_j": policies[policy]["devices_j"],
                              "ours": ours, "saving": 1 - ours["devices_j"] / policies[policy]["devices_j"]}
        pareto = front(fleet)
        # the budget objective: no device above half of what the most-spending one spends in the fastest plan
        cap = 0.5 * policies["hiertrain"]["max_device_j"] + 0.5 * max(p["max_device_j"] for p in pareto[-1:])
        try:
            within = budgeted(fleet, cap)
        except PlanError as exc:
            within = {"budget_j": cap, "error": str(exc)}
        # average watts (a budget per hour): each device's halfway between its idle draw and what it draws
        # in the fastest plan; the step is paced to keep them
        fastest = policies["hiertrain"]
        watts = {d.name: d.power.idle_w + 0.5 * (fastest["joules"][d.name] / fastest["seconds"] - d.power.idle_w)
                 for d in fleet.devices}
        pace = fleet_budget(fleet, {}, watts=watts)
        paced = {"budget_w": watts, **_point(fleet, pace), "pace_s": pace.parts.get("pace_s", 0.0)}
        rows.append({"medium_mbps": medium, "front": pareto, "policies": policies, "saving_at_equal_deadline": saving,
                     "budgeted": within, "paced": paced})
        line = ", ".join(f"{p}: {s['saving']:.1%} less at {s['deadline_s']:.3f} s" for p, s in saving.items())
        print(f"{medium:5g} Mbit/s: front of {len(pareto)} plans from {pareto[0]['seconds']:.3f} s / "
              f"{pareto[0]['devices_j']:.2f} J to {pareto[-1]['seconds']:.3f} s / {pareto[-1]['devices_j']:.2f} J; "
              f"{line}", flush=True)
    return rows


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The least and most saving against each baseline over the rates, predicted and (run) measured."""
    out: dict[str, Any] = {}
    for key, where in (("predicted", "saving_at_equal_deadline"), ("measured", "measured_saving")):
        for p in ("edgesplit", "per-device-hiertrain"):
            got = [r[where][p]["saving"] for r in rows if p in r.get(where, {})]
            if got:
                out.setdefault(key, {})[p] = {"min": min(got), "max": max(got)}
    return out


def on_testbed(args: argparse.Namespace, base: Any, profiles: tuple[Path, dict], rows: list[dict[str, Any]],
               work: Path) -> None:
    """Each rate's plans *run* on the fleet testbed (real runtime over Mosquitto, devices under their
    class's CPU quota, radios and the medium shaped): the time-optimal, EdgeSplit's and per-device
    HierTrain's plans, every plan of the front (pinned in the fleet file), the budgeted plan and the
    paced one (the fleet file giving each device its power class and budget: the coordinator plans
    them). Each run's measured seconds per step and the devices' joules at those seconds go in
    ``row["runs"]``; ``row["measured_saving"]``: against EdgeSplit's and per-device HierTrain's runs,
    the least device joules of a run no slower than theirs."""
    from hiertrain.bench.fleet import run_once
    from hiertrain.demo import fleet_specs
    from hiertrain.lab.cluster import Cluster
    from hiertrain.lab.jobs import Fleet
    from hiertrain.lab.testbed import FleetTestbed
    from hiertrain.planner import fleet as F

    specs = fleet_specs(len(base.devices), quotas=True)
    first = rows[0]["medium_mbps"]
    with FleetTestbed({s.name: s.rate_mbps for s in specs}, medium_mbps=first, bw_edge_cloud=base.cloud_mbps) as net, \
            Cluster(work / "testbed", Fleet(specs, model=args.model, iterations=args.count, timeout_s=120,
                                            medium_mbps=first, cloud_mbps=base.cloud_mbps, profiles=profiles),
                    network=net) as c:
        for row in rows:
            medium = row["medium_mbps"]
            net.shape_medium(medium)
            fleet = replace(base, medium_mbps=medium)
            power = {d.name: {"power": d.power.name} for d in fleet.devices}
            runs: list[dict[str, Any]] = []

            def run(label: str, keys: dict[str, dict[str, Any]], policy: str = "hiertrain") -> None:
                c.job.describe(medium, base.cloud_mbps, {n: {**power[n], **keys.get(n, {})} for n in power})
                got = run_once(c, policy)
                plan = F.plan_of(label, fleet, [F.Path(*got["paths"][d.name]) for d in fleet.devices])
                total, most = devices_j(fleet, replace(plan, iteration_s=got["measured_s"]))
                runs.append({"label": label, **got, "devices_j": total, "max_device_j": most})
                print(f"{medium:5g} Mbit/s  {label:22s} measured {got['measured_s']:.4f} s/step (predicted "
                      f"{got['predicted_s']:.4f}), {total:.3f} J on the devices; paths {got['paths']}", flush=True)

            for policy in ("hiertrain", "edgesplit", "per-device-hiertrain"):
                run(policy, {}, policy)
            for i, point in enumerate(row["front"]):
                if all(r["paths"] != point["paths"] for r in runs):
                    run(f"front {i}", {n: {"path": p} for n, p in point["paths"].items()})
            if "error" not in row["budgeted"]:
                run("budget_j", {n: {"budget_j": row["budgeted"]["budget_j"]} for n in power})
            run("budget_w", {n: {"budget_w": w} for n, w in row["paced"]["budget_w"].items()})
            c.job.describe(medium, base.cloud_mbps)
            row["runs"] = runs
            row["measured_saving"] = measured_saving(runs, sum(d.power.idle_w for d in fleet.devices))


def measured_saving(runs: list[dict[str, Any]], idle_w: float) -> dict[str, Any]:
    """Against EdgeSplit's and per-device HierTrain's runs, the least device joules of a plan run no
    slower than theirs. Runs of the same paths are one plan, at the median of their seconds (a plan is
    not credited for the noise between two runs of it; the paced run is a plan of its own); its joules
    there are a run's plus the devices' idle draw (``idle_w``, summed) over the difference."""
    plans: dict[str, dict[str, Any]] = {}
    for r in runs:
        key = json.dumps([r["paths"], r["label"] == "budget_w"], sort_keys=True)
        p = plans.setdefault(key, {"labels": [], "runs_s": [], "paths": r["paths"]})
        p["labels"].append(r["label"])
        p["runs_s"].append(r["measured_s"])
        p["measured_s"] = statistics.median(p["runs_s"])
        p["devices_j"] = r["devices_j"] + idle_w * (p["measured_s"] - r["measured_s"])
    out = {}
    for policy in ("edgesplit", "per-device-hiertrain"):
        theirs = next((p for p in plans.values() if policy in p["labels"]), None)
        if theirs is None:
            continue
        ours = min((p for p in plans.values() if p["measured_s"] <= theirs["measured_s"]), key=lambda p: p["devices_j"])
        out[policy] = {"deadline_s": theirs["measured_s"], "theirs_j": theirs["devices_j"], "ours": ours,
                       "saving": 1 - ours["devices_j"] / theirs["devices_j"]}
    return out


def _plot(path: Path, rows: list[dict[str, Any]]) -> None:
    with axes(path, (5 * len(rows), 4.2)) as ax:
        if ax is None:
            return
        fig = ax.figure
        fig.clear()
        for i, row in enumerate(rows):
            a = fig.add_subplot(1, len(rows), i + 1)
            a.plot([p["seconds"] for p in row["front"]], [p["devices_j"] for p in row["front"]], "o-",
                   label="least energy within a deadline (front)", zorder=3)
            for r in row.get("runs", []):
                a.scatter([r["measured_s"]], [r["devices_j"]], marker="x", color="black")
                a.annotate(r["label"], (r["measured_s"], r["devices_j"]), fontsize=5)
            for policy, r in row["policies"].items():
                a.scatter([r["seconds"]], [r["devices_j"]], marker="s", label=policy)
                if "measured" in r:
                    a.scatter([r["measured"]["seconds"]], [r["measured"]["devices_j"]], marker="x", color="black",
                              label="measured on the testbed" if policy == "hiertrain" else None)
            a.set_xscale("log")
            a.set_yscale("log")
            a.set_xlabel("seconds per step")
            a.set_ylabel("devices' joules per step")
            a.set_title(f"medium {row['medium_mbps']:g} Mbit/s")
            if math.isfinite(row["front"][0]["seconds"]) and i == 0:
                a.legend(fontsize=6)
