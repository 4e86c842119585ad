"""What a local job's run is checked against: the same training in one process, on the samples it
drew (a three-tier job's device batches, a fleet's step log), and the helpers that read its figures."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

from hiertrain import tierconfig
from hiertrain.schedule import Schedule
from hiertrain.train import data, models

if TYPE_CHECKING:
    from hiertrain.lab.cluster import Cluster


def dataset(cluster: "Cluster", device: str = "device") -> data.Dataset:
    """What ``device`` trains on."""
    cfg = tierconfig.load("device", cluster.configs[device])
    return cfg.training_data(models.get(cfg.model))


def reference(cluster: "Cluster", iterations: int, schedule: Optional[Schedule] = None
              ) -> tuple[list[float], dict[str, np.ndarray]]:
    """A three-tier job: single-process training (the job's optimizer and rate) on the batches the
    device draws; with a ``schedule``, its step in one process (:class:`~hiertrain.train.reference.InProcessPlan`:
    what a model with BatchNorm in training mode equals, its statistics per worker), on one thread as the
    slices' tiers run: statistics of a few samples amplify the rounding of the order their sums are taken
    in (threads=0 parts from the run by 8e-6 in 3 steps of a MobileNet, one thread by 1e-8)."""
    from hiertrain.train.optim import OptimizerConfig
    from hiertrain.train.reference import InProcessPlan, SingleProcess
    from hiertrain.train.runtime import Runtime

    job = cluster.job
    opt = OptimizerConfig(job.optimizer, lr=job.lr)
    spec = models.get(job.model)
    ds = dataset(cluster)
    if schedule is None:
        ref = SingleProcess(spec, optimizer=opt)
        losses = [ref.step(*ds.batch(i, job.batch, seed=0)) for i in range(iterations)]
        return losses, ref.params
    plan, ours = schedule.plan(units=spec.n_units, batch=job.batch), InProcessPlan(
        spec, optimizer=opt, runtime=Runtime(threads=1))
    return [ours.step(plan, *ds.batch(i, job.batch, seed=0)) for i in range(iterations)], ours.params


def step_log(cluster: "Cluster") -> list[dict[str, Any]]:
    """A fleet's steps as the run finally trained them, in order: a step redone after a resume (the
    edge restarted) counts as its last logged row, which is what the resumed state continued from."""
    path = cluster.job.log_file
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return sorted({row["step"]: row for row in rows}.values(), key=lambda row: row["step"])


def replay(cluster: "Cluster", optimizer: Any = None, *, exact: bool = False) -> tuple[list[float], dict[str, np.ndarray]]:
    """A fleet: single-process training over exactly the samples the step log names, in its order
    (in periodic sync, unless ``exact``, :class:`~hiertrain.train.reference.Periodic` over its rounds as
    the log has them): (losses per step, final parameters)."""
    from hiertrain.train.fleetroles import Member, Round
    from hiertrain.train.reference import Periodic, SingleProcess

    spec = models.get(cluster.job.model)
    edge_cfg = tierconfig.load("edge", cluster.configs["edge"])
    rows = step_log(cluster)
    opt, params = optimizer or edge_cfg.optimizer, models.init_params(spec, edge_cfg.seed)
    periodic = not exact and any("every" in row for row in rows)
    ref = Periodic(spec, optimizer=opt, params=params) if periodic else SingleProcess(spec, optimizer=opt, params=params)
    sets = {n: dataset(cluster, n) for n in cluster.job.specs}
    losses = []
    for row in rows:
        xs, ys = [], []
        for name, offset, n, _, _ in row["members"]:
            x, y = sets[name].take_raw((offset + np.arange(n)) % len(sets[name]))
            xs.append(x if periodic else data.normalize(x))
            ys.append(y)
        x, y = np.concatenate(xs), np.concatenate(ys)
        if isinstance(ref, Periodic):
            rnd = Round(row["round"], row["step"], row["version"], spec.n_units,
                        tuple(Member(name, n, offset, m, k) for name, offset, n, m, k in row["members"]), row["every"], row["upload"])
            losses.append(ref.step(rnd, x, y, row["fresh"]))
        else:
            losses.append(ref.step(x, y))
    return losses, ref.params


def reports(telemetry: list[tuple[str, dict[str, Any]]], tier: str, version: int, *, skip: int = 0
            ) -> list[dict[str, Any]]:
    """``tier``'s telemetry for the iterations it ran under schedule ``version``, in order, after the first ``skip``."""
    return sorted((p for a, p in telemetry if a == tier and p.get("schedule_version") == version),
                  key=lambda p: p["iteration"])[skip:]


def consecutive(rows: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Pairs of :func:`reports` one iteration apart: a cumulative counter's increase over one iteration."""
    return [(a, b) for a, b in zip(rows, rows[1:]) if b["iteration"] == a["iteration"] + 1]


def rel(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    """Relative L2 distance of parameter sets ``a`` from ``b``."""
    return float(np.sqrt(sum(np.sum((a[k] - b[k]) ** 2) for k in b) / sum(np.sum(b[k] ** 2) for k in b)))
