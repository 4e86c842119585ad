"""Three tier processes on a real Mosquitto, driven by schedules the test publishes as the planner."""

from __future__ import annotations

import json
import queue
import subprocess
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

from hiertrain import checkpoint, data, models, topics
from hiertrain.hybrid import SingleProcess
from hiertrain.optim import OptimizerConfig
from hiertrain.schedule import Schedule
from hiertrain.transport import Endpoint, Transport

from conftest import PYTHON, ROOT

TIERS = ("device", "edge", "cloud")


def schedule(o: str, s: str, l: str, m_s: int, m_l: int, b_o: int, b_s: int, b_l: int, *, version: int,
             effective: int = 0) -> dict[str, Any]:
    return Schedule(mapping={"o": o, "s": s, "l": l}, m_s=m_s, m_l=m_l, b_o=b_o, b_s=b_s, b_l=b_l,
                    iteration_s=0.0).versioned(version, effective).to_json()


class Cluster:
    def __init__(self, broker_dir: Any, work: Path, *, model: str = "lenet5", batch: int = 12, iterations: int = 30,
                 lr: float = 0.05, timeout_s: float = 30.0, every: int = 0, chunk_kb: int = 16) -> None:
        self.bdir, self.work, self.model, self.batch, self.lr = broker_dir, work, model, batch, lr
        self.iterations, self.timeout_s, self.every = iterations, timeout_s, every
        self.procs: dict[str, subprocess.Popen] = {}
        self.configs = {t: self._config(t, chunk_kb) for t in TIERS}
        self.planner = Transport(Endpoint.load(broker_dir.credentials_file("planner")), account="planner", job="t",
                                 client_id="test-planner").start()
        self.watch = Transport(Endpoint.load(broker_dir.credentials_file("planner")), account="planner", job="t",
                               observer=True)
        self.watch.subscribe(topics.all_of_kind("t", "telemetry"))
        self.watch.subscribe(topics.all_of_kind("t", "status"))
        self.watch.start()
        self.telemetry: list[tuple[str, dict[str, Any]]] = []
        self.status: list[tuple[str, dict[str, Any]]] = []

    def _config(self, tier: str, chunk_kb: int) -> Path:
        path = self.work / f"{tier}.toml"
        ck = f'[checkpoint]\ndir = "{self.work / ("ck-" + tier)}"\nevery = {self.every}\n' if self.every else ""
        path.write_text(
            f'job = "t"\n[broker]\ncredentials = "{self.bdir.credentials_file(tier)}"\n'
            f'[train]\nmodel = "{self.model}"\nbatch = {self.batch}\nlr = {self.lr}\niterations = {self.iterations}\n'
            f'timeout_s = {self.timeout_s}\n[runtime]\nthreads = 1\ncache = "{self.work / "cache"}"\nchunk_kb = {chunk_kb}\n'
            + ck)
        return path

    def publish(self, sched: dict[str, Any]) -> None:
        self.planner.publish_json(topics.schedule("t"), sched, retain=True)
        self.planner.flush()

    def start(self, *tiers: str, resume: bool = False) -> None:
        for tier in tiers or TIERS:
            log = open(self.work / f"{tier}.log", "a")
            self.procs[tier] = subprocess.Popen(
                [PYTHON, "-m", "hiertrain", tier, "run", "--config", str(self.configs[tier]), *(["--resume"] if resume else [])],
                stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
            log.close()

    def pump(self, timeout: float = 0.2) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                ev = self.watch.events.get(timeout=max(0.0, deadline - time.monotonic()) or 0.001)
            except queue.Empty:
                return
            target = self.telemetry if ev.topic.kind == "telemetry" else self.status
            target.append((ev.topic.account, ev.payload))

    def wait_iteration(self, iteration: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not any(p.get("iteration", -1) >= iteration for _, p in self.telemetry):
            assert time.monotonic() < deadline, f"no telemetry for iteration {iteration}"
            self.pump()

    def wait(self, timeout: float = 120) -> dict[str, Optional[int]]:
        codes = {}
        for tier, proc in self.procs.items():
            try:
                codes[tier] = proc.wait(timeout)
            except subprocess.TimeoutExpired:
                codes[tier] = None
        self.pump(0.5)
        return codes

    def log(self, tier: str) -> str:
        return (self.work / f"{tier}.log").read_text()

    def losses(self) -> dict[int, float]:
        return {p["iteration"]: p["loss"] for _, p in self.telemetry if "loss" in p}

    def versions(self) -> dict[int, int]:
        return {p["iteration"]: p["schedule_version"] for a, p in self.telemetry if a == "device"}

    def final_params(self) -> Optional[checkpoint.Checkpoint]:
        names = list(models.get(self.model).param_shapes())
        found = [c for c in (checkpoint.load(self.work / f"ck-{t}", names) for t in TIERS) if c is not None]
        return max(found, key=lambda c: c.iteration) if found else None

    def reference(self, iterations: int) -> tuple[list[float], dict[str, np.ndarray]]:
        spec = models.get(self.model)
        ds = data.load("synthetic", shape=spec.input_shape, classes=spec.classes, seed=0)
        ref = SingleProcess(spec, optimizer=OptimizerConfig("sgd", lr=self.lr))
        losses = [ref.step(*ds.batch(i, self.batch, seed=0)) for i in range(iterations)]
        return losses, ref.params

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        self.planner.stop()
        self.watch.stop()


def rel(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    return float(np.sqrt(sum(np.sum((a[k] - b[k]) ** 2) for k in b) / sum(np.sum(b[k] ** 2) for k in b)))


def dump(cluster: Cluster) -> str:
    return "\n".join(f"--- {t}\n{cluster.log(t)[-3000:]}" for t in cluster.procs) + json.dumps(cluster.status[-6:])
