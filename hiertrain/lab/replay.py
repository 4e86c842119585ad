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


class FleetReplay:
    """A fleet's training in one process over exactly the samples its step log names, a step at a time:
    single-process SGD (exact mode, or ``exact``), or :class:`~hiertrain.train.reference.Periodic` over
    its rounds as the log has them (periodic sync)."""

    def __init__(self, cluster: "Cluster", optimizer: Any = None, *, exact: bool = False) -> None:
        from hiertrain.train.reference import Periodic, SingleProcess

        self.spec = models.get(cluster.job.model)
        edge_cfg = tierconfig.load("edge", cluster.configs["edge"])
        self.rows = step_log(cluster)
        opt, params = optimizer or edge_cfg.optimizer, models.init_params(self.spec, edge_cfg.seed)
        self.periodic = not exact and any("every" in row for row in self.rows)
        self.ref = Periodic(self.spec, optimizer=opt, params=params) if self.periodic else \
            SingleProcess(self.spec, optimizer=opt, params=params)
        self.sets = {n: dataset(cluster, n) for n in cluster.job.specs}

    def step(self, row: dict[str, Any]) -> float:
        from hiertrain.train.fleetroles import Member, Round

        xs, ys = [], []
        for name, offset, n, _, _ in row["members"]:
            x, y = self.sets[name].take_raw((offset + np.arange(n)) % len(self.sets[name]))
            xs.append(x if self.periodic else data.normalize(x))
            ys.append(y)
        x, y = np.concatenate(xs), np.concatenate(ys)
        if not self.periodic:
            return self.ref.step(x, y)
        rnd = Round(row["round"], row["step"], row["version"], self.spec.n_units,
                    tuple(Member(name, n, offset, m, k) for name, offset, n, m, k in row["members"]), row["every"],
                    row["upload"])
        return self.ref.step(rnd, x, y, row["fresh"])

    @property
    def _owner(self) -> Any:
        return self.ref.shared if self.periodic else self.ref

    def state(self) -> dict[str, np.ndarray]:
        """The whole model: weights and optimizer moments (what a site's model carries up)."""
        from hiertrain.train.periodic import state_of

        return state_of(self._owner.params, self._owner.optimizer, self._owner.params)

    def adopt(self, state: dict[str, np.ndarray]) -> None:
        from hiertrain.train.periodic import adopt

        self._owner.params = adopt(self._owner.optimizer, state)

    @property
    def params(self) -> dict[str, np.ndarray]:
        return self.ref.params


def replay(cluster: "Cluster", optimizer: Any = None, *, exact: bool = False) -> tuple[list[float], dict[str, np.ndarray]]:
    """A fleet's run in one process (:class:`FleetReplay`): (losses per step, final parameters)."""
    ours = FleetReplay(cluster, optimizer, exact=exact)
    return [ours.step(row) for row in ours.rows], ours.params


def replay_hierarchy(sites: dict[str, "Cluster"], rounds: list[dict[str, Any]]
                     ) -> dict[str, tuple[list[float], dict[str, np.ndarray]]]:
    """A hierarchical job in one process: each site's fleet (:class:`FleetReplay`) up to each round, the
    average of the sites the averager's log (``rounds``) names, weighted by their samples, taken by the
    sites whose step log says they took it. Per site: (losses per step, final parameters)."""
    from hiertrain.train.hierarchy import average

    ours = {s: FleetReplay(c) for s, c in sites.items()}
    at = dict.fromkeys(sites, 0)
    losses: dict[str, list[float]] = {s: [] for s in sites}
    for r in sorted(rounds, key=lambda r: r["round"]):
        models = {}
        for s, rep in ours.items():  # each site up to its step that sent round r's model
            while at[s] < len(rep.rows):
                row = rep.rows[at[s]]
                losses[s].append(rep.step(row))
                at[s] += 1
                if row.get("average", {}).get("round") == r["round"]:
                    break
            models[s] = (rep.state(), r["samples"].get(s))
        mean = average({s: models[s] for s in r["sites"]})
        for s, rep in ours.items():
            took = rep.rows[at[s] - 1].get("average", {})
            if took.get("round") == r["round"] and "sites" in took:
                rep.adopt(mean)
    for s, rep in ours.items():  # what is left after the last round
        losses[s] += [rep.step(row) for row in rep.rows[at[s]:]]
    return {s: (losses[s], ours[s].params) for s in sites}


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
