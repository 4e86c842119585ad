"""The device's loop: what each iteration costs it besides its compute (``hiertrain bench deviceloop``).

LeNet-5, B = 32, three tiers over Mosquitto on loopback, two schedules in one job: all on the
device (it computes everything, and still drives the idle edge and cloud) and a hybrid where the
device trains half the batch through units 1..2 and exchanges activations and gradients with the
edge. Run once at native speed and once with the device under the Pi-3 emulation's CPU quota.

From the device's own telemetry, per iteration (medians over the steady iterations):
- *compute*: CPU seconds of the device's thread inside forward, backward and update;
- *framework CPU*: CPU seconds of the whole process (every thread: MQTT, dispatch) minus compute;
- *framework wall*: the iteration's wall time minus compute phases and waits for other tiers;
- messages and bytes the device sent and received, and bytes over each link.
CPU time does not depend on the quota; under the quota wall time is CPU time stretched by it.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path
from typing import Any, Optional

from hiertrain.bench import quick, sized
from hiertrain.errors import ConfigError
from hiertrain.lab import cgroup
from hiertrain.lab.emulation import REFERENCE_QUOTAS
from hiertrain.schedule import Schedule

PI3_QUOTA = REFERENCE_QUOTAS["device"]
BATCH, CUT = 32, 2
MIN_COUNT = 8  # iterations per schedule: a third are skipped, and the figures need three


def schedules() -> list[Schedule]:
    from hiertrain.planner.baselines import single_tier

    half = BATCH // 2
    return [single_tier("device", BATCH, policy="all-device"),
            Schedule(mapping={"o": "edge", "s": "cloud", "l": "device"}, m_s=0, m_l=CUT, b_o=half, b_s=0,
                     b_l=BATCH - half, policy="hybrid")]


def _per_iteration(rows: list[dict[str, Any]], key: str) -> Optional[float]:
    """Median increase of a cumulative counter between consecutive reports one iteration apart."""
    from hiertrain.lab.replay import consecutive

    steps = [b[key] - a[key] for a, b in consecutive(rows) if key in a]
    return statistics.median(steps) if steps else None


def summarize(telemetry: list[tuple[str, dict[str, Any]]], version: int, skip: int) -> dict[str, Any]:
    """The device's figures for the iterations of schedule ``version`` (after ``skip`` of them)."""
    from hiertrain.lab.replay import reports

    dev = reports(telemetry, "device", version, skip=skip)
    if len(dev) < 3:
        raise ConfigError(f"schedule {version} ran {len(dev)} steady iterations on the device; raise --count")
    med = lambda f: statistics.median(f(p) for p in dev)  # noqa: E731
    compute_wall = med(lambda p: sum(p["phases"].values()))
    compute_cpu = med(lambda p: p["compute_cpu_s"])
    fw_cpu = med(lambda p: p["cpu_s"] - p["compute_cpu_s"])
    fw_wall = med(lambda p: p["iteration_s"] - p["wait_s"] - sum(p["phases"].values()))
    out: dict[str, Any] = {
        "iteration_ms": round(1e3 * med(lambda p: p["iteration_s"]), 3),
        "compute_wall_ms": round(1e3 * compute_wall, 3), "compute_cpu_ms": round(1e3 * compute_cpu, 3),
        "framework_wall_ms": round(1e3 * fw_wall, 3), "framework_cpu_ms": round(1e3 * fw_cpu, 3),
        "framework_cpu_share": round(fw_cpu / compute_cpu, 3) if compute_cpu else None,
        "framework_wall_share": round(fw_wall / compute_wall, 3) if compute_wall else None,
    }
    for key in ("messages_sent", "messages_received", "bytes_sent", "bytes_received"):
        out[f"device_{key}"] = _per_iteration(dev, key)
    cloud = reports(telemetry, "cloud", version, skip=skip)
    out["bytes_per_iteration"] = {
        "device_edge": (out["device_bytes_sent"] or 0) + (out["device_bytes_received"] or 0),
        "edge_cloud": sum(_per_iteration(cloud, k) or 0 for k in ("bytes_sent", "bytes_received")) if cloud else 0}
    return out


def run_job(quota: Optional[float], count: int) -> dict[str, Any]:
    from hiertrain.lab.cluster import Cluster
    from hiertrain.lab.jobs import ThreeTier

    plans = schedules()
    with tempfile.TemporaryDirectory(prefix="hiertrain-bench-") as d:
        with Cluster(Path(d), ThreeTier(batch=BATCH, iterations=count * len(plans), timeout_s=120),
                     quotas={"device": quota} if quota else None) as c:
            c.publish(plans[0].versioned(1, 0).to_json())
            c.start()
            for k, sched in enumerate(plans[1:], 2):
                c.wait_iteration(count * (k - 1) - count // 2, timeout=900)  # a slow device starts slowly
                c.publish(sched.versioned(k, count * (k - 1)).to_json())
            codes = c.wait(timeout=900)
            if any(code != 0 for code in codes.values()):
                raise RuntimeError(f"tiers failed: {codes}: {c.log('device')[-500:]}")
            c.pump()
            return {s.policy: {"schedule": s.describe().split(";")[0],
                               "seconds_per_iteration": round(c.seconds_per_iteration(k, skip=3) or 0.0, 5),
                               **summarize(c.telemetry, k, skip=count // 3)}
                    for k, s in enumerate(plans, 1)}

GOAL_SHARE = 0.10  # issue 28: the framework's CPU <= 10 % of the device's compute per iteration, all on the device


def bench(args: argparse.Namespace) -> dict[str, Any]:
    quota, count = args.device_quota or PI3_QUOTA, sized(args, args.count, MIN_COUNT)
    if count < MIN_COUNT:
        raise ConfigError(f"bench deviceloop needs --count >= {MIN_COUNT}: a third of each schedule's iterations "
                          "are warm-up, and three must remain")
    runs = {"native": run_job(None, count)}
    if quick(args):  # a process at the Pi-3 quota spends a minute importing onnxruntime
        runs["pi3"] = {"skipped": "--quick"}
    elif cgroup.available() is None:
        runs["pi3"] = run_job(quota, max(12, count // 2))
    else:
        runs["pi3"] = {"skipped": f"no CPU quota here: {cgroup.available()}"}
    if args.out and "skipped" not in runs["pi3"]:
        from hiertrain.bench.plot import bars

        labels = [f"{p}\n{where}" for where in runs for p in runs[where]]
        cells = [runs[w][p] for w in runs for p in runs[w]]
        bars(Path(args.out).with_suffix(".png"), labels,
             {"compute (CPU)": [c["compute_cpu_ms"] for c in cells],
              "framework (CPU, every thread)": [c["framework_cpu_ms"] for c in cells]},
             ylabel="ms per iteration", title="The device's loop: LeNet-5, B = 32, native and under the Pi-3 quota")
    shares = [where["all-device"]["framework_cpu_share"] for where in runs.values()  # the paper's setting: the
              if "framework_cpu_share" in where.get("all-device", {})]                 # device computes it all
    return {"bench": "deviceloop", "model": "lenet5", "batch": BATCH, "device_quota": quota, "runs": runs,
            "goal_framework_share": GOAL_SHARE, "meets_goal": bool(shares) and max(shares) <= GOAL_SHARE}
