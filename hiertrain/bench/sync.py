"""``hiertrain bench sync --data D.npz``: exact mode, periodic sync and FedAvg on the fleet testbed, to accuracy.

N devices (Pi 3-, Pi 4- and Jetson-class CPU quotas in turn, their radios shaped, one medium to the
edge, :class:`hiertrain.lab.testbed.FleetTestbed`) train LeNet-5 on their shards of a real data set
(``--data``: an .npz whose first HOLDOUT samples the edge scores on, never trained), ``--count``
steps per mode:

- **exact**: the fleet planner's plan, one SGD step over every device's samples per step;
- **periodic K** (each K of ``--every``): the planner's plan with each device's weights charged once
  every K steps, the devices training their own copies, averaged every K steps;
- **fedavg K** (the largest K): every device trains the whole model on its own (all-local) and the
  copies are averaged every K steps: FedAvg, averaged at the edge.

Each row keeps the measured seconds per step (the mean over every step, ``mean_s``: a periodic
mode's weights travel in one step of K, which a median would hide; and the median after WARMUP), the
planner's prediction (its mean over K steps), the paths, and held-out accuracy against training wall
time (the steps' own seconds, scoring excluded): the JSON's curves and the PNG.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path
from typing import Any, Optional

from hiertrain.bench.plot import axes
from hiertrain.errors import ConfigError

WARMUP = 3
CLOUD_MBPS = 5.0
HOLDOUT = 297   # digits: 1,797 samples, 1,500 to train on
EVAL_EVERY = 8
TARGETS = (0.7, 0.8, 0.9)


def modes(every: list[int]) -> list[tuple[str, str, Any]]:
    """(name, policy, [fleet] sync) of each run."""
    return [("exact", "hiertrain", "exact"), *((f"periodic {k}", "hiertrain", {"every": k}) for k in every),
            (f"fedavg {max(every)}", "all-local", {"every": max(every)})]


def bench(args: argparse.Namespace) -> dict[str, Any]:
    from hiertrain.demo import fleet_specs
    from hiertrain.lab.cluster import Cluster
    from hiertrain.lab.jobs import Fleet
    from hiertrain.lab.testbed import FleetTestbed

    every, medium, data = arguments(args, "sync")
    count = max(args.count, WARMUP + 3)
    specs = fleet_specs(args.devices or 4, quotas=True)
    lr = args.lr or 0.05
    rows: list[dict[str, Any]] = []
    job = Fleet(specs, model="lenet5", iterations=count, timeout_s=120, medium_mbps=medium, cloud_mbps=CLOUD_MBPS,
                lr=lr, data=data, holdout=HOLDOUT, eval_every=EVAL_EVERY, eval_samples=HOLDOUT)
    with tempfile.TemporaryDirectory(prefix="hiertrain-bench-sync-") as tmp, \
            FleetTestbed({s.name: s.rate_mbps for s in specs}, medium_mbps=medium, bw_edge_cloud=CLOUD_MBPS) as net, \
            Cluster(Path(tmp), job, network=net) as c:
        for name, policy, sync in modes(every):
            job.sync = sync
            job.rerun(c, policy)
            rows.append(row_of(name, c, run(c, name)))
    result = {"bench": "sync", "model": "lenet5", "data": Path(args.data).name, "holdout": HOLDOUT,
              "devices": [{"name": s.name, "samples": s.samples, "radio_mbps": s.rate_mbps, "cores": s.quota,
                           "private": s.private} for s in specs],
              "medium_mbps": medium, "cloud_mbps": CLOUD_MBPS, "steps": count, "lr": lr, "eval_every": EVAL_EVERY,
              "rows": rows}
    if args.out:
        _plot(Path(args.out).with_suffix(".png"), result)
    return result


def arguments(args: argparse.Namespace, which: str) -> tuple[list[int], float, dict[str, Any]]:
    """(the K values of ``--every``, the medium's rate, the ``[data]`` table of ``--data``), or one line saying
    what is wrong."""
    if not args.data or not Path(args.data).is_file():
        raise ConfigError(f"bench {which} needs --data D.npz: a data set for LeNet-5 (x [N, 3, 32, 32], y), e.g. "
                          "scripts/sync.sh writes scikit-learn's digits")
    every = sorted({int(k) for k in str(args.every).split(",")})
    if not every or every[0] < 1:
        raise ConfigError(f"--every {args.every}: expected K values >= 1, e.g. 2,4,8")
    return every, float(str(args.medium).split(",")[0]), {"dataset": "npz", "path": str(Path(args.data).resolve())}


def run(c: Any, name: str, *, started: bool = False) -> list[dict[str, Any]]:
    """One run of the cluster's fleet job (``started``: already), to its end: its step log."""
    from hiertrain.lab.replay import step_log

    names = tuple(c.job.specs)
    if not started:
        c.start("cloud", "edge", *names)
    codes = c.wait(("edge", "cloud", *names), timeout=1800)
    if any(codes.values()):
        raise RuntimeError(f"{name}: exit codes {codes}; edge log:\n" + c.log("edge")[-2000:])
    c.pump()
    return step_log(c)


def row_of(name: str, c: Any, log: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    """A run's row: seconds per step, the plan, held-out accuracy against training wall time (the steps'
    own seconds, and a hierarchical site's waits for the cloud's averages)."""
    wall, curve = 0.0, []
    for r in log:
        wall += r["seconds"] + r.get("average", {}).get("seconds", 0.0)
        accuracy = c.steps.get(r["step"], {}).get("accuracy")
        if accuracy is not None:
            curve.append([round(wall, 4), r["step"], accuracy])
    row = {"mode": name, "policy": log[0]["policy"], "sync": c.job.sync, "mean_s": wall / len(log),
           "measured_s": statistics.median(r["seconds"] for r in log[WARMUP:]),
           "predicted_s": log[0]["predicted_s"], "paths": {n: [m, k] for n, _, _, m, k in log[0]["members"]},
           "wall_s": round(wall, 3), "final_accuracy": curve[-1][2] if curve else None, "curve": curve,
           "time_to": {str(t): _time_to(curve, t) for t in TARGETS}, **extra}
    print(f"{name:16s} {row['mean_s']:.4f} s/step (predicted {row['predicted_s']:.4f}), accuracy "
          f"{row['final_accuracy']} after {wall:.1f} s; paths {row['paths']}", flush=True)
    return row


def _time_to(curve: list[list[float]], target: float) -> Optional[float]:
    """The training wall time at which held-out accuracy first reached ``target`` (None: never)."""
    return next((wall for wall, _, acc in curve if acc >= target), None)


def plot(path: Path, result: dict[str, Any], title: str) -> None:
    """Held-out accuracy against training wall time, a curve per row."""
    with axes(path, (8, 4.5)) as ax:
        if ax is None:
            return
        for r in result["rows"]:
            ax.plot([p[0] for p in r["curve"]], [p[2] for p in r["curve"]], marker=".",
                    label=f"{r['mode']} ({r['mean_s']:.2f} s/step)")
        ax.set_xlabel("training wall time, s (the steps' own seconds)")
        ax.set_ylabel("held-out accuracy")
        ax.set_title(title)
        ax.legend(fontsize=7)


def _plot(path: Path, result: dict[str, Any]) -> None:
    plot(path, result, f"{len(result['devices'])} devices, {result['medium_mbps']:g} Mbit/s medium, "
                       f"LeNet-5 on {result['data']}")
