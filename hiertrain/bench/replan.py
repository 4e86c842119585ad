"""``hiertrain bench replan``: live re-planning when a link drops mid-run.

On the emulated testbed, with the calibrated profile and quotas of an earlier ``bench testbed``
run (``--from``), the planner service runs in the edge namespace and plans from telemetry alone
(it starts from the nominal rates). After ``--count`` iterations the rate of ``--link`` (edge-cloud
by default; the other link keeps the source run's first rate) is changed live with tc (``--points
5,1.5``: before, after); the run continues for ``2 * --count`` iterations. Reported: when the drop
happened, when a tier's telemetry first showed it, when the planner published a new schedule and
from which iteration it was in effect, and the settled time per iteration against the new optimum
(predicted, and as measured by ``bench testbed`` where it ran at the new rates). Pick rates whose
optima differ in placement (the report says so when they do not: there is then nothing to re-plan).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from hiertrain.bench.plot import axes
from hiertrain.errors import ConfigError


def bench(args: argparse.Namespace) -> dict[str, Any]:
    from hiertrain.bench.testbed import _floats, calibrated_source, emulated_job
    from hiertrain.schedule import Schedule
    from hiertrain.planner.baselines import plan
    from hiertrain.planner.costmodel import Bandwidth

    source, profile = calibrated_source(args)
    before, after = (_floats(args.points) + [0, 0])[:2]
    if not after:
        raise ConfigError(f"--points must give two rates of --link {args.link}: before,after")
    link, quotas, batch, per = args.link, source["emulation"]["quotas"], source["batch"], args.count
    fixed = {"device_edge": source["bw_device_edge"], "edge_cloud": source["rows"][0]["bw_edge_cloud"]}
    rates = {"before": {**fixed, link: before}, "after": {**fixed, link: after}}
    optimum = plan(profile, Bandwidth(**rates["after"]), batch, cost_model="calibrated")
    with tempfile.TemporaryDirectory(prefix="hiertrain-replan-") as d:
        work = Path(d)
        (work / "profile.json").write_text(json.dumps(profile.to_json()))
        first = rates["before"]
        with emulated_job(work, model=profile.model, batch=batch, quotas=quotas, bw_device_edge=first["device_edge"],
                          bw_edge_cloud=first["edge_cloud"], dilation=source["emulation"].get("dilation")) as (net, c):
            c.start_planner(work / "profile.json", bw_device_edge=first["device_edge"],
                            bw_edge_cloud=first["edge_cloud"], cost_model="calibrated")
            c.start()
            c.wait_iteration(per - 1, timeout=3600)
            net.shape(link, after)
            t_drop = time.time()
            drop_iteration = max(p["iteration"] for _, p in c.telemetry if "loss" in p) + 1
            c.wait_iteration(drop_iteration + 2 * per, timeout=3600)
            c.pump(0.5)
    ends = sorted((p["iteration"], p["t"]) for _, p in c.telemetry if "loss" in p)
    versions = c.versions()
    # the tiers name a link by who sent on it: samples the edge passes on to the cloud read "device_cloud"
    names = {"edge_cloud": ("edge_cloud", "device_cloud"), "device_edge": ("device_edge",)}[link]
    noticed = min((p["t"] for _, p in c.telemetry if p["t"] > t_drop
                   and min((p.get("links", {}).get(n, 1e9) for n in names)) < 0.8 * before), default=None)
    result = {
        "bench": "replan", "model": profile.model, "batch": batch, "link": link, "rates_before": rates["before"],
        "rates_after": rates["after"], "before": before, "after": after,
        "drop_iteration": drop_iteration, "first_telemetry_after_drop_s": round(noticed - t_drop, 3) if noticed else None,
        "schedules": [Schedule.from_json(s).to_json() for s in c.schedules],
        "optimum_after_predicted_s": round(optimum.iteration_s, 4),
        "optimum_after_measured_s": min((r["measured_s"] for r in source["rows"] if r["phase"] == "sweep"
                                         and (source["bw_device_edge"], r["bw_edge_cloud"])
                                         == (rates["after"]["device_edge"], rates["after"]["edge_cloud"])
                                         and r["measured_s"]), default=None),
        "optimum_after_plan": optimum.describe(),
        "timeline": [{"iteration": i, "t": round(t - ends[0][1], 3), "seconds": round(t - t0, 4),
                      "version": versions.get(i)} for (i, t), (_, t0) in zip(ends[1:], ends)],
    }
    result.update(analyse(result))
    if args.out:
        plot(result, Path(args.out).with_suffix(".png"))
    return result


def _placement(plan: dict[str, Any]) -> str:
    from hiertrain.schedule import Schedule

    return Schedule.from_json(plan).describe().split(": ", 1)[1].rsplit(";", 1)[0]


def analyse(result: dict[str, Any]) -> dict[str, Any]:
    """Derived figures from a run's raw record (pure): when a schedule with a new placement took
    effect, how long its first iteration took (weights moving to their new owner), and where the
    iteration time settled against the best time measured at the new rate in the sweep."""
    first = result["schedules"][0]
    moved = next((s for s in result["schedules"] if _placement(s) != _placement(first)), None)
    versions = {r["iteration"]: r["version"] for r in result["timeline"]}
    start = min((i for i, v in versions.items() if moved and v is not None and v >= moved["version"]), default=None)
    handover = next((r["seconds"] for r in result["timeline"] if r["iteration"] == start), None)
    settled = [r["seconds"] for r in result["timeline"] if start is not None and r["iteration"] >= start + 2]
    settled_s = round(statistics.median(settled), 4) if settled else None
    ref = result["optimum_after_measured_s"]
    return {"replans": len(result["schedules"]) - 1,
            "new_placement_version": moved["version"] if moved else None,
            "new_placement_published_for_iteration": moved["effective_iteration"] if moved else None,
            "new_placement_in_effect_at": start,
            "iterations_from_drop_to_new_placement": (start - result["drop_iteration"]) if start is not None else None,
            "handover_iteration_s": handover, "settled_s": settled_s,
            "settled_over_optimum": round(settled_s / ref, 3) if settled_s and ref else None}


def plot(result: dict[str, Any], path: Path) -> None:
    tl = result["timeline"]
    with axes(path, (6.5, 3.5)) as ax:
        if ax is None:
            return
        ax.plot([r["iteration"] for r in tl], [r["seconds"] for r in tl], "o-", ms=3, label="measured")
        link = result["link"].replace("_", "-")
        ax.axvline(result["drop_iteration"], color="red", ls="--", label=f"{link} {result['before']} -> {result['after']} Mbit/s")
        if result["new_placement_in_effect_at"] is not None:
            ax.axvline(result["new_placement_in_effect_at"], color="green", ls=":", label="new placement in effect")
        if result["optimum_after_measured_s"]:
            ax.axhline(result["optimum_after_measured_s"], color="gray", ls="-.", label="best measured at the new rate (sweep)")
        else:
            ax.axhline(result["optimum_after_predicted_s"], color="gray", ls="-.", label="predicted optimum at the new rate")
        ax.set_yscale("log")
        ax.set_xlabel("iteration")
        ax.set_ylabel("s per iteration")
        ax.set_title(f"live re-planning, {result['model']}, B = {result['batch']}", fontsize=10)
        ax.legend(fontsize=7)
