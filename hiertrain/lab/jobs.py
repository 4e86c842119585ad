"""The jobs the local harness (:class:`hiertrain.lab.cluster.Cluster`) runs, as an operator writes
them: which accounts they enroll, the config of each process, who drives the clock.

- :class:`ThreeTier`: HierTrain's job - one device holding the data (it drives the clock), the edge
  and the cloud, planned by the planner service or by schedules published by hand.
- :class:`Fleet`: N enrolled devices, each with its own account, data and config, the edge's
  coordinator (it drives the clock and plans them) and the cloud worker.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from hiertrain import TIERS
from hiertrain.lab.emulation import THREADS

if TYPE_CHECKING:
    from hiertrain.lab.cluster import Cluster


@dataclass
class ThreeTier:
    """``every``: worker_o checkpoints every so many iterations into ``ck-<tier>`` of whichever tier it
    is, or, with a ``collector`` tier, into that tier's ``ck-<collector>`` alone. ``data``: the device's
    ``[data]`` section (default: the synthetic set), ``holdout`` its ``[eval] holdout`` (samples it
    never trains on). ``threads``: per tier, its ORT threads (default: as emulated). ``energy``: per
    tier, its ``[energy]`` table. ``dilation``: per tier, its kernel dilation (an emulated device's
    kernels apart from its interpreter, :func:`hiertrain.lab.emulation.split`)."""

    name: str = "demo"
    model: str = "lenet5"
    batch: int = 12
    iterations: int = 30
    lr: float = 0.05
    optimizer: str = "sgd"
    timeout_s: float = 30.0
    every: int = 0
    chunk_kb: int = 256
    threads: Optional[dict[str, int]] = None
    collector: Optional[str] = None
    data: Optional[dict[str, Any]] = None
    holdout: int = 0
    energy: Optional[dict[str, dict[str, Any]]] = None
    eval_every: int = 0      # the model's owner (whichever tier) scores held-out accuracy every N iterations
    eval_samples: int = 512  # on this many held-out samples
    dilation: Optional[dict[str, float]] = None
    driver = "device"

    def accounts(self) -> tuple[str, ...]:
        return ()  # every broker directory has the three tiers' accounts

    def quotas(self) -> dict[str, float]:
        return {}

    def processes(self) -> tuple[str, ...]:
        return ("cloud", "edge", "device")

    def tier_of(self, name: str) -> str:
        return name

    def on_edge_machine(self) -> tuple[str, ...]:
        return ("edge", "planner")

    def write(self, cluster: "Cluster") -> dict[str, Path]:
        threads = {**THREADS, **(self.threads or {})}
        train = {"model": self.model, "batch": self.batch, "lr": self.lr, "optimizer": self.optimizer,
                 "iterations": self.iterations, "timeout_s": self.timeout_s}

        def sections(t: str) -> dict[str, Any]:
            return {
                "train": train,
                "runtime": {"threads": threads[t], "cache": cluster.cache(t), "chunk_kb": self.chunk_kb,
                            **({"kernel_dilation": self.dilation[t]} if (self.dilation or {}).get(t, 1.0) > 1 else {})},
                **({"checkpoint": {"every": self.every,
                                   **({"dir": str(cluster.work / f"ck-{t}")} if self.collector in (None, t) else {}),
                                   **({"collect": True} if self.collector == t else {})}} if self.every else {}),
                **({"data": self.data} if self.data and t == "device" else {}),
                **({"eval": {**({"holdout": self.holdout} if self.holdout and t == "device" else {}),
                             **({"every": self.eval_every, "samples": self.eval_samples} if self.eval_every else {})}}
                   if self.eval_every or (self.holdout and t == "device") else {}),
                **({"energy": self.energy[t]} if self.energy and t in self.energy else {})}

        return {t: cluster.config(t, t, sections(t)) for t in TIERS}


@dataclass(frozen=True)
class Spec:
    """One device of a fleet."""

    name: str
    samples: int                 # per step
    rate_mbps: float = 20.0      # its radio
    private: bool = False
    path: Optional[tuple[int, int]] = None  # pinned (m, k); None: the planner chooses
    data: Optional[dict[str, Any]] = None   # its [data] section (default: its shard of the synthetic set)
    quota: Optional[float] = None           # its CPU, in cores (cgroup v1, as root): how slow a device it is
    joins: bool = False                     # it publishes its own profile to join; the fleet file holds only
                                            # its pinned path, if any
    energy: Optional[dict[str, Any]] = None  # its [energy] section (power model, budgets, battery)


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


@dataclass
class Fleet:
    """``devices`` start with the run; ``extra`` are enrolled and described too, started later to join
    it. The edge waits for ``wait_for`` devices (default all of ``devices``). ``cloud_publishes``: the
    fleet file's profile has only the edge's timings; the cloud worker publishes its own. With a
    standby broker (the cluster's ``standby``), a second edge machine: a standby coordinator
    (``edge-standby``, checkpoints of its own) that everyone moves to when the edge machine is lost;
    the cloud collects the coordinator's checkpoints."""

    devices: list[Spec]
    extra: tuple[Spec, ...] = ()
    name: str = "fleet"
    model: str = "lenet5"
    iterations: int = 12
    lr: float = 0.05
    optimizer: str = "sgd"
    timeout_s: float = 30.0
    wait_for: Optional[int] = None
    medium_mbps: float = 40.0
    cloud_mbps: float = 10.0
    policy: str = "hiertrain"
    checkpoint_every: int = 0
    cloud_publishes: bool = False
    eval_every: int = 0      # the edge scores held-out accuracy every N steps
    eval_samples: int = 512  # on this many held-out samples
    sync: Any = "exact"      # the edge's [fleet] sync: "exact", {"every": K} or {"up_to": K}
    data: Optional[dict[str, Any]] = None  # a [data] table every device takes its shard of (default: synthetic)
    holdout: int = 0         # ... less its first N samples, which the edge scores on ([eval] holdout)
    hierarchy: Optional[dict[str, Any]] = None  # the edge's [hierarchy] table: a site of a hierarchical job
    profiles: Any = None     # measured profiles to reuse (another job's, of the same model and devices)
    driver = "edge"

    def __post_init__(self) -> None:
        self.specs = {d.name: d for d in (*self.devices, *self.extra)}
        self.batch = sum(d.samples for d in self.specs.values())

    def accounts(self) -> tuple[str, ...]:
        return tuple(self.specs)

    def quotas(self) -> dict[str, float]:
        return {d.name: d.quota for d in self.specs.values() if d.quota}

    def processes(self) -> tuple[str, ...]:
        return ("edge", "cloud", *(d.name for d in self.devices))

    def tier_of(self, name: str) -> str:
        return "edge" if name.startswith("edge") else "cloud" if name == "cloud" else "device"

    def on_edge_machine(self) -> tuple[str, ...]:
        return ("edge",)

    def write(self, cluster: "Cluster") -> dict[str, Path]:
        work = cluster.work
        self.profiles = self.profiles or measure_profiles(self.model, max(1, self.batch // max(1, len(self.specs))),
                                                          work, {d.quota for d in self.specs.values()})
        self.fleet_file, self.log_file, self.checkpoints = work / "fleet.toml", work / "fleet-log.jsonl", work / "ck-edge"
        if self.cloud_publishes:
            from hiertrain.profile import Profile

            both = Profile.load(self.profiles[0]).to_json()
            for tier in ("edge", "cloud"):
                (work / f"profile-{tier}.json").write_text(json.dumps({**both, "tiers": {tier: both["tiers"][tier]}}))
            self.profiles = (work / "profile-edge.json", self.profiles[1])
        self.describe(self.medium_mbps, self.cloud_mbps)
        standby = cluster.standby_dir
        cloud = {"fleet": {}, **({"profile": {"file": str(work / "profile-cloud.json")}} if self.cloud_publishes else {}),
                 **({"checkpoint": {"dir": str(work / "ck-cloud"), "collect": True}} if standby else {})}
        return {
            "edge": self.edge(cluster, self.policy),
            **({"edge-standby": self.edge(cluster, self.policy, "edge-standby", standby, work / "ck-standby")}
               if standby else {}),
            "cloud": cluster.config("cloud", "cloud", self._sections(cluster, "cloud", cloud)),
            **{d.name: cluster.config(d.name, "device", self._sections(cluster, d.name, {
                **self._joins(d), **({"energy": d.energy} if d.energy else {}), "data": d.data or {**(self.data or {"dataset": "synthetic"}), "shard": [i, len(self.specs)]},
                **({"eval": {"holdout": self.holdout}} if self.holdout else {})}))
               for i, d in enumerate(self.specs.values())}}

    def _sections(self, cluster: "Cluster", name: str, sections: dict[str, Any]) -> dict[str, Any]:
        train = {"model": self.model, "batch": self.batch, "lr": self.lr, "optimizer": self.optimizer,
                 "iterations": self.iterations, "timeout_s": self.timeout_s}
        return {"train": train, "runtime": {"threads": THREADS[self.tier_of(name)], "cache": cluster.cache(name)},
                **sections}

    def edge(self, cluster: "Cluster", policy: str, name: str = "edge", broker: Any = None,
             checkpoints: Optional[Path] = None) -> Path:
        """The config of the edge's coordinator ``name`` planning by ``policy``."""
        broker = broker or cluster.bdir
        return cluster.config(name, "edge", self._sections(cluster, name, {
            "fleet": {"file": str(self.fleet_file), "log": str(self.log_file),
                      "devices": self.wait_for or len(self.devices), "policy": policy, "sync": self.sync,
                      "planner": str(broker.credentials_file("planner"))},
            "checkpoint": {"dir": str(checkpoints or self.checkpoints),
                           "every": self.checkpoint_every or self.iterations},
            **({"data": self.data} if self.data else {}),
            **({"hierarchy": self.hierarchy} if self.hierarchy else {}),
            **({"eval": {"every": self.eval_every, "samples": self.eval_samples,
                         **({"holdout": self.holdout} if self.holdout else {})}} if self.eval_every else {})}),
            broker=broker)

    def describe(self, medium_mbps: float, cloud_mbps: float, keys: Optional[dict[str, dict[str, Any]]] = None) -> None:
        """(Re)write the fleet file the edge plans from: the rates, and every device (with ``keys[name]``,
        more of its ``[[device]]`` keys: a pinned ``path``, its ``power`` class, ``budget_j``, ``budget_w``)."""
        servers, device = self.profiles
        lines = [f'profile = "{servers}"', f"medium_mbps = {medium_mbps}", f"cloud_mbps = {cloud_mbps}"]
        for d in self.specs.values():
            more = {**({"path": list(d.path)} if d.path else {}), **(keys or {}).get(d.name, {})}
            if d.joins and not more:
                continue
            lines += ["[[device]]", f'name = "{d.name}"']
            lines += [f'profile = "{device[d.quota]}"', f"samples = {d.samples}", f"rate_mbps = {d.rate_mbps}",
                      f"private = {str(d.private).lower()}"] if not d.joins else []
            lines += [f"{k} = {json.dumps(v)}" for k, v in more.items()]  # (JSON's strings, numbers, lists are TOML's)
        self.fleet_file.write_text("\n".join(lines) + "\n")

    def _joins(self, d: Spec) -> dict[str, Any]:
        """A device's [fleet] table: empty, or (it joins on its own) what it publishes with its profile."""
        if not d.joins:
            return {"fleet": {}}
        return {"fleet": {"samples": d.samples, "rate_mbps": d.rate_mbps, "private": d.private},
                "profile": {"file": str(self.profiles[1][d.quota])}}

    def rerun(self, cluster: "Cluster", policy: str) -> None:
        """Ready for another run: the edge's next plan by ``policy``, its log and checkpoints cleared."""
        cluster.configs["edge"] = self.edge(cluster, policy)
        self.log_file.unlink(missing_ok=True)
        shutil.rmtree(self.checkpoints, ignore_errors=True)
        cluster.steps.clear()
