"""``hiertrain bench edgecores``: the paper's Fig. 11, iteration time against the edge server's CPU.

The edge gets 1-4 of its emulated cores (``--cores``): its calibrated quota (from the ``--from``
``bench testbed`` JSON) times k, one ORT thread, so k cores compute k times faster - the ideal
case; the paper's Docker CPU limits gave less than that from 3 to 4 cores. The edge is profiled
at each quota first (the planner needs its timings); then, in one job on the testbed, for each
core count and each edge-cloud rate in ``--points`` (paper: 1.5 and 3.5 Mbit/s), hiertrain's plan
under the calibrated model is published and run for ``--count`` iterations, with the edge's quota
changed live.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from hiertrain.bench.plot import axes


def bench(args: argparse.Namespace) -> dict[str, Any]:
    from hiertrain.lab import emulation
    from hiertrain.bench.testbed import Runner, _floats, calibrated_source, emulated_job
    from hiertrain.profile import Profile
    from hiertrain.planner.baselines import plan
    from hiertrain.planner.costmodel import Bandwidth

    source, base = calibrated_source(args)
    quotas, batch, de, per = source["emulation"]["quotas"], source["batch"], source["bw_device_edge"], args.count
    dilation = source["emulation"].get("dilation", {})  # (kernels emulated apart from the interpreter)
    cores = [int(c) for c in _floats(args.cores)]
    points = _floats(args.points)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="hiertrain-edgecores-") as d:
        work = Path(d)
        profiles = {}
        for k in cores:
            path = work / f"edge-{k}.json"
            emulation.profile_tier(base.model, batch, path, "edge", quota=round(quotas["edge"] * k, 4),
                                   dilation=dilation.get("edge", 1.0))
            profiles[k] = base.merged("edge", Profile.load(path))
        with emulated_job(work, model=base.model, batch=batch, quotas=quotas, bw_device_edge=de,
                          bw_edge_cloud=points[0], dilation=dilation) as (net, c):
            runner = Runner(c, net, per)
            for k in cores:
                c.quotas["edge"].set(round(quotas["edge"] * k, 4))
                for bw in points:
                    sched = plan(profiles[k], Bandwidth(de, bw), batch, cost_model="calibrated")
                    version, t, _ = runner.run(sched, {"device_edge": de, "edge_cloud": bw})
                    rows.append({"edge_cores": k, "bw_edge_cloud": bw, "version": version,
                                 "edge_ms_per_sample": round(1e3 * emulation.seconds_per_sample(profiles[k], "edge"), 2),
                                 "schedule": sched.describe().rsplit(";", 1)[0],
                                 "predicted_s": round(sched.iteration_s, 4), "measured_s": t})
    result = {"bench": "edgecores", "model": base.model, "batch": batch, "bw_device_edge": de,
              "edge_quota_per_core": quotas["edge"], "rows": rows}
    if args.out:
        plot(result, Path(args.out).with_suffix(".png"))
    return result


def plot(result: dict[str, Any], path: Path) -> None:
    with axes(path, (6, 3.5)) as ax:
        if ax is None:
            return
        for bw in dict.fromkeys(r["bw_edge_cloud"] for r in result["rows"]):
            mine = [r for r in result["rows"] if r["bw_edge_cloud"] == bw and r["measured_s"]]
            line, = ax.plot([r["edge_cores"] for r in mine], [r["measured_s"] for r in mine], "o-", label=f"edge-cloud {bw} Mbit/s")
            ax.plot([r["edge_cores"] for r in mine], [r["predicted_s"] for r in mine], ":", color=line.get_color())
        ax.set_xlabel("edge server cores (emulated)")
        ax.set_ylabel("s per iteration (dotted: predicted)")
        ax.set_title(f"hiertrain, {result['model']}, B = {result['batch']}", fontsize=10)
        ax.legend(fontsize=7)
