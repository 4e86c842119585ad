"""``hiertrain demo``: the whole system on one machine, as local processes.

Broker (Mosquitto if installed, else the embedded one), a profile of each tier, the planner,
and the device, edge and cloud services; a short training run on the synthetic set; the chosen
schedule, per-iteration times and the accuracy before and after; everything it started is
stopped and removed at the end, also on failure.

Tiers are emulated on this machine: the cloud gets every core, the edge one core, the device one
core under a CPU quota when running as root (cgroup v1), so the planner sees three speeds.
"""

from __future__ import annotations

import json
import queue
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Optional

import numpy as np

from hiertrain import topics

TIER_OPTIONS = {"cloud": [], "edge": ["--threads", "1"], "device": ["--threads", "1"]}
TIER_THREADS = {"cloud": 0, "edge": 1, "device": 1}


def _say(text: str) -> None:
    print(text, flush=True)


def _toml(path: Path, job: str, creds: Path, sections: dict[str, dict[str, Any]]) -> Path:
    lines = [f'job = "{job}"', "[broker]", f'credentials = "{creds}"']
    for name, values in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def run(*, model: str = "lenet5", iterations: int = 40, batch: int = 32, lr: float = 0.05,
        bw_device_edge: float = 5.0, bw_edge_cloud: float = 1.5, device_quota: Optional[float] = 0.15,
        workdir: Optional[str] = None, keep: bool = False, timeout_s: float = 120.0) -> int:
    from broker.layout import BrokerDir, Settings
    from broker.process import BrokerProcess, available_kind, free_port
    from hiertrain import cgroup, checkpoint, data, models
    from hiertrain.hybrid import SingleProcess
    from hiertrain.transport import Endpoint, Transport

    work = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="hiertrain-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    job = "demo"
    procs: dict[str, subprocess.Popen] = {}
    quota_note = cgroup.available()
    use_quota = device_quota if device_quota and quota_note is None else None
    with ExitStack() as stack:
        stack.callback(lambda: None if keep else shutil.rmtree(work, ignore_errors=True))

        # 1. the broker
        bdir = BrokerDir(work / "broker")
        bdir.init(Settings(port=free_port(), bind="127.0.0.1"))
        kind = available_kind()
        broker = stack.enter_context(BrokerProcess(bdir, kind=kind))
        _say(f"broker: {kind} on 127.0.0.1:{broker.port} (pid {broker.pid})"
             + ("" if kind == "mosquitto" else " - mosquitto is not installed; the embedded amqtt broker stands in"))

        # 2. profiles of the three emulated tiers
        profile = work / "profile.json"
        for tier in ("cloud", "edge", "device"):
            extra = TIER_OPTIONS[tier] + (["--cpu-quota", str(use_quota)] if tier == "device" and use_quota else [])
            subprocess.run([sys.executable, "-m", "hiertrain", "profile", "--model", model, "--batch", str(batch),
                            "--repeat", "3", "--warmup", "1", "--tier", tier, "--merge", "--out", str(profile), *extra],
                           check=True, stdout=subprocess.PIPE, text=True, timeout=600)
        if not use_quota:
            _say(f"device emulation: one core, no CPU quota ({quota_note or 'disabled'})")
        _say(_describe_profile(profile))

        # 3. configs and services
        common = {"train": {"model": model, "batch": batch, "lr": lr, "iterations": iterations, "timeout_s": timeout_s},
                  "runtime": {"cache": str(work / "cache")}}
        cfg = {}
        for tier in ("device", "edge", "cloud"):
            sections = {**common, "runtime": {**common["runtime"], "threads": TIER_THREADS[tier]},
                        "checkpoint": {"dir": str(work / f"checkpoints-{tier}"), "every": iterations}}
            cfg[tier] = _toml(work / f"{tier}.toml", job, bdir.credentials_file(tier), sections)
        cfg["planner"] = _toml(work / "planner.toml", job, bdir.credentials_file("planner"),
                               {"planner": {"batch": batch, "profile": str(profile), "bw_device_edge": bw_device_edge,
                                            "bw_edge_cloud": bw_edge_cloud}})
        watcher = stack.enter_context(Transport(Endpoint.load(bdir.credentials_file("planner")), account="planner",
                                                job=job, observer=True))
        watcher.subscribe(topics.schedule(job))
        watcher.subscribe(topics.all_of_kind(job, "telemetry"))
        logs = work / "logs"
        logs.mkdir()
        quota = stack.enter_context(cgroup.CpuQuota(use_quota)) if use_quota else None
        for name in ("planner", "cloud", "edge", "device"):
            out = open(logs / f"{name}.log", "w")
            stack.callback(out.close)
            procs[name] = subprocess.Popen([sys.executable, "-m", "hiertrain", name, "run", "--config", str(cfg[name])],
                                           stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            stack.callback(_stop, procs[name])
            if name == "device" and quota is not None:
                quota.add(procs[name].pid)
        _say(f"services: {', '.join(f'{n} (pid {p.pid})' for n, p in procs.items())}; logs in {logs}")

        # 4. follow the run
        spec = models.get(model)
        holdout = data.synthetic_split(spec.input_shape, spec.classes, seed=0)[1]
        before = _accuracy(SingleProcess(spec, params=models.init_params(spec, 0)), holdout)
        times, seen = _follow(watcher, procs, iterations, timeout_s)
        codes = {n: _wait(p, timeout_s) for n, p in procs.items() if n != "planner"}
        failed = {n: c for n, c in codes.items() if c not in (None, 0)}
        if failed:
            for n in failed:
                _say(f"--- {n} log (tail) ---\n" + "".join((logs / f"{n}.log").read_text().splitlines(True)[-15:]))
            _say(f"demo failed: {failed}")
            return 1

        # 5. accuracy after, from worker_o's final checkpoint
        ck = _newest_checkpoint(work, list(spec.param_shapes()), checkpoint)
        after = _accuracy(SingleProcess(spec, params=ck.params), holdout) if ck else float("nan")
        steady = times[len(times) // 4:] or times
        _say(f"iterations: {len(times)}; median {1e3 * float(np.median(steady)):.1f} ms/iteration "
             f"(after warm-up); schedules seen: {seen}")
        _say(f"accuracy on 512 held-out samples: {before:.3f} before, {after:.3f} after")
        return 0 if len(times) == iterations and after > before else 1


def _describe_profile(path: Path) -> str:
    from hiertrain.profile import Profile

    p = Profile.load(path)
    parts = [f"{t} {1e3 * (sum(v.forward_s) + sum(v.backward_s)):.3f} ms/sample" for t, v in p.tiers.items()]
    return f"profile ({p.model}, {p.n_units} units): " + ", ".join(parts)


def _follow(watcher: Any, procs: dict[str, subprocess.Popen], iterations: int, timeout_s: float) -> tuple[list[float], list[int]]:
    times: list[float] = []
    seen: list[int] = []
    last = time.monotonic()
    while len(times) < iterations:
        try:
            ev = watcher.events.get(timeout=1.0)
        except queue.Empty:
            if procs["device"].poll() is not None or time.monotonic() - last > timeout_s:
                break
            continue
        last = time.monotonic()
        if isinstance(ev.topic, topics.ScheduleTopic):
            s = ev.payload
            seen.append(s.get("version"))
            _say(f"schedule v{s.get('version')} from iteration {s.get('effective_iteration')}: o={s['mapping']['o']} "
                 f"s={s['mapping']['s']} l={s['mapping']['l']} m_s={s['m_s']} m_l={s['m_l']} "
                 f"b=({s['b_o']},{s['b_s']},{s['b_l']}) predicted {s['iteration_s']:.4f} s/iteration")
        elif "loss" in ev.payload:  # from worker_o (or a chain's last stage)
            p = ev.payload
            times.append(p["iteration_s"])
            _say(f"iteration {p['iteration']:4d}  loss {p['loss']:.4f}  {1e3 * p['iteration_s']:7.1f} ms  "
                 f"({p['role']} on {ev.topic.account}, schedule v{p['schedule_version']})")
    return times, seen


def _accuracy(model: Any, ds: Any) -> float:
    x, y = ds.take(np.arange(len(ds)))
    return float((model.predict(x).argmax(1) == y).mean())


def _newest_checkpoint(work: Path, names: list[str], checkpoint: Any) -> Any:
    found = [c for c in (checkpoint.load(d, names) for d in work.glob("checkpoints-*")) if c is not None]
    return max(found, key=lambda c: c.iteration) if found else None


def _wait(proc: subprocess.Popen, timeout: float) -> Optional[int]:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        return -1  # still running: reported as a failure, then stopped on the way out


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
