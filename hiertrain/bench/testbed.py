"""``hiertrain bench testbed``: the paper's Fig. 6-10 on the emulated testbed, for one model.

Tiers run in network namespaces joined by tc-shaped veth links (:mod:`hiertrain.lab.testbed`), under
CPU quotas calibrated to the paper's speed ratios (:mod:`hiertrain.lab.emulation`; or fixed with
``--device-quota``/``--edge-quota``); with ``--interpreter-ratios``, the device's and the edge's
interpreters by their quotas and their kernels by a dilation beside them. The run has three phases, in one training job:

1. *fit*: all-device, all-edge and all-cloud at the first edge-cloud rate; their measured times
   give each tier's framework overhead (:func:`planner.costmodel.fit_overhead`), stored in the
   profile's calibration block;
2. *sweep*: at every edge-cloud rate, every policy's best schedule under the calibrated model is
   published and run for ``--count`` iterations;
3. *validity* (``two-way``, ``three-way`` in ``--policies``): fixed hybrid schedules the planner
   would not pick, to test the model where it is not the optimum.

Each row keeps the measured time (median interval between worker_o - or a chain's last stage -
finishing consecutive iterations, after SETTLE iterations of the new schedule), the predictions of the paper's
model and of the calibrated one (with the nominal rates and with the rates the tiers measured),
and the measured link rates. Fit rows are not used to judge the calibrated model.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator, Optional

from hiertrain.bench.plot import axes
from hiertrain.errors import ConfigError

POLICIES = ("hiertrain", "all-edge", "all-cloud", "jointdnn", "jointdnn+", "jalad", "all-device")
VALIDITY = ("two-way", "three-way")
FIT = ("all-edge", "all-cloud", "all-device")  # the device's own fit last, once it is warm
CHUNK_KB = 64  # frames small enough to interleave on a 1.5 Mbit/s link
HANDOVER_MBPS = 1000.0  # link rate while a new schedule takes over (weights moving between tiers)
SETTLE = 3  # iterations of a new schedule not measured: two at HANDOVER_MBPS, one across the change


class Runner:
    """Runs schedules one after another in one training job and measures each.

    A schedule change can move the model's weights between tiers (AlexNet: 81 MB, minutes at
    1.5 Mbit/s). That one-off handover is not what the paper's figures measure (time per
    iteration in steady state), so links run at HANDOVER_MBPS for the first two iterations of each
    schedule and are then shaped to the point's rates; the first SETTLE iterations are not measured.
    """

    def __init__(self, cluster: Any, net: Any, count: int) -> None:
        self.c, self.net, self.count = cluster, net, count
        self.version, self.start = 0, 0
        self.schedules: dict[int, Any] = {}

    def run(self, sched: Any, rates: dict[str, float]) -> tuple[int, Optional[float], dict[str, float]]:
        """(version, measured seconds per iteration, measured link rates) of ``sched`` at ``rates``."""
        c = self.c
        self.version += 1
        self.schedules[self.version] = sched
        for link in rates:
            self.net.shape(link, HANDOVER_MBPS)
        c.publish(sched.versioned(self.version, self.start).to_json())
        if self.version == 1:
            c.start()
        c.wait_version(self.version, SETTLE - 1, timeout=3600)
        for link, mbps in rates.items():
            self.net.shape(link, mbps)
        self.start = c.wait_version(self.version, SETTLE + self.count, timeout=3600) + 1
        t = c.seconds_per_iteration(self.version, skip=SETTLE)
        return self.version, (round(t, 4) if t else None), {k: round(v, 3) for k, v in c.link_rates(self.version, skip=SETTLE).items()}


def _floats(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or not all(v > 0 for v in values):
        raise ConfigError(f"--points must be a comma-separated list of Mbit/s, got {text!r}")
    return values


def learning_rate(model: str) -> float:
    """SGD rates that keep hundreds of iterations on the synthetic set finite (AlexNet diverges at 0.05)."""
    return 0.05 if model == "lenet5" else 0.001


def calibrated_source(args: argparse.Namespace) -> tuple[dict[str, Any], Any]:
    """For benches that build on a ``bench testbed`` run (``--from``): its JSON and calibrated profile."""
    from hiertrain.lab import testbed
    from hiertrain.profile import Profile

    why = testbed.available()
    if why:
        raise ConfigError(why)
    if not args.source:
        raise ConfigError(f"bench {args.which} needs --from, a bench testbed JSON with a calibrated profile")
    try:
        source = json.loads(Path(args.source).read_text())
        return source, Profile.from_json(source["profile"], where=args.source)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"--from {args.source}: not a bench testbed result ({type(exc).__name__}: {exc})") from None


@contextmanager
def emulated_job(work: Path, *, model: str, batch: int, quotas: dict[str, float], bw_device_edge: float,
                 bw_edge_cloud: float, dilation: Optional[dict[str, float]] = None) -> Iterator[tuple[Any, Any]]:
    """The testbed's namespaces and shaped links, and one training job in them under the tiers'
    quotas (and kernel dilations): (testbed, cluster); everything is removed when the block ends."""
    from hiertrain.lab import testbed
    from hiertrain.lab.cluster import Cluster
    from hiertrain.lab.jobs import ThreeTier

    with testbed.Testbed(bw_device_edge=bw_device_edge, bw_edge_cloud=bw_edge_cloud) as net, \
            Cluster(work, ThreeTier(model=model, batch=batch, iterations=100_000, timeout_s=600, lr=learning_rate(model),
                                    chunk_kb=CHUNK_KB, dilation=dilation), network=net, quotas=quotas) as cluster:
        yield net, cluster


def emulated_profile(args: argparse.Namespace, work: Path) -> tuple[dict[str, float], Path, dict[str, Any]]:
    """Quotas and the profile measured under them: calibrated, or at the quotas given."""
    from hiertrain.lab import emulation
    from hiertrain.profile import Profile

    if args.device_quota and args.edge_quota:
        quotas = {"device": args.device_quota, "edge": args.edge_quota}
        path = emulation.profile_tiers(args.model, args.batch, work / f"profile-{args.model}.json", quotas=quotas)
        prof = Profile.load(path)
        return quotas, path, {"quotas": quotas, "measured_speeds": emulation.ratios(prof),
                              "ms_per_sample": {t: round(1e3 * emulation.seconds_per_sample(prof, t), 3) for t in prof.tiers}}
    return emulation.calibrate(args.model, args.batch, work, speeds=emulation.parse_speeds(args.speeds),
                               interpreter=emulation.parse_interpreter(args.interpreter_ratios)
                               if args.interpreter_ratios else None)


def schedule_for(policy: str, profile: Any, bw: Any, batch: int) -> Any:
    """The schedule a row runs: a policy's plan under the calibrated model, or a validity schedule."""
    from hiertrain.schedule import Schedule
    from hiertrain.planner.baselines import plan
    from hiertrain.planner.costmodel import iteration_time

    model = "calibrated" if "calibration" in profile.extra else "paper"
    if policy not in VALIDITY:
        return plan(profile, bw, batch, policy=policy, cost_model=model)
    n = profile.n_units
    if policy == "two-way":  # the edge trains; the device runs the first unit of a quarter of the samples
        sched = Schedule(mapping={"o": "edge", "s": "device", "l": "cloud"}, m_s=1, m_l=1, b_o=batch - batch // 4,
                         b_s=batch // 4, b_l=0, policy=policy)
    else:
        sched = Schedule(mapping={"o": "cloud", "s": "device", "l": "edge"}, m_s=1, m_l=max(1, n // 2),
                         b_o=batch // 2, b_s=batch // 4, b_l=batch - batch // 2 - batch // 4, policy=policy)
    return replace(sched, iteration_s=iteration_time(profile, bw, sched, cost_model=model), cost_model=model)


def message_cost(telemetry: list[tuple[str, dict[str, Any]]], tier: str, version: int,
                 skip: int = 3) -> Optional[tuple[float, float]]:
    """(framework CPU seconds per message, wall seconds per CPU second of compute) of ``tier`` in the
    run of schedule ``version`` where it computed: medians over its steady iterations, from its
    telemetry (CPU of every thread less compute, over the messages it sent and received)."""
    import statistics

    from hiertrain.lab.replay import consecutive, reports

    rows = [p for p in reports(telemetry, tier, version, skip=skip) if "cpu_s" in p]
    cpu, stretch = [], []
    for a, b in consecutive(rows):
        msgs = b["messages_sent"] - a["messages_sent"] + b["messages_received"] - a["messages_received"]
        if msgs > 0 and b["compute_cpu_s"] > 0:
            cpu.append((b["cpu_s"] - b["compute_cpu_s"]) / msgs)
            stretch.append(sum(b["phases"].values()) / b["compute_cpu_s"])
    return (round(statistics.median(cpu), 6), round(statistics.median(stretch), 3)) if cpu else None


def message_costs(measured: dict[str, Optional[tuple[float, float]]],
                  dilation: Optional[dict[str, float]] = None) -> dict[str, float]:
    """Seconds per message at each tier: its framework CPU per message, stretched as its compute is
    (a CPU quota, a slower CPU) less its kernel dilation (which stretches its kernels, not its
    framework). The cloud's CPU time includes its ORT threads' (it computes on every core), so it gets
    the least CPU per message measured elsewhere, unstretched."""
    known = {t: v for t, v in measured.items() if v is not None}
    floor = min((cpu for t, (cpu, _) in known.items() if t != "cloud"), default=0.0)
    return {t: round(floor if t == "cloud" or t not in known
                     else known[t][0] * known[t][1] / (dilation or {}).get(t, 1.0), 6)
            for t in ("device", "edge", "cloud")}


def idle_loop(telemetry: list[tuple[str, dict[str, Any]]], versions: list[int], stretch: float,
              dilation: float = 1.0, skip: int = 3) -> float:
    """Wall seconds per iteration of the device's own loop in the runs of ``versions``, where it
    computes nothing (it stamps and sends samples): its CPU of every thread in a step (``cpu_s``, per
    step, as each report carries it), stretched as its compute is (``stretch``, from
    :func:`message_cost`) less its kernel dilation; the largest median over those runs, 0 when none
    reported."""
    import statistics

    from hiertrain.lab.replay import reports

    per_run = []
    for version in versions:
        cpu = [p["cpu_s"] for p in reports(telemetry, "device", version, skip=skip) if "cpu_s" in p]
        if cpu:
            per_run.append(statistics.median(cpu) * stretch / dilation)
    return round(max(per_run, default=0.0), 6)


def predictions(profile: Any, bw: Any, measured_bw: Any, sched: Any) -> dict[str, float]:
    from hiertrain import TIERS
    from hiertrain.planner.costmodel import Calibration, iteration_time, with_calibration

    out = {"predicted_paper_s": iteration_time(profile, bw, sched, cost_model="paper")}
    if "calibration" in profile.extra:
        out["predicted_s"] = iteration_time(profile, bw, sched, cost_model="calibrated")
        out["predicted_measured_rates_s"] = iteration_time(profile, measured_bw, sched, cost_model="calibrated")
        zero = with_calibration(profile, {t: 0.0 for t in TIERS}, chunk_bytes=Calibration.of(profile).chunk_bytes)
        # (without message costs too: network and compute alone)
        out["network_compute_s"] = iteration_time(zero, measured_bw, sched, cost_model="calibrated")
    return {k: round(v, 4) for k, v in out.items()}


def measured_bandwidth(nominal: Any, rates: dict[str, float]) -> Any:
    """Line rates implied by the payload rates the tiers measured (nominal where none was measured)."""
    from hiertrain.planner.costmodel import TCP_EFFICIENCY, Bandwidth

    return Bandwidth(rates.get("device_edge", nominal.device_edge * TCP_EFFICIENCY) / TCP_EFFICIENCY,
                     rates.get("edge_cloud", nominal.edge_cloud * TCP_EFFICIENCY) / TCP_EFFICIENCY)


def bench(args: argparse.Namespace) -> dict[str, Any]:
    from hiertrain.lab import testbed
    from hiertrain.profile import Profile
    from hiertrain.planner.costmodel import Bandwidth, fit_overhead, with_calibration

    why = testbed.available()
    if why:
        raise ConfigError(why)
    points, policies = _floats(args.points), [p for p in args.policies.split(",") if p]
    unknown = set(policies) - set(POLICIES) - set(VALIDITY)
    if unknown:
        raise ConfigError(f"unknown policies {sorted(unknown)}; available: {', '.join(POLICIES + VALIDITY)}")
    sweep = [p for p in policies if p not in VALIDITY]
    validity = [p for p in policies if p in VALIDITY]
    batch, per, de = args.batch, args.count, args.bw_device_edge
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="hiertrain-testbed-") as d:
        work = Path(d)
        quotas, path, emulation_record = emulated_profile(args, work)
        dilation = emulation_record.get("dilation")
        profile = Profile.load(path)
        with emulated_job(work, model=args.model, batch=batch, quotas=quotas, bw_device_edge=de,
                          bw_edge_cloud=points[0], dilation=dilation) as (net, c):
            runner = Runner(c, net, per)

            def run(phase: str, policy: str, bw: float, sched: Any) -> dict[str, Any]:
                version, t, rates = runner.run(sched, {"device_edge": de, "edge_cloud": bw})
                row = {"phase": phase, "bw_edge_cloud": bw, "policy": policy, "version": version,
                       "schedule": sched.describe().rsplit(";", 1)[0], "plan": sched.to_json(), "measured_s": t,
                       "link_rates": rates}
                rows.append(row)
                return row

            if not args.no_fit:
                bw = Bandwidth(de, points[0])
                fit, per_message, versions = {}, {}, {}
                for policy in FIT:
                    row = run("fit", policy, points[0], schedule_for(policy, profile, bw, batch))
                    fit[policy[4:]] = row["measured_s"]
                    versions[policy[4:]] = row["version"]
                    per_message[policy[4:]] = message_cost(c.telemetry, policy[4:], row["version"])
                loop = idle_loop(c.telemetry, [versions["edge"], versions["cloud"]],
                                 (per_message["device"] or (0.0, 0.0))[1], (dilation or {}).get("device", 1.0))
                overhead = fit_overhead(profile, bw, batch, fit, chunk_bytes=CHUNK_KB * 1024, loop_s=loop)
                profile = with_calibration(profile, overhead, chunk_bytes=CHUNK_KB * 1024, loop_s=loop,
                                           message_s=message_costs(per_message, dilation),
                                           fitted_on={"bw": [de, points[0]], "batch": batch, "measured_s": fit,
                                                      "message": per_message})
            for bw_ec in points:
                for policy in sweep:
                    run("sweep", policy, bw_ec, schedule_for(policy, profile, Bandwidth(de, bw_ec), batch))
            for policy in validity:
                run("validity", policy, points[0], schedule_for(policy, profile, Bandwidth(de, points[0]), batch))
        for row in rows:
            nominal = Bandwidth(de, row["bw_edge_cloud"])
            row.update(predictions(profile, nominal, measured_bandwidth(nominal, row["link_rates"]),
                                   runner.schedules[row["version"]]))
    result = {"bench": "testbed", "model": args.model, "batch": batch, "bw_device_edge": de, "count": per,
              "emulation": emulation_record, "calibration": dict(profile.extra.get("calibration", {})),
              "profile": profile.to_json(), "rows": rows, "summary": summary(rows)}
    if args.out:
        plot(result, Path(args.out).with_suffix(".png"))
    return result


def _err(row: dict[str, Any], key: str) -> Optional[float]:
    m, p = row.get("measured_s"), row.get(key)
    return abs(m - p) / m if m and p else None


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Model errors on the rows not used for fitting; speedups of hiertrain at each rate."""
    import statistics

    judged = [r for r in rows if r["phase"] != "fit" and r.get("measured_s")]
    out: dict[str, Any] = {}
    for key in ("predicted_paper_s", "predicted_s", "predicted_measured_rates_s"):
        errs = [e for e in (_err(r, key) for r in judged) if e is not None]
        if errs:
            out[key.replace("predicted", "error").replace("_s", "")] = {
                "median": round(statistics.median(errs), 3), "max": round(max(errs), 3), "rows": len(errs)}
    ratios = [r["measured_s"] / r["network_compute_s"] for r in judged if r.get("network_compute_s")]
    if ratios:
        out["framework_overhead_ratio"] = {"median": round(statistics.median(ratios), 3), "max": round(max(ratios), 3)}
    speedups = {}
    for bw in sorted({r["bw_edge_cloud"] for r in judged}):
        at = {r["policy"]: r["measured_s"] for r in judged if r["bw_edge_cloud"] == bw and r["phase"] == "sweep"}
        if "hiertrain" in at:
            speedups[str(bw)] = {p: round(t / at["hiertrain"], 2) for p, t in at.items() if p != "hiertrain"}
    out["speedup_of_hiertrain"] = speedups
    return out


def plot(result: dict[str, Any], path: Path) -> None:
    """Measured (solid) and calibrated-model (dotted) time per iteration against the edge-cloud rate."""
    sweep = [r for r in result["rows"] if r["phase"] == "sweep"]
    with axes(path, (6.5, 3.8)) as ax:
        if ax is None:
            return
        for policy in dict.fromkeys(r["policy"] for r in sweep):
            mine = [r for r in sweep if r["policy"] == policy and r["measured_s"]]
            line, = ax.plot([r["bw_edge_cloud"] for r in mine], [r["measured_s"] for r in mine], "o-", label=policy)
            ax.plot([r["bw_edge_cloud"] for r in mine], [r.get("predicted_s", r["predicted_paper_s"]) for r in mine], ":",
                    color=line.get_color())
        ax.set_yscale("log")
        ax.set_xlabel(f"edge-cloud bandwidth (Mbit/s); device-edge {result['bw_device_edge']} Mbit/s")
        ax.set_ylabel("s per iteration (dotted: calibrated model)")
        ax.set_title(f"{result['model']}, B = {result['batch']}, emulated testbed", fontsize=10)
        ax.legend(fontsize=7)
