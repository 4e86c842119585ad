"""``hiertrain bench failover``: kill each working tier in turn mid-run; the survivors carry on.

LeNet-5 over Mosquitto on this machine, three tier processes and the planner service. The
planner plans from a profile in which the device is ``--slow-device`` times and the edge
``--slow-edge`` times slower than ``bench/profiles/lenet5.json`` measured (a Pi and a small edge
server next to a cloud), so that it places worker_o on the cloud and may use the edge. For each
scenario (worker_o lost; the other non-device tier lost) a fresh job runs ``--count``
iterations and the victim is SIGKILLed after two thirds of them. Reported per scenario: the plan in
effect, K (replica_every), seconds from the kill to the device noticing (its Last Will) and to
the first completed iteration after it, the iteration the run resumed at, iterations redone,
the iterations whose loss report the watcher never got (telemetry is best effort: a report in
flight when the broker died is lost; the final weights show whether the iteration ran), and the
final weights' relative distance from
single-process training on the same samples (what an uninterrupted run gives, to float32), and
the largest relative difference of any iteration's loss from it, and beside them how far float32
rounding alone moves this job (:func:`rounding_control`): synthetic LeNet-5 training is chaotic
enough that a 1e-7 perturbation grows to 1e-3 in 60 steps.

With ``--testbed`` every job runs in the testbed's network namespaces, both links shaped to
``--bw-device-edge`` Mbit/s (root; the CPUs are not emulated: the replicas and handovers cross
shaped links, which is what K and the resume time depend on).

A third scenario (on loopback only) loses the edge *machine*: the broker, the planner and the edge worker at once,
so no Last Will is sent. The tiers have a standby broker with a planner of its own (both on this
machine): detection is the move to the standby (5 s without a broker) plus the grace for the
edge to reappear there (12 s).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from hiertrain.errors import ConfigError

SCALE_KEYS = ("forward_s", "backward_s", "update_s")
LR = 0.02  # at 0.05 this job is chaotic after ~15 steps: float32 rounding of a split batch grows to % (measured)


def slowed_profile(source: Path, out: Path, factors: dict[str, float]) -> Path:
    data = json.loads(source.read_text())
    for tier, f in factors.items():
        for key in SCALE_KEYS:
            data["tiers"][tier][key] = [v * f for v in data["tiers"][tier][key]]
    out.write_text(json.dumps(data))
    return out


def scenario(work: Path, profile: Path, *, victim_role: str, count: int, bw: float, network: Any = None
             ) -> dict[str, Any]:
    from hiertrain.lab.cluster import Cluster
    from hiertrain.lab.jobs import ThreeTier
    from hiertrain.lab.replay import reference, rel
    from hiertrain.schedule import Schedule

    kill_at = 2 * count // 3
    machine = victim_role == "edge_machine"
    with Cluster(work, ThreeTier(model="lenet5", batch=16, iterations=count, timeout_s=60, every=count, lr=LR),
                 standby=machine, network=network) as c:
        c.start_planner(profile, bw_device_edge=bw, bw_edge_cloud=bw)
        if machine:  # a second planner next to the standby broker, idle until the tiers come
            c.start_planner(profile, bw_device_edge=bw, bw_edge_cloud=bw, on_standby=True)
        c.start()
        c.wait_iteration(kill_at, timeout=300)
        c.pump(0.05)
        versions = c.versions()
        in_effect = Schedule.from_json(next(s for s in reversed(c.schedules)
                                            if s["version"] == versions[max(versions)]))
        o = in_effect.tier_of("o")
        victim = "edge" if machine else o if victim_role == "worker_o" else next(t for t in ("cloud", "edge") if t != o)
        old_run = next(p["run"] for t, p in reversed(c.telemetry) if t == "device")
        t_kill = time.time()
        if machine:  # the broker and the planner go down with it: no Last Will
            assert c.broker is not None
            os.kill(c.broker.pid, signal.SIGKILL)
            c.procs["planner"].send_signal(signal.SIGKILL)
        c.procs[victim].send_signal(signal.SIGKILL)
        noticed: Optional[float] = None
        deadline = time.monotonic() + 120
        while noticed is None and time.monotonic() < deadline:
            if f"device: the {victim} is" in c.log("device"):
                noticed = time.time()
            time.sleep(0.01)
        survivors = tuple(t for t in ("device", "edge", "cloud") if t != victim)
        codes = c.wait(survivors, timeout=600)
        c.pump(0.5)
        after = sorted((p["t"], p["iteration"]) for _, p in c.telemetry if "loss" in p and p.get("run") != old_run)
        seen = c.losses()
        ck = c.final_checkpoint()
        ref_losses, ref_params = reference(c, count)
        losses = c.losses()
        replans = [Schedule.from_json(s) for s in c.schedules if s["version"] > in_effect.version]
        return {
            "victim": "edge machine (broker, planner, edge worker)" if machine else victim,
            "victim_role": victim_role if victim == o else
            ("idle" if victim not in in_effect.working else "slice worker"),
            "plan_at_kill": in_effect.describe(), "replica_every": in_effect.replica_every,
            "killed_after_iteration": kill_at, "exit_codes": codes,
            "detect_s": round(noticed - t_kill, 3) if noticed else None,
            "first_iteration_after_s": round(after[0][0] - t_kill, 3) if after else None,
            "resumed_at": after[0][1] if after else None,
            "redone": c.redone(),
            "loss_reports_missing": sorted(set(range(count)) - set(seen)),
            "replanned_to": replans[0].describe() if replans else None,
            "max_loss_rel_diff": max(abs(losses[i] - ref_losses[i]) / abs(ref_losses[i]) for i in losses),
            "final_distance": rel(ck.params, ref_params) if ck else None,
            "rounding_control_distance": rounding_control(c, count, after[0][1]) if after else None,
        }


def rounding_control(c: Any, count: int, at: int) -> float:
    """How far float32 rounding alone moves this job: single-process training whose weights are
    perturbed by 1e-7 (relative) at iteration ``at``, against the unperturbed run. A failover
    result at this distance from the reference is as exact as the arithmetic allows."""
    import numpy as np

    from hiertrain.train import models
    from hiertrain.train.reference import SingleProcess
    from hiertrain.lab.replay import dataset, rel
    from hiertrain.train.optim import OptimizerConfig

    finals = []
    for perturb in (False, True):
        m = SingleProcess(models.get(c.job.model), optimizer=OptimizerConfig("sgd", lr=c.job.lr))
        ds, rng = dataset(c), np.random.default_rng(1)
        for i in range(count):
            if perturb and i == at:
                for v in m.params.values():
                    v *= (1 + 1e-7 * rng.standard_normal(v.shape)).astype(np.float32)
            m.step(*ds.batch(i, c.job.batch, seed=0))
        finals.append({k: v.copy() for k, v in m.params.items()})
    return rel(finals[1], finals[0])


def bench(args: argparse.Namespace) -> dict[str, Any]:
    from contextlib import nullcontext

    from hiertrain.lab import testbed

    source = Path(args.profiles) / "lenet5.json"
    if not source.is_file():
        raise ConfigError(f"bench failover needs {source} (--profiles)")
    bw = args.bw_device_edge
    results = []
    with tempfile.TemporaryDirectory(prefix="hiertrain-failover-") as d:
        profile = slowed_profile(source, Path(d) / "profile.json", {"device": 50.0, "edge": 5.0})
        # the standby broker runs on loopback: the edge machine's loss is measured there
        for role in ("worker_o", "other") + (() if args.testbed else ("edge_machine",)):
            work = Path(d) / role
            work.mkdir()
            net = testbed.Testbed(bw_device_edge=bw, bw_edge_cloud=bw) if args.testbed else nullcontext()
            with net as network:
                results.append(scenario(work, profile, victim_role=role, count=args.count, bw=bw, network=network))
    return {"bench": "failover", "model": "lenet5", "batch": 16, "lr": LR, "iterations": args.count,
            "profile_slowdown": {"device": 50.0, "edge": 5.0}, "planner_rates_mbps": bw,
            "network": f"testbed: both links shaped to {bw:g} Mbit/s" if args.testbed else "loopback",
            "scenarios": results}
