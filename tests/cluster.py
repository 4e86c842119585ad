"""Helpers for the integration tests: schedules, the single-process reference, comparisons."""

from __future__ import annotations

import json
from typing import Any

from hiertrain.lab.cluster import Cluster
from hiertrain.lab.replay import reference, rel

__all__ = ["chain", "dump", "equals_single_process", "reference", "rel", "schedule"]
from hiertrain.schedule import Schedule


def schedule(o: str, s: str, l: str, m_s: int, m_l: int, b_o: int, b_s: int, b_l: int, *, version: int,
             effective: int = 0, replica_every: int = 0) -> dict[str, Any]:
    return Schedule(mapping={"o": o, "s": s, "l": l}, m_s=m_s, m_l=m_l, b_o=b_o, b_s=b_s, b_l=b_l,
                    iteration_s=0.0, replica_every=replica_every).versioned(version, effective).to_json()


def chain(tiers, cuts, *, version, effective=0, bits=0, policy="jointdnn+", replica_every=0) -> dict[str, Any]:
    """A layer chain of LeNet-5 (7 units) at batch 12."""
    from dataclasses import replace

    from hiertrain.planner.baselines import chain_schedule

    sched = chain_schedule(tiers, cuts, 7, 12, policy=policy, compress_bits=bits)
    return replace(sched, replica_every=replica_every).versioned(version, effective).to_json()


def equals_single_process(cluster: Cluster, iterations: int, plan: Any = None, *, tol: float = 1e-4
                          ) -> tuple[dict[int, float], dict[str, Any]]:
    """Every iteration 0..n-1 finished once, each loss within ``tol`` (relative) of single-process
    training on the same batches (with a ``plan``, of its hybrid iteration in one process); returns
    the run's losses and the reference weights."""
    ref_losses, ref_params = reference(cluster, iterations, None if plan is None else Schedule.from_json(plan))
    losses = cluster.losses()
    assert sorted(losses) == list(range(iterations))  # none lost, none done twice
    worst = max(range(iterations), key=lambda i: abs(losses[i] - ref_losses[i]) / ref_losses[i])
    assert abs(losses[worst] - ref_losses[worst]) / ref_losses[worst] < tol, \
        f"iteration {worst}: loss {losses[worst]} against {ref_losses[worst]} in one process"
    return losses, ref_params


def dump(cluster: Cluster) -> str:
    return "\n".join(f"--- {t}\n{cluster.log(t)[-3000:]}" for t in cluster.procs) + json.dumps(cluster.status[-6:])
