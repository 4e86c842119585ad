"""A whole hiertrain job on one machine: broker, tier processes, optional planner, and a watcher.

Used by ``hiertrain demo``, the runtime benchmark and the integration tests. Tiers are emulated
by ORT thread counts and, as root, a CPU quota (cgroup v1) on the device's process. Everything
started here is stopped by :meth:`LocalCluster.close` (processes by pid, the broker, the cgroup).
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

import numpy as np

from hiertrain import TIERS
from hiertrain.net import topics
from hiertrain.train import checkpoint, data, models
from hiertrain.lab.emulation import THREADS
from hiertrain.errors import ConfigError, HiertrainError
from hiertrain.lab.harness import Harness, standby_broker, toml, unwinding
from hiertrain.net.transport import Endpoint, Transport
from hiertrain.schedule import Schedule

JOB = "demo"


class LocalCluster(Harness):
    @unwinding
    def __init__(self, work: Path, *, model: str = "lenet5", batch: int = 12, iterations: int = 30, lr: float = 0.05,
                 timeout_s: float = 30.0, every: int = 0, chunk_kb: int = 256, job: str = JOB,
                 broker_dir: Any = None, threads: Optional[dict[str, int]] = None,
                 device_quota: Optional[float] = None, quotas: Optional[dict[str, float]] = None,
                 network: Any = None, launch: Optional[dict[str, list[str]]] = None,
                 collector: Optional[str] = None, standby: bool = False,
                 data: Optional[dict[str, Any]] = None, holdout: int = 0, optimizer: str = "sgd",
                 energy: Optional[dict[str, dict[str, Any]]] = None) -> None:
        """``launch``: per tier, the command that runs Python there (default this interpreter), e.g.
        another virtualenv's or an emulated arm64 machine's; such a tier gets a cache of its own.
        ``every``: worker_o checkpoints every so many iterations into ``ck-<tier>`` of whichever
        tier it is, or, with a ``collector`` tier, into that tier's ``ck-<collector>`` alone.
        ``standby``: a standby broker (a copy of the broker directory, on loopback) that the tiers and
        this cluster's own watch move to when theirs is gone (:attr:`standby_dir`).
        ``data``: the device's ``[data]`` section (default: the synthetic set), ``holdout`` its
        ``[eval] holdout`` (samples it never trains on). ``energy``: per tier, its ``[energy]`` table."""
        from hiertrain.broker.layout import BrokerDir, Settings
        from hiertrain.broker.process import BrokerProcess, available_kind, free_port

        super().__init__(work, job, network=network, launch=launch)  # network: a hiertrain.lab.testbed.Testbed
        self.model, self.batch, self.lr, self.optimizer = model, batch, lr, optimizer
        self.iterations, self.timeout_s = iterations, timeout_s
        self.broker = None
        host = {t: "127.0.0.1" for t in (*TIERS, "root")}
        if network is not None:
            host = dict(network.broker_for)
        if broker_dir is None:
            broker_dir = BrokerDir(work / "broker")
            broker_dir.init(Settings(port=free_port(), bind="0.0.0.0" if network else "127.0.0.1", job=job))
            self.broker = self.stack.enter_context(BrokerProcess(broker_dir, kind=available_kind(),
                                                                 prefix=self._prefix("edge")))
        self.bdir = broker_dir
        self.standby_dir: Any = None
        if standby:
            if network is not None:
                raise ConfigError("a standby broker runs on loopback only, not in the testbed")
            self.standby_dir = standby_broker(self.stack, broker_dir, work / "standby-broker")
        addresses = (f"127.0.0.1:{self.standby_dir.settings().port}",) if standby else ()
        for tier, cores in {**({"device": device_quota} if device_quota else {}), **(quotas or {})}.items():
            from hiertrain.lab.cgroup import CpuQuota

            self.quotas[tier] = self.stack.enter_context(CpuQuota(cores))
        threads = {**THREADS, **(threads or {})}
        self.host = host
        self.configs = {t: toml(work / f"{t}.toml", job, broker_dir.credentials_file(t), {
            "train": {"model": model, "batch": batch, "lr": lr, "optimizer": optimizer, "iterations": iterations,
                      "timeout_s": timeout_s},
            "runtime": {"threads": threads[t], "cache": str(work / (f"cache-{t}" if t in self.launch else "cache")),
                        "chunk_kb": chunk_kb},
            **({"checkpoint": {"every": every, **({"dir": str(work / f"ck-{t}")} if collector in (None, t) else {}),
                               **({"collect": True} if collector == t else {})}} if every else {}),
            **({"data": data} if data and t == "device" else {}),
            **({"eval": {"holdout": holdout}} if holdout and t == "device" else {}),
            **({"energy": energy[t]} if energy and t in energy else {})},
            host=host[t], standby=addresses) for t in TIERS}
        planner_creds = replace(Endpoint.load(broker_dir.credentials_file("planner")), host=host["root"],
                                standby=addresses)
        # publishes schedules as the planner would, without a status: it is no planner (and holds no lease)
        self.planner = self.stack.enter_context(Transport(planner_creds, account="planner", job=job, observer=True))
        self.open_watch(planner_creds)
        self.telemetry: list[tuple[str, dict[str, Any]]] = []
        self.status: list[tuple[str, dict[str, Any]]] = []
        self.schedules: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ processes

    def publish(self, schedule: dict[str, Any]) -> None:
        """Publish a schedule as the planner would (retained)."""
        self.planner.publish_json(topics.schedule(self.job), schedule, retain=True)
        self.planner.flush()

    def start(self, *tiers: str, resume: bool = False) -> None:
        for tier in tiers or ("cloud", "edge", "device"):
            self.spawn(tier, [tier, "run", "--config", str(self.configs[tier]), *(["--resume"] if resume else [])],
                       where=tier)

    def start_planner(self, profile: Path, *, bw_device_edge: float, bw_edge_cloud: float,
                      cost_model: str = "paper", on_standby: bool = False) -> None:
        """The planner service next to the broker (``on_standby``: a second one, next to the
        standby broker, as process ``planner-standby``)."""
        name, bdir = ("planner-standby", self.standby_dir) if on_standby else ("planner", self.bdir)
        cfg = toml(self.work / f"{name}.toml", self.job, bdir.credentials_file("planner"), {
            "planner": {"batch": self.batch, "profile": str(profile), "bw_device_edge": bw_device_edge,
                        "bw_edge_cloud": bw_edge_cloud, "cost_model": cost_model}},
            host="127.0.0.1" if on_standby else self.host["edge"])
        self.spawn(name, ["planner", "run", "--config", str(cfg)], where="edge")

    # -------------------------------------------------------------------- watching

    def on_event(self, ev: Any) -> None:
        if isinstance(ev.topic, topics.ScheduleTopic):
            self.schedules.append(ev.payload)
        else:
            (self.telemetry if ev.topic.kind == "telemetry" else self.status).append((ev.topic.account, ev.payload))

    def wait_iteration(self, iteration: int, timeout: float = 60) -> None:
        """Wait until worker_o (or a chain's last stage) has finished ``iteration``."""
        deadline = time.monotonic() + timeout
        while not any(p.get("iteration", -1) >= iteration for _, p in self.telemetry if "loss" in p):
            if time.monotonic() > deadline:
                raise TimeoutError(f"no telemetry for iteration {iteration} within {timeout} s")
            self.pump()

    def wait_version(self, version: int, count: int, timeout: float = 600) -> int:
        """Wait until worker_o (or a chain's last stage) has finished ``count`` iterations stamped with
        schedule ``version``; returns the newest iteration finished."""
        deadline = time.monotonic() + timeout
        while True:
            ends = {p["iteration"] for _, p in self.telemetry if "loss" in p}
            if sum(1 for i, v in self.versions().items() if v == version and i in ends) >= count:
                return max(ends)
            if time.monotonic() > deadline:
                raise TimeoutError(f"schedule version {version}: fewer than {count} iterations within {timeout} s")
            failed = {n: p.returncode for n, p in self.procs.items() if p.poll() is not None}
            if failed:
                raise HiertrainError(f"processes ended during the run (exit codes {failed}); "
                                     f"device log: {self.log('device')[-300:]}")
            self.pump()

    def wait(self, tiers: tuple[str, ...] = TIERS, timeout: float = 120) -> dict[str, Optional[int]]:
        return super().wait(tiers, timeout)

    def losses(self) -> dict[int, float]:
        return {p["iteration"]: p["loss"] for _, p in self.telemetry if "loss" in p}

    def redone(self) -> list[int]:
        """Iterations whose loss more than one run reported (an abandoned attempt, then again); a
        report sent again after a reconnection is the same run's, and not counted twice."""
        runs = Counter(i for i, _ in {(p["iteration"], p.get("run")) for _, p in self.telemetry if "loss" in p})
        return sorted(i for i, n in runs.items() if n > 1)

    def seconds_per_iteration(self, version: int, *, skip: int = 2) -> Optional[float]:
        """Median interval between worker_o (or a chain's last stage) finishing consecutive
        iterations that ran schedule ``version``, after ``skip`` iterations of settling."""
        ends = {p["iteration"]: p["t"] for _, p in self.telemetry if "loss" in p}
        its = sorted(i for i, v in self.versions().items() if v == version and i - 1 in ends and i in ends)[skip:]
        return statistics.median(ends[i] - ends[i - 1] for i in its) if its else None

    def link_rates(self, version: int, *, skip: int = 0) -> dict[str, float]:
        """Median measured rate of each link (Mbit/s, payload) over the iterations of ``version``
        (after its first ``skip``)."""
        its = sorted(i for i, v in self.versions().items() if v == version)[skip:]
        seen: dict[str, list[float]] = {}
        for _, p in self.telemetry:
            if p.get("schedule_version") == version and p.get("iteration") in its:
                for link, mbps in p.get("links", {}).items():
                    seen.setdefault(link, []).append(mbps)
        return {link: statistics.median(v) for link, v in seen.items()}

    def versions(self) -> dict[int, int]:
        return {p["iteration"]: p["schedule_version"] for a, p in self.telemetry if a == "device"}

    def final_checkpoint(self) -> Optional[checkpoint.Checkpoint]:
        names = list(models.get(self.model).param_shapes())
        found = [c for c in (checkpoint.load(self.work / f"ck-{t}", names) for t in TIERS) if c is not None]
        return max(found, key=lambda c: c.iteration) if found else None

    def dataset(self) -> data.Dataset:
        """What the device trains on."""
        from hiertrain import tierconfig

        cfg = tierconfig.load("device", self.configs["device"])
        return cfg.training_data(models.get(cfg.model))


def reports(telemetry: list[tuple[str, dict[str, Any]]], tier: str, version: int, *, skip: int = 0
            ) -> list[dict[str, Any]]:
    """``tier``'s telemetry for the iterations it ran under schedule ``version``, in order, after the first ``skip``."""
    return sorted((p for a, p in telemetry if a == tier and p.get("schedule_version") == version),
                  key=lambda p: p["iteration"])[skip:]


def consecutive(rows: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Pairs of :func:`reports` one iteration apart: a cumulative counter's increase over one iteration."""
    return [(a, b) for a, b in zip(rows, rows[1:]) if b["iteration"] == a["iteration"] + 1]


def reference(cluster: LocalCluster, iterations: int, schedule: Optional[Schedule] = None
              ) -> tuple[list[float], dict[str, np.ndarray]]:
    """Single-process training (the cluster's optimizer and rate) on the batches the device draws; with a
    ``schedule``, its step in one process (:class:`~hiertrain.train.reference.InProcessPlan`: what a model
    with BatchNorm in training mode equals, its statistics per worker), on one thread as the slices' tiers run: statistics of a
    few samples amplify the rounding of the order their sums are taken in (threads=0 parts from the
    run by 8e-6 in 3 steps of a MobileNet, one thread by 1e-8)."""
    from hiertrain.train.reference import InProcessPlan, SingleProcess
    from hiertrain.train.optim import OptimizerConfig
    from hiertrain.train.runtime import Runtime

    opt = OptimizerConfig(cluster.optimizer, lr=cluster.lr)
    spec = models.get(cluster.model)
    ds = cluster.dataset()
    if schedule is None:
        ref = SingleProcess(spec, optimizer=opt)
        losses = [ref.step(*ds.batch(i, cluster.batch, seed=0)) for i in range(iterations)]
        return losses, ref.params
    plan, ours = schedule.plan(units=spec.n_units, batch=cluster.batch), InProcessPlan(
        spec, optimizer=opt, runtime=Runtime(threads=1))
    return [ours.step(plan, *ds.batch(i, cluster.batch, seed=0)) for i in range(iterations)], ours.params


def rel(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    """Relative L2 distance of parameter sets ``a`` from ``b``."""
    return float(np.sqrt(sum(np.sum((a[k] - b[k]) ** 2) for k in b) / sum(np.sum(b[k] ** 2) for k in b)))
