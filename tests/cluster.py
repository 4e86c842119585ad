"""Helpers for the integration tests: schedules, the single-process reference, comparisons."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from hiertrain import models
from hiertrain.hybrid import SingleProcess
from hiertrain.local import LocalCluster
from hiertrain.optim import OptimizerConfig
from hiertrain.schedule import Schedule


def schedule(o: str, s: str, l: str, m_s: int, m_l: int, b_o: int, b_s: int, b_l: int, *, version: int,
             effective: int = 0, replica_every: int = 0) -> dict[str, Any]:
    return Schedule(mapping={"o": o, "s": s, "l": l}, m_s=m_s, m_l=m_l, b_o=b_o, b_s=b_s, b_l=b_l,
                    iteration_s=0.0, replica_every=replica_every).versioned(version, effective).to_json()


def reference(cluster: LocalCluster, iterations: int) -> tuple[list[float], dict[str, np.ndarray]]:
    """Single-process training on the batches the device draws."""
    spec = models.get(cluster.model)
    ds = cluster.dataset()
    ref = SingleProcess(spec, optimizer=OptimizerConfig("sgd", lr=cluster.lr))
    losses = [ref.step(*ds.batch(i, cluster.batch, seed=0)) for i in range(iterations)]
    return losses, ref.params


def rel(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    return float(np.sqrt(sum(np.sum((a[k] - b[k]) ** 2) for k in b) / sum(np.sum(b[k] ** 2) for k in b)))


def dump(cluster: LocalCluster) -> str:
    return "\n".join(f"--- {t}\n{cluster.log(t)[-3000:]}" for t in cluster.procs) + json.dumps(cluster.status[-6:])
