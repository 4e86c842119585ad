"""``hiertrain bench testbed``: the paper's Fig. 7/8 and 9/10 sweeps on the emulated testbed.

Tiers run in network namespaces joined by tc-shaped veth links (:mod:`hiertrain.testbed`), with
CPU quotas keeping the paper's speed ratios: the cloud gets every core, the edge ``--edge-quota``
of one core, the device ``--device-quota`` (a Raspberry Pi 3 is several times slower than one
NUC core, and the paper's GPU cloud an order of magnitude faster than both). Each tier is
profiled under its emulation first; at every edge-cloud rate each policy's schedule is planned on
that profile, published, and run for ``--count`` iterations; time per iteration is the interval
between worker_o (or a chain's last stage) finishing consecutive iterations.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from hiertrain.errors import ConfigError

POLICIES = ("hiertrain", "all-edge", "all-cloud", "jointdnn", "jointdnn+", "jalad")


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def bench(args: argparse.Namespace) -> dict[str, Any]:
    from hiertrain import testbed
    from hiertrain.demo import profile_tiers
    from hiertrain.local import LocalCluster
    from hiertrain.profile import Profile
    from planner.baselines import plan
    from planner.costmodel import Bandwidth

    why = testbed.available()
    if why:
        raise ConfigError(why)
    points, policies = _floats(args.points), [p for p in args.policies.split(",") if p]
    unknown = set(policies) - set(POLICIES)
    if unknown or not points:
        raise ConfigError(f"policies must be among {', '.join(POLICIES)} and --points a list of Mbit/s")
    quotas = {"device": args.device_quota, "edge": args.edge_quota}
    batch, per, de = args.batch, args.count, 5.0
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="hiertrain-testbed-") as d:
        work = Path(d)
        profile = Profile.load(profile_tiers(args.model, batch, work / "profile.json", quotas=quotas))
        with testbed.Testbed(bw_device_edge=de, bw_edge_cloud=points[0]) as net, \
                LocalCluster(work, model=args.model, batch=batch, iterations=per * len(points) * len(policies),
                             timeout_s=300, chunk_kb=64, network=net, quotas=quotas,
                             threads={"edge": 1, "device": 1, "cloud": 0}) as c:
            version, start = 0, 0
            for bw in points:
                net.shape("edge_cloud", bw)
                for policy in policies:
                    sched = plan(profile, Bandwidth(de, bw), batch, policy=policy)
                    version += 1
                    c.publish(sched.versioned(version, start).to_json())
                    if version == 1:
                        c.start()
                    c.wait_iteration(start + per - 1, timeout=1800)
                    rows.append({"bw_edge_cloud": bw, "policy": policy, "version": version,
                                 "schedule": sched.describe().split(";")[0], "predicted_s": round(sched.iteration_s, 4)})
                    start += per
            codes = c.wait(timeout=600)
            if any(code != 0 for code in codes.values()):
                raise ConfigError(f"testbed run failed: {codes}: {c.log('device')[-400:]}")
            for row in rows:
                t = c.seconds_per_iteration(row["version"])
                row["measured_s"] = round(t, 4) if t is not None else None
    result = {"bench": "testbed", "model": args.model, "batch": batch, "bw_device_edge": de, "quotas": quotas,
              "profile_ms_per_sample": {t: round(1e3 * (sum(v.forward_s) + sum(v.backward_s)), 3)
                                        for t, v in profile.tiers.items()},
              "rows": rows}
    if args.out:
        _plot(result, Path(args.out).with_suffix(".png"))
    return result


def _plot(result: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for policy in dict.fromkeys(r["policy"] for r in result["rows"]):
        mine = [r for r in result["rows"] if r["policy"] == policy and r["measured_s"]]
        line, = ax.plot([r["bw_edge_cloud"] for r in mine], [r["measured_s"] for r in mine], "o-", label=f"{policy}")
        ax.plot([r["bw_edge_cloud"] for r in mine], [r["predicted_s"] for r in mine], ":", color=line.get_color())
    ax.set_xlabel("edge-cloud bandwidth (Mbit/s); device-edge 5 Mbit/s")
    ax.set_ylabel("s per iteration (dotted: predicted)")
    ax.set_title(f"{result['model']}, B = {result['batch']}, emulated testbed", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
