"""Policies: HierTrain and the paper's baselines, each returning a schedule the runtime can execute.

- ``all-device`` / ``all-edge`` / ``all-cloud``: one tier trains everything (O/S/L with b_o = B);
- ``jointdnn``: device-cloud layer split, all samples (chain device -> cloud, best cut);
- ``jointdnn+``: device-edge-cloud three-stage chain, best pair of cuts;
- ``jalad``: edge-cloud layer split with the cut's activations quantised to 8 bits; the device
  sends all samples to the edge.

- ``hiertrain``: the best of the hybrid O/S/L optimum and the exact chains (see :func:`plan`).

Chains are timed by :func:`planner.costmodel.chain_time` (the paper's terms, summed along the
chain); single-tier plans by the paper's model, where both agree. Every policy can be planned
under either cost model (``paper`` or ``calibrated``).
"""

from __future__ import annotations

import time
from dataclasses import replace
from itertools import combinations_with_replacement
from typing import Iterable, Sequence

from hiertrain import TIERS
from hiertrain.errors import PlanError
from hiertrain.profile import Profile
from hiertrain.schedule import Schedule, Stage
from hiertrain.planner import solver
from hiertrain.planner.costmodel import Bandwidth, chain_time, iteration_time, tables

POLICIES: tuple[str, ...] = ("hiertrain", "all-device", "all-edge", "all-cloud", "jointdnn", "jointdnn+", "jalad")
SOLVERS: tuple[str, ...] = ("exact", "milp")


def single_tier(tier: str, batch: int, *, policy: str) -> Schedule:
    others = [t for t in TIERS if t != tier]
    return Schedule(mapping={"o": tier, "s": others[0], "l": others[1]}, m_s=0, m_l=0, b_o=batch, b_s=0, b_l=0,
                    policy=policy)


def chain_schedule(tiers: Sequence[str], cuts: Sequence[int], n: int, batch: int, *, policy: str,
                   compress_bits: int = 0) -> Schedule:
    """Stages on ``tiers`` split at ``cuts`` (non-decreasing, 0..n); empty stages are dropped."""
    bounds = [0, *cuts, n]
    stages = tuple(Stage(t, a + 1, b) for t, a, b in zip(tiers, bounds, bounds[1:]) if b > a)
    last = stages[-1].tier
    others = [t for t in TIERS if t != last]
    return Schedule(mapping={"o": last, "s": others[0], "l": others[1]}, m_s=0, m_l=0, b_o=batch, b_s=0, b_l=0,
                    policy=policy, chain=stages, compress_bits=compress_bits if len(stages) > 1 else 0)


def _chains(policy: str, n: int) -> tuple[Sequence[str], Iterable[tuple[int, ...]], int]:
    if policy == "jointdnn":
        return ("device", "cloud"), ((k,) for k in range(n + 1)), 0
    if policy == "jointdnn+":
        return ("device", "edge", "cloud"), combinations_with_replacement(range(n + 1), 2), 0
    if policy == "jalad":
        return ("edge", "cloud"), ((k,) for k in range(n + 1)), 8
    raise PlanError(f"unknown policy {policy!r}; available: {', '.join(POLICIES)}")


def _best_chain(profile: Profile, bw: Bandwidth, batch: int, policy: str, cost_model: str,
                tiers: Sequence[str], cut_sets: Iterable[tuple[int, ...]], bits: int) -> tuple[float, Schedule | None]:
    tab = tables(profile, bw, cost_model)
    best, sched = float("inf"), None
    for cuts in cut_sets:
        cand = chain_schedule(tiers, cuts, profile.n_units, batch, policy=policy, compress_bits=bits)
        value = chain_time(tab, cand.chain, batch, compress_bits=cand.compress_bits)
        if value < best:
            best, sched = value, cand
    return best, sched


def plan(profile: Profile, bw: Bandwidth, batch: int, *, policy: str = "hiertrain", cost_model: str = "paper",
         solver_name: str = "exact") -> Schedule:
    """One planning decision: the policy's best schedule and its predicted iteration time.

    ``hiertrain`` is the best of the hybrid O/S/L optimum (eq. 12, solved exactly) and every exact
    layer chain device -> edge -> cloud (JointDNN+'s space, which contains JointDNN's and the
    single-tier plans): a chain's stages own their weights and never synchronise them, which can
    beat every O/S/L schedule when weights are large. Lossy chains (JALAD) are not considered: a
    hiertrain iteration stays exactly one SGD step.
    """
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise PlanError(f"batch size must be an integer >= 1, got {batch!r}")
    profile.require_tiers()
    tables(profile, bw, cost_model)  # checks the cost model (and its calibration) up front
    t0 = time.perf_counter()
    if policy == "hiertrain":
        if solver_name == "milp":
            if cost_model != "paper":
                raise PlanError("the MILP solver implements the paper's cost model only")
            from hiertrain.planner import milp

            hybrid = milp.solve(profile, bw, batch)
        elif solver_name == "exact":
            hybrid = solver.solve(profile, bw, batch, cost_model=cost_model)
        else:
            raise PlanError(f"unknown solver {solver_name!r}; available: {', '.join(SOLVERS)}")
        best, sched = _best_chain(profile, bw, batch, "hiertrain", cost_model, *_chains("jointdnn+", profile.n_units))
        if sched is None or hybrid.iteration_s <= best:
            best, sched = hybrid.iteration_s, hybrid
    elif policy.startswith("all-"):
        tier = policy[4:]
        if tier not in TIERS:
            raise PlanError(f"unknown policy {policy!r}; available: {', '.join(POLICIES)}")
        if not profile.tiers[tier].can_train:
            raise PlanError(f"policy {policy} needs the {tier} to train, and its profile says can_train: false")
        sched = single_tier(tier, batch, policy=policy)
        best = iteration_time(profile, bw, sched, cost_model=cost_model)
    else:
        best, sched = _best_chain(profile, bw, batch, policy, cost_model, *_chains(policy, profile.n_units))
        if sched is None:
            raise PlanError(f"policy {policy}: no placement is possible (the tiers it uses cannot train)")
    return replace(sched, iteration_s=best, cost_model=cost_model, solve_s=time.perf_counter() - t0)
