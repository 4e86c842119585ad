"""``hiertrain bench fleet --devices N``: a fleet on the emulated testbed, every policy at several rates.

N devices (Pi 3-, Pi 4- and Jetson-class CPU quotas in turn, their radios shaped) share one medium
to the edge (:class:`hiertrain.lab.testbed.FleetTestbed`); the cloud sits behind a shaped link. At each
medium rate (``--medium``), each policy's plan (the fleet planner's, EdgeSplit's, all-edge,
all-cloud, all-local, per-device HierTrain) is run for ``--count`` steps by the real runtime over
Mosquitto: the row keeps the measured seconds per step (median after WARMUP steps), the planner's
prediction and the paths it chose.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path
from typing import Any

from hiertrain.bench.plot import axes

POLICIES = ("hiertrain", "edgesplit", "all-edge", "all-cloud", "all-local", "per-device-hiertrain")
WARMUP = 3
CLOUD_MBPS = 5.0


def bench(args: argparse.Namespace) -> dict[str, Any]:
    from hiertrain.demo import fleet_specs
    from hiertrain.lab.cluster import Cluster
    from hiertrain.lab.jobs import Fleet
    from hiertrain.lab.testbed import FleetTestbed

    devices = args.devices or 4
    points = [float(p) for p in args.medium.split(",")]
    count = max(args.count, WARMUP + 3)
    specs = fleet_specs(devices, quotas=True)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="hiertrain-bench-fleet-") as tmp, \
            FleetTestbed({s.name: s.rate_mbps for s in specs}, medium_mbps=points[0], bw_edge_cloud=CLOUD_MBPS) as net, \
            Cluster(Path(tmp), Fleet(specs, model=args.model, iterations=count, timeout_s=120, medium_mbps=points[0],
                                     cloud_mbps=CLOUD_MBPS), network=net) as c:
        for medium in points:
            net.shape_medium(medium)
            c.job.describe(medium, CLOUD_MBPS)
            for policy in POLICIES:
                row = {"medium_mbps": medium, "policy": policy, **run_once(c, policy)}
                rows.append(row)
                print(f"{medium:5g} Mbit/s  {policy:22s} measured {row['measured_s']:.4f} s/step, predicted "
                      f"{row['predicted_s']:.4f}; paths {row['paths']}", flush=True)
    summary = _summary(rows, points)
    result = {"bench": "fleet", "model": args.model, "devices": [
        {"name": s.name, "samples": s.samples, "radio_mbps": s.rate_mbps, "cores": s.quota, "private": s.private}
        for s in specs], "cloud_mbps": CLOUD_MBPS, "steps": count, "warmup": WARMUP, "rows": rows, "summary": summary}
    if args.out:
        _plot(Path(args.out).with_suffix(".png"), rows, points)
    return result


def run_once(c: Any, policy: str) -> dict[str, Any]:
    """One run of the testbed's fleet job ``c`` by ``policy`` (or the paths its fleet file pins): the
    measured seconds per step (median after :data:`WARMUP` steps), the prediction and the paths."""
    from hiertrain.lab.replay import step_log

    names = [s.name for s in c.job.devices]
    c.job.rerun(c, policy)
    c.start("cloud", "edge", *names)
    codes = c.wait(("edge", "cloud", *names), timeout=600)
    if any(codes.values()):
        raise RuntimeError(f"{policy}: exit codes {codes}; edge log:\n" + c.log("edge")[-2000:])
    log = step_log(c)
    return {"measured_s": statistics.median(r["seconds"] for r in log[WARMUP:]), "predicted_s": log[0]["predicted_s"],
            "paths": {name: [m, k] for name, _, _, m, k in log[0]["members"]}}


def _summary(rows: list[dict[str, Any]], points: list[float]) -> dict[str, Any]:
    errors = [abs(r["measured_s"] - r["predicted_s"]) / r["measured_s"] for r in rows]
    speedups: dict[str, list[float]] = {}
    slower = []  # (rate, baseline) where hiertrain's plan, a different one, measured slower
    same: dict[str, list[str]] = {}  # rate -> the baselines that chose hiertrain's plan
    for medium in points:
        at = {r["policy"]: r for r in rows if r["medium_mbps"] == medium}
        ours = at["hiertrain"]
        same[str(medium)] = []
        for policy, r in at.items():
            if policy != "hiertrain":
                speedups.setdefault(policy, []).append(r["measured_s"] / ours["measured_s"])
                if ours["paths"] == r["paths"]:
                    same[str(medium)].append(policy)
                elif ours["measured_s"] > r["measured_s"]:
                    slower.append([medium, policy, r["measured_s"] / ours["measured_s"]])
    return {"median_model_error": statistics.median(errors), "max_model_error": max(errors),
            "speedup_over": {p: {"min": min(v), "median": statistics.median(v), "max": max(v)}
                             for p, v in speedups.items()},
            "hiertrain_slower_than": slower, "same_plan_as": same}


def _plot(path: Path, rows: list[dict[str, Any]], points: list[float]) -> None:
    import numpy as np

    with axes(path, (9, 4.5)) as ax:
        if ax is None:
            return
        width = 0.8 / len(POLICIES)
        x = np.arange(len(points))
        for i, policy in enumerate(POLICIES):
            got = [next(r for r in rows if r["policy"] == policy and r["medium_mbps"] == m) for m in points]
            ax.bar(x + i * width, [r["measured_s"] for r in got], width, label=policy)
            ax.scatter(x + i * width, [r["predicted_s"] for r in got], marker="_", color="black", s=120, zorder=3)
        ax.set_xticks(x + width * (len(POLICIES) - 1) / 2, [f"{m:g} Mbit/s" for m in points])
        ax.set_ylabel("seconds per step (bars: measured, ticks: predicted)")
        ax.set_title(f"fleet of {len({d for r in rows for d in r['paths']})} devices on the testbed")
        ax.legend(fontsize=7)
