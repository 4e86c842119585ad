"""A whole fleet on one machine: a broker with enrolled devices, the edge's coordinator, the cloud
worker and N device processes, each with its own account, data and config; and a watcher.

Used by ``hiertrain demo --devices N`` and the fleet's integration tests. Everything started here is
stopped by :meth:`FleetCluster.close` (processes by pid, the broker).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

import numpy as np

from hiertrain import tierconfig
from hiertrain.net import topics
from hiertrain.train import checkpoint, models
from hiertrain.lab.emulation import THREADS
from hiertrain.errors import ConfigError
from hiertrain.lab.harness import Harness, standby_broker, toml, unwinding
from hiertrain.net.transport import Endpoint
from hiertrain.schedule import Schedule

JOB = "fleet"


@dataclass(frozen=True)
class Spec:
    """One device of the local fleet."""

    name: str
    samples: int                 # per step
    rate_mbps: float = 20.0      # its radio
    private: bool = False
    path: Optional[tuple[int, int]] = None  # pinned (m, k); None: the planner chooses
    data: Optional[dict[str, Any]] = None   # its [data] section (default: its shard of the synthetic set)
    quota: Optional[float] = None           # its CPU, in cores (cgroup v1, as root): how slow a device it is
    joins: bool = False                     # it publishes its own profile to join; the fleet file holds only
                                            # its pinned path, if any


def measure_profiles(model: str, batch: int, out: Path, quotas: set[Optional[float]]) -> tuple[Path, dict]:
    """The servers' profile (edge, cloud) and a device profile per CPU quota, measured here (threads
    as emulated; a quota's profile is measured under it): (servers' file, {quota: device's file})."""
    from hiertrain.lab.emulation import profile_tier
    from hiertrain.train.profiler import measure

    servers = measure(model, batch, tier="edge", threads=THREADS["edge"], repeat=3, warmup=1)
    servers = servers.merged("cloud", measure(model, batch, tier="cloud", threads=THREADS["cloud"], repeat=3, warmup=1))
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile.json").write_text(json.dumps(servers.to_json()))
    devices = {}
    for quota in quotas:
        path = out / f"profile-device-{quota or 'full'}.json"
        if quota:
            profile_tier(model, batch, path, "device", quota=quota)
        else:
            path.write_text(json.dumps(measure(model, batch, tier="device", threads=THREADS["device"], repeat=3,
                                               warmup=1).to_json()))
        devices[quota] = path
    return out / "profile.json", devices


class FleetCluster(Harness):
    @unwinding
    def __init__(self, work: Path, devices: list[Spec], *, model: str = "lenet5", iterations: int = 12,
                 lr: float = 0.05, timeout_s: float = 30.0, wait_for: Optional[int] = None, medium_mbps: float = 40.0,
                 cloud_mbps: float = 10.0, extra: tuple[Spec, ...] = (), optimizer: str = "sgd",
                 network: Any = None, policy: str = "hiertrain", checkpoint_every: int = 0,
                 launch: Optional[dict[str, list[str]]] = None, cloud_publishes: bool = False,
                 standby: bool = False) -> None:
        """``devices`` start with the run; ``extra`` are enrolled and described too, started later
        (:meth:`start`) to join it. The edge waits for ``wait_for`` devices (default all of ``devices``).
        ``network``: a :class:`hiertrain.lab.testbed.FleetTestbed` holding the devices, the edge (and the
        broker) and the cloud in its namespaces, behind its shaped links. ``launch``: per device, the
        command that runs Python there (default this interpreter; e.g. a plain-onnxruntime virtualenv
        or the emulated arm64 machine), with a segment cache of its own. ``cloud_publishes``: the fleet
        file's profile has only the edge's timings; the cloud worker publishes its own. ``standby``: a
        second edge machine - a standby broker (the same accounts) and a standby coordinator
        (``edge-standby``, checkpoints of its own) - that everyone else moves to when the edge machine
        is lost (:meth:`lose_edge_machine`); the cloud collects the coordinator's checkpoints."""
        from hiertrain.broker.layout import BrokerDir, Settings
        from hiertrain.broker.process import BrokerProcess, available_kind, free_port

        super().__init__(work, JOB, network=network, launch=launch)
        self.model = model
        self.specs = {d.name: d for d in (*devices, *extra)}
        work.mkdir(parents=True, exist_ok=True)
        self.bdir = bdir = BrokerDir(work / "broker")
        bdir.init(Settings(port=free_port(), bind="0.0.0.0" if network else "127.0.0.1", job=JOB))
        for name in self.specs:
            bdir.add_device(name)  # before the broker starts: an embedded broker reads accounts once
        self.broker = self.stack.enter_context(BrokerProcess(bdir, kind=available_kind(), prefix=self._prefix("edge")))
        self.standby_dir = standby_broker(self.stack, bdir, work / "standby-broker") if standby else None
        addresses = (f"127.0.0.1:{self.standby_dir.settings().port}",) if standby else ()
        batch = sum(d.samples for d in self.specs.values())
        from hiertrain.lab.cgroup import CpuQuota

        self.quotas = {d.name: self.stack.enter_context(CpuQuota(d.quota)) for d in self.specs.values() if d.quota}
        self.profiles = measure_profiles(model, max(1, batch // max(1, len(self.specs))), work,
                                         {d.quota for d in self.specs.values()})
        self.fleet_file = work / "fleet.toml"
        self.cloud_profile = None
        if cloud_publishes:
            from hiertrain.profile import Profile

            both = Profile.load(self.profiles[0]).to_json()
            for tier in ("edge", "cloud"):
                (work / f"profile-{tier}.json").write_text(json.dumps({**both, "tiers": {tier: both["tiers"][tier]}}))
            self.profiles = (work / "profile-edge.json", self.profiles[1])
            self.cloud_profile = work / "profile-cloud.json"
        self.describe(medium_mbps, cloud_mbps)
        self.log_file = work / "fleet-log.jsonl"
        self.checkpoints = work / "ck-edge"
        train = {"model": model, "batch": batch, "lr": lr, "optimizer": optimizer, "iterations": iterations,
                 "timeout_s": timeout_s}

        host = network.broker_for if network else {}

        def config(name: str, tier: str, sections: dict[str, Any], broker: Any = bdir) -> Path:
            rt = {"threads": THREADS[tier], "cache": str(work / (f"cache-{name}" if name in self.launch else "cache"))}
            return toml(work / f"{name}.toml", JOB, broker.credentials_file(name if tier == "device" else tier),
                        {"train": train, "runtime": rt, **sections}, host=host.get(name),
                        standby=addresses if broker is bdir else ())

        def edge(policy: str, name: str = "edge", broker: Any = bdir, checkpoints: Path = self.checkpoints) -> Path:
            return config(name, "edge", {
                "fleet": {"file": str(self.fleet_file), "log": str(self.log_file), "devices": wait_for or len(devices),
                          "policy": policy, "planner": str(broker.credentials_file("planner"))},
                "checkpoint": {"dir": str(checkpoints), "every": checkpoint_every or iterations}}, broker)

        self._edge = edge
        cloud = {"fleet": {}, **({"profile": {"file": str(self.cloud_profile)}} if self.cloud_profile else {}),
                 **({"checkpoint": {"dir": str(work / "ck-cloud"), "collect": True}} if standby else {})}
        self.configs = {
            "edge": edge(policy),
            **({"edge-standby": edge(policy, "edge-standby", self.standby_dir, work / "ck-standby")} if standby else {}),
            "cloud": config("cloud", "cloud", cloud),
            **{d.name: config(d.name, "device", {**self._joins(d), "data": d.data or {
                "dataset": "synthetic", "shard": [i, len(self.specs)]}}) for i, d in enumerate(self.specs.values())}}
        watch_creds = replace(Endpoint.load(bdir.credentials_file("planner")), standby=addresses)
        if network:
            watch_creds = replace(watch_creds, host=host["root"])
        self.open_watch(watch_creds)
        self.schedules: dict[int, Schedule] = {}  # version -> the plan the edge published on the schedule topic
        self.steps: dict[int, dict[str, Any]] = {}
        self.states: dict[str, Any] = {}  # account -> its newest status's state

    def describe(self, medium_mbps: float, cloud_mbps: float) -> None:
        """(Re)write the fleet file the edge plans from: the rates, and every device."""
        servers, device = self.profiles
        lines = [f'profile = "{servers}"', f"medium_mbps = {medium_mbps}", f"cloud_mbps = {cloud_mbps}"]
        for d in self.specs.values():
            if d.joins and not d.path:
                continue
            lines += ["[[device]]", f'name = "{d.name}"']
            lines += [f'profile = "{device[d.quota]}"', f"samples = {d.samples}", f"rate_mbps = {d.rate_mbps}",
                      f"private = {str(d.private).lower()}"] if not d.joins else []
            lines += [f"path = [{d.path[0]}, {d.path[1]}]"] if d.path else []
        self.fleet_file.write_text("\n".join(lines) + "\n")

    def _joins(self, d: Spec) -> dict[str, Any]:
        """A device's [fleet] table: empty, or (it joins on its own) what it publishes with its profile."""
        if not d.joins:
            return {"fleet": {}}
        return {"fleet": {"samples": d.samples, "rate_mbps": d.rate_mbps, "private": d.private},
                "profile": {"file": str(self.profiles[1][d.quota])}}

    def rerun(self, policy: str) -> None:
        """Ready for another run: the edge's next plan by ``policy``, its log and checkpoints cleared."""
        import shutil

        self.configs["edge"] = self._edge(policy)
        self.log_file.unlink(missing_ok=True)
        shutil.rmtree(self.checkpoints, ignore_errors=True)
        self.steps.clear()

    # ------------------------------------------------------------------ processes

    def start(self, *names: str, resume: bool = False) -> None:
        """Start the cloud, the edge and the devices named (``resume``: with ``--resume``, as systemd does)."""
        for name in names:
            tier = "edge" if name.startswith("edge") else "cloud" if name == "cloud" else "device"
            self.spawn(name, [tier, "run", "--config", str(self.configs[name]), *(["--resume"] if resume else [])],
                       where=name)

    def lose_edge_machine(self) -> None:
        """The edge machine gone for good: its coordinator and its broker killed (SIGKILL) at once."""
        self.kill("edge")
        self.broker.proc.kill()
        self.broker.proc.wait()

    def wait_online(self, name: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.states.get(name) != "online":
            if time.monotonic() > deadline:
                raise ConfigError(f"{name} did not come online; its log:\n{self.log(name)[-3000:]}")
            self.pump(0.2)

    def on_event(self, ev: Any) -> None:
        if isinstance(ev.topic, topics.AccountTopic) and ev.topic.kind == "status" and isinstance(ev.payload, dict):
            self.states[ev.topic.account] = ev.payload.get("state")
        if isinstance(ev.topic, topics.ScheduleTopic):
            sched = Schedule.from_json(ev.payload)
            self.schedules[sched.version] = sched
        if isinstance(ev.topic, topics.AccountTopic) and ev.topic.kind == "telemetry" \
                and ev.topic.account == "edge" and "fleet" in ev.payload:
            self.steps[ev.payload["iteration"]] = ev.payload

    def wait_step(self, step: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while step not in self.steps:
            if time.monotonic() > deadline or self.procs["edge"].poll() is not None:
                raise ConfigError(f"the fleet did not reach step {step}; edge log:\n{self.log('edge')[-3000:]}")
            self.pump(0.2)

    def wait_until(self, test: Any, timeout: float = 120) -> int:
        """The first step whose telemetry row (``members`` as in the step log) passes ``test``."""
        deadline = time.monotonic() + timeout
        while True:
            for step in sorted(self.steps):
                row = {**self.steps[step], "members": self.steps[step]["fleet"]}
                if test(row):
                    return step
            if time.monotonic() > deadline or self.procs["edge"].poll() is not None:
                raise ConfigError(f"no step as awaited; edge log:\n{self.log('edge')[-3000:]}")
            self.pump(0.2)

    def plan_text(self, version: int) -> str:
        """How the edge's log states plan ``version``: its line and the devices' lines under it."""
        lines = self.log("edge").splitlines()
        head = next((i for i, line in enumerate(lines) if line.startswith(f"edge: plan v{version} ")), None)
        if head is None:
            return f"plan v{version}"
        body = [line for line in lines[head + 1:] if line.startswith("  ")]
        return "\n".join([lines[head][len("edge: "):], *body[:sum(1 for _ in self.specs)]])

    # ------------------------------------------------------------------ results

    def step_log(self) -> list[dict[str, Any]]:
        """The steps as the run finally trained them, in order: a step redone after a resume (the edge
        restarted) counts as its last logged row, which is what the resumed state continued from."""
        rows = [json.loads(line) for line in self.log_file.read_text().splitlines()] if self.log_file.exists() else []
        return sorted({row["step"]: row for row in rows}.values(), key=lambda row: row["step"])

    def final(self) -> Optional[checkpoint.Checkpoint]:
        spec = models.get(self.model)
        return checkpoint.load(self.checkpoints, list(spec.param_shapes()))

    def replay(self, optimizer: Any = None) -> tuple[list[float], dict[str, np.ndarray]]:
        """Single-process training over exactly the samples the step log names, in its order:
        (losses per step, final parameters)."""
        from hiertrain.train import data
        from hiertrain.train.reference import SingleProcess

        spec = models.get(self.model)
        edge_cfg = tierconfig.load("edge", self.configs["edge"])
        ref = SingleProcess(spec, optimizer=optimizer or edge_cfg.optimizer, params=models.init_params(spec, edge_cfg.seed))
        sets = {n: tierconfig.load("device", self.configs[n]).training_data(spec) for n in self.specs}
        losses = []
        for row in self.step_log():
            xs, ys = [], []
            for name, offset, n, _, _ in row["members"]:
                x, y = sets[name].take_raw((offset + np.arange(n)) % len(sets[name]))
                xs.append(data.normalize(x))
                ys.append(y)
            losses.append(ref.step(np.concatenate(xs), np.concatenate(ys)))
        return losses, ref.params
