"""``hiertrain demo``: the whole system on one machine, as local processes.

Broker (Mosquitto if installed, else the embedded one), a profile of each tier, the planner,
and the device, edge and cloud services; a short training run on the synthetic set; the chosen
schedule, per-iteration times and the accuracy before and after; everything it started is
stopped and removed at the end, also on failure.

Tiers are emulated on this machine: the cloud gets every core, the edge one core, the device one
core under a CPU quota when running as root (cgroup v1), so the planner sees three speeds.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Optional

import numpy as np

from hiertrain.errors import ConfigError
from hiertrain.schedule import Schedule

EVAL_EVERY, EVAL_SAMPLES = 10, 128  # the model's owner scores its weights on 128 held-out samples every 10
# steps (the dashboard's curve; on the emulated Pi 3 a score of 512 samples cost a step 0.5-1.3 s)


def _say(text: str) -> None:
    print(text, flush=True)


def _user_data(path: str, spec: Any) -> tuple[dict[str, Any], Any]:
    """The device's [data] section for a user's data file or folder, and its held-out part (a fifth,
    at most 512 samples), checked against the model before anything starts."""
    from hiertrain.train import data

    section = {"dataset": data.format_of(path), "path": str(Path(path).resolve())}
    ds = data.load(section["dataset"], path=section["path"], shape=spec.input_shape, classes=spec.classes)
    data.check(ds, spec.input_shape, spec.classes, spec.name)
    holdout = min(512, len(ds) // 5)
    if holdout < 1 or len(ds) - holdout < 1:
        raise ConfigError(f"{path}: {len(ds)} samples are too few to train on and hold some out")
    return {**section, "holdout": holdout}, ds.split(holdout)[1]


def run(*, model: str = "lenet5", iterations: int = 40, batch: int = 32, lr: float = 0.05,
        bw_device_edge: float = 5.0, bw_edge_cloud: float = 1.5, device_quota: Optional[float] = 0.15,
        workdir: Optional[str] = None, keep: bool = False, timeout_s: float = 120.0,
        data_path: Optional[str] = None, optimizer: str = "sgd", dashboard: Optional[int] = None) -> int:
    """``optimizer``: "sgd" (the paper's) or "adamw". ``data_path``: the user's data (an .npz, a .csv, or a folder of class folders) instead of the
    synthetic set; a fifth of it (at most 512 samples) is held out for the accuracy figures."""
    from hiertrain.lab import cgroup
    from hiertrain.train import data, models
    from hiertrain.lab.emulation import profile_tiers
    from hiertrain.lab.cluster import Cluster
    from hiertrain.lab.jobs import ThreeTier

    spec = models.get(model)  # a model file that cannot be trained, or data that does not fit: before starting
    if data_path is not None:
        section, holdout = _user_data(data_path, spec)
        own = {"data": {k: v for k, v in section.items() if k != "holdout"}, "holdout": section["holdout"]}
    else:
        holdout, own = data.synthetic_split(spec.input_shape, spec.classes, seed=0)[1], {}
    work = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="hiertrain-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    why_not = cgroup.available()
    quota = device_quota if device_quota and why_not is None else None
    with ExitStack() as stack:
        stack.callback(lambda: None if keep else shutil.rmtree(work, ignore_errors=True))
        cluster = stack.enter_context(Cluster(work, ThreeTier(
            model=model, batch=batch, iterations=iterations, lr=lr, timeout_s=timeout_s, every=iterations,
            optimizer=optimizer, eval_every=0 if own else EVAL_EVERY, eval_samples=EVAL_SAMPLES, **own), quotas={"device": quota} if quota else None))
        assert cluster.broker is not None
        _say(f"broker: {cluster.broker.kind} on 127.0.0.1:{cluster.broker.port} (pid {cluster.broker.pid})"
             + ("" if cluster.broker.kind == "mosquitto" else
                " - mosquitto is not installed; the embedded amqtt broker stands in"))
        profile = profile_tiers(model, batch, work / "profile.json", quotas={"device": quota} if quota else {})
        if not quota:
            _say(f"device emulation: one core, no CPU quota ({why_not or 'disabled'})")
        _say(_describe_profile(profile))
        _dashboard(cluster, dashboard)
        cluster.start_planner(profile, bw_device_edge=bw_device_edge, bw_edge_cloud=bw_edge_cloud)
        cluster.start()
        _say(f"services: {', '.join(f'{n} (pid {p.pid})' for n, p in cluster.procs.items())}; logs in {work}")

        before = _accuracy(spec, models.init_params(spec, 0), holdout)
        times, seen = _follow(cluster, iterations, timeout_s, "iteration", lambda v: _schedule_text(cluster, v))
        return _ending(cluster, cluster.wait(timeout=timeout_s), spec, holdout, before, times, iterations,
                       "iteration", f"; schedules seen: {seen}")


def _ending(cluster: Any, codes: dict[str, Optional[int]], spec: Any, holdout: Any, before: float,
            times: list[float], iterations: int, unit: str, extra: str = "") -> int:
    """A demo's last lines: the logs of what failed, or the times and the accuracy; its exit code."""

    failed = {n: c for n, c in codes.items() if c != 0}
    if failed:
        for n in failed:
            _say(f"--- {n} log (tail) ---\n" + "".join(cluster.log(n).splitlines(True)[-15:]))
        _say(f"demo failed: {failed}")
        return 1
    ck = cluster.final_checkpoint()
    after = _accuracy(spec, ck.params, holdout) if ck else float("nan")
    steady = times[len(times) // 4:] or times
    _say(f"{unit}s: {len(times)}; median {1e3 * float(np.median(steady)):.1f} ms/{unit} (after warm-up){extra}")
    _say(f"accuracy on {len(holdout)} held-out samples: {before:.3f} before, {after:.3f} after")
    return 0 if len(times) == iterations and after > before else 1


def _describe_profile(path: Path) -> str:
    from hiertrain.profile import Profile

    p = Profile.load(path)
    parts = [f"{t} {1e3 * (sum(v.forward_s) + sum(v.backward_s)):.3f} ms/sample" for t, v in p.tiers.items()]
    return f"profile ({p.model}, {p.n_units} units): " + ", ".join(parts)


def _follow(cluster: Any, iterations: int, timeout_s: float, unit: str, plan_text: Any) -> tuple[list[float], list[int]]:
    """Print each plan as its first step runs (``plan_text(version)``) and a line per step, until
    ``iterations`` steps, the process driving the clock ended, or ``timeout_s`` of silence: (the steps'
    seconds, the plan versions seen)."""
    times: list[float] = []
    seen: list[int] = []
    shown, last = -1, time.monotonic()
    while len(times) < iterations:
        if cluster.pump(0.5):
            last = time.monotonic()
        elif cluster.procs[cluster.job.driver].poll() is not None or time.monotonic() - last > timeout_s:
            break
        for step in sorted(k for k in cluster.steps if k > shown):
            p = cluster.steps[step]
            if p["schedule_version"] not in seen:
                seen.append(p["schedule_version"])
                _say(plan_text(p["schedule_version"]))
            times.append(p["iteration_s"])
            who = f"{len(p['fleet'])} devices, plan" if "fleet" in p else f"{p['role']} on {p['account']}, schedule"
            _say(f"{unit} {step:4d}  loss {p['loss']:.4f}  {1e3 * p['iteration_s']:7.1f} ms  "
                 f"({who} v{p['schedule_version']})")
            shown = step
    return times, seen


def _schedule_text(cluster: Any, version: int) -> str:
    """A three-tier schedule as the demo states it: as it came on the schedule topic."""
    s = next((Schedule.from_json(p) for p in reversed(cluster.schedules) if p.get("version") == version), None)
    return f"schedule v{version}" if s is None else \
        f"schedule v{version} from iteration {s.effective_iteration}: {s.describe()}"


def _accuracy(spec: Any, params: Any, ds: Any) -> float:
    """Held-out accuracy in evaluation mode (no training graph is built for it)."""
    from hiertrain.train.runtime import Predictor

    x, y = ds.take(np.arange(len(ds)))
    return float((Predictor(spec)(params, x).argmax(1) == y).mean())


# ------------------------------------------------------------------------------------------ fleet

CLASSES = (("pi3", 0.08, 8, 5.0), ("pi4", 0.25, 12, 10.0), ("jetson", 0.6, 16, 20.0))  # name, cores, samples, Mbit/s


def fleet_specs(devices: int, *, quotas: bool) -> list[Any]:
    """``devices`` heterogeneous devices: Pi 3-, Pi 4- and Jetson-class in turn (CPU quotas where they
    can be set), each with its samples per step and radio; the first is private (its raw samples
    never leave it)."""
    from hiertrain.lab.jobs import Spec

    out = []
    for i in range(devices):
        name, cores, samples, rate = CLASSES[i % len(CLASSES)]
        out.append(Spec(f"{name}-{i // len(CLASSES) + 1}", samples, rate, private=i == 0,
                        quota=cores if quotas else None))
    return out


def run_fleet(*, devices: int, model: str = "lenet5", iterations: int = 40, lr: float = 0.05, optimizer: str = "sgd",
              medium_mbps: float = 20.0, cloud_mbps: float = 5.0, workdir: Optional[str] = None, keep: bool = False,
              timeout_s: float = 120.0, quotas: bool = True, dashboard: Optional[int] = None) -> int:
    """``hiertrain demo --devices N``: a fleet on this machine. N enrolled devices (own accounts and
    data shards), the edge's coordinator planning them with the fleet planner, the cloud worker."""
    from hiertrain.lab import cgroup
    from hiertrain.train import data, models
    from hiertrain.lab.cluster import Cluster
    from hiertrain.lab.jobs import Fleet

    spec = models.get(model)
    why_not = cgroup.available()
    specs = fleet_specs(devices, quotas=quotas and why_not is None)
    work = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="hiertrain-fleet-"))
    holdout = data.synthetic_split(spec.input_shape, spec.classes, seed=0)[1]
    with ExitStack() as stack:
        stack.callback(lambda: None if keep else shutil.rmtree(work, ignore_errors=True))
        _say(f"fleet of {devices}: " + ", ".join(
            f"{s.name} ({s.samples} samples/step, {s.rate_mbps:g} Mbit/s radio"
            + (f", {s.quota:g} cores" if s.quota else "") + (", private" if s.private else "") + ")" for s in specs))
        if not (quotas and why_not is None):
            _say(f"device emulation: no CPU quotas ({why_not or 'disabled'}): every device is as fast as one core")
        _say("profiling the edge, the cloud and each device class ...")
        c = stack.enter_context(Cluster(work, Fleet(specs, model=model, iterations=iterations, lr=lr, optimizer=optimizer,
                                                    timeout_s=timeout_s, medium_mbps=medium_mbps, cloud_mbps=cloud_mbps,
                                                    eval_every=EVAL_EVERY, eval_samples=EVAL_SAMPLES)))
        _say(f"broker: {c.broker.kind} on 127.0.0.1:{c.broker.port}; devices enrolled with their own accounts; "
             f"logs in {work}")
        _dashboard(c, dashboard)
        c.start("cloud", "edge", *(s.name for s in specs))
        before = _accuracy(spec, models.init_params(spec, 0), holdout)
        times, _ = _follow(c, iterations, timeout_s, "step", lambda v: _plan_text(c, v))
        return _ending(c, c.wait(timeout=timeout_s), spec, holdout, before, times, iterations, "step")


def _dashboard(cluster: Any, port: Optional[int]) -> None:
    if port is not None:
        _say(f"dashboard: {cluster.start_dashboard(port)} (live while the demo runs; read-only, as the observer)")


def _plan_text(c: Any, version: int) -> str:
    """How the edge's log states plan ``version``: its line and the devices' lines under it."""
    lines = c.log("edge").splitlines()
    head = next((i for i, line in enumerate(lines) if line.startswith(f"edge: plan v{version} ")), None)
    if head is None:
        return f"plan v{version}"
    body = [line for line in lines[head + 1:] if line.startswith("  ")]
    return "\n".join([lines[head][len("edge: "):], *body[:len(c.job.specs)]])
