"""``hiertrain bench runtime``: measured iteration times over MQTT against the cost model's prediction.

A :class:`~hiertrain.lab.cluster.Cluster` runs LeNet-5 with emulated tiers (cloud: all cores, edge:
one core, device: one core under a CPU quota as root), profiled first exactly like the demo. One
run walks through several schedules (a new one every ``--count`` iterations). For each, the
measured time per iteration (interval between worker_o finishing consecutive iterations, median
after the switch settles) is compared with the paper's cost model evaluated on the measured profile
and the link rates the tiers measured (loopback here, so transfers are nearly free and what
remains is framework overhead: broker hops, framing, Python, the per-iteration control messages).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path
from typing import Any

from hiertrain import TIERS
from hiertrain.bench import quick, sized
from hiertrain.errors import ConfigError
from hiertrain.lab import cgroup
from hiertrain.profile import Profile
from hiertrain.schedule import Schedule


def _schedules(profile: Profile, batch: int, bw: Any) -> list[Schedule]:
    from hiertrain.planner.baselines import chain_schedule, plan, single_tier

    n, third = profile.n_units, batch // 3
    return [
        single_tier("device", batch, policy="all-device"),
        single_tier("cloud", batch, policy="all-cloud"),
        Schedule(mapping={"o": "cloud", "s": "device", "l": "edge"}, m_s=2, m_l=4, b_o=batch - 2 * third,
                 b_s=third, b_l=third, policy="three-way"),
        plan(profile, bw, batch),
        chain_schedule(("device", "edge", "cloud"), (2, 4), n, batch, policy="jointdnn+"),
    ]


SKIP = 3  # warm-up iterations of each schedule, not measured
MIN_COUNT = 2 * SKIP


def bench(args: argparse.Namespace) -> dict[str, Any]:
    from hiertrain.lab.emulation import profile_tiers
    from hiertrain.lab.cluster import Cluster
    from hiertrain.lab.jobs import ThreeTier
    from hiertrain.planner.costmodel import Bandwidth, iteration_time

    batch, per = 32, sized(args, args.count, 8)
    if per < MIN_COUNT:
        raise ConfigError(f"bench runtime needs --count >= {MIN_COUNT}: each schedule's first {SKIP} iterations are warm-up")
    quota = 0.15 if cgroup.available() is None and not quick(args) else None
    with tempfile.TemporaryDirectory(prefix="hiertrain-bench-") as d:
        work = Path(d)
        profile = Profile.load(profile_tiers("lenet5", batch, work / "profile.json",
                                             quotas={"device": quota} if quota else {}))
        loopback = Bandwidth(1000.0, 1000.0)
        plans = _schedules(profile, batch, loopback)
        with Cluster(work, ThreeTier(batch=batch, iterations=per * len(plans), timeout_s=60),
                     quotas={"device": quota} if quota else None) as c:
            c.publish(plans[0].versioned(1, 0).to_json())
            c.start()
            for k, sched in enumerate(plans[1:], 2):
                c.wait_iteration(per * (k - 1) - per // 2, timeout=300)
                c.publish(sched.versioned(k, per * (k - 1)).to_json())
            codes = c.wait(timeout=300)
            if any(code != 0 for code in codes.values()):
                raise RuntimeError(f"tiers failed: {codes}: {c.log('device')[-500:]}")
            measured = {k: c.seconds_per_iteration(k, skip=SKIP) for k in range(1, len(plans) + 1)}
            links: dict[str, list[float]] = {}
            for _, p in c.telemetry:
                for link, mbps in p.get("links", {}).items():
                    links.setdefault(link, []).append(mbps)
    rates = {k: statistics.median(v) for k, v in links.items()}
    bw = Bandwidth(rates.get("device_edge", 1000.0), rates.get("edge_cloud", 1000.0))
    rows = []
    for k, sched in enumerate(plans, 1):
        if measured[k] is None:
            raise ConfigError(f"schedule {k} ran no steady iterations; raise --count")
        predicted = iteration_time(profile, bw, sched)
        rows.append({"schedule": sched.describe().split(";")[0], "measured_s": round(measured[k], 5),
                     "predicted_s": round(predicted, 5), "overhead_s": round(measured[k] - predicted, 5),
                     "ratio": round(measured[k] / predicted, 2)})
    if args.out:
        from hiertrain.bench.plot import bars

        bars(Path(args.out).with_suffix(".png"), [r["schedule"].split(":")[0] for r in rows],
             {"measured": [1e3 * r["measured_s"] for r in rows], "predicted (paper model)": [1e3 * r["predicted_s"] for r in rows]},
             ylabel="ms per iteration", title="LeNet-5, B = 32, over MQTT on loopback: measured vs predicted")
    return {"bench": "runtime", "model": "lenet5", "batch": batch, "device_quota": quota,
            "measured_link_mbps": {k: round(v, 1) for k, v in rates.items()},
            "profile_ms_per_sample": {t: round(1e3 * (sum(profile.tiers[t].forward_s) + sum(profile.tiers[t].backward_s)), 3)
                                      for t in TIERS},
            "rows": rows}
