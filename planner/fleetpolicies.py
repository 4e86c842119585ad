"""A fleet's plans by policy: the exact optimum, EdgeSplit's alternating algorithm and the other
baselines (all-local, all-edge, all-cloud, per-device HierTrain), each timed by the same cost model
(:func:`hiertrain.planner.fleet.iteration_time`); and the plan a coordinator runs (:func:`choose`)."""

from __future__ import annotations

from dataclasses import replace
from typing import Optional

from hiertrain.errors import PlanError
from hiertrain.planner.fleet import (MBIT, Fleet, FleetPlan, Path, brute_force, device_terms, iteration_time,
                                     plan_of, server_terms, solve)
from hiertrain.planner.fleetsim import refined

POLICIES = ("hiertrain", "edgesplit", "all-local", "all-edge", "all-cloud", "per-device-hiertrain")


def edgesplit(fleet: Fleet, *, rounds: int = 50) -> FleetPlan:
    """EdgeSplit's alternating algorithm (device prefix, the rest on the edge; no cloud): with the
    shares fixed, each device takes the cut that minimises the iteration given the others';
    with the cuts fixed, the shares are re-balanced; until nothing changes."""
    u = fleet.units
    equal = fleet.medium_mbps / len(fleet.devices)
    cuts = [max(1, u // 2) if d.private else u // 2 for d in fleet.devices]
    shares = [equal] * len(fleet.devices)  # the first round: an equal split
    for _ in range(rounds):
        changed = False
        for i, d in enumerate(fleet.devices):
            def with_cut(m: int) -> float:
                trial = [Path(c, u) for c in cuts]
                trial[i] = Path(m, u)
                terms = [device_terms(fleet, dd, p.m) for dd, p in zip(fleet.devices, trial)]
                dev = max(c + (b / (min(s, dd.rate_mbps) * MBIT) if b else 0.0)
                          for (c, b), s, dd in zip(terms, shares, fleet.devices))
                return dev + sum(server_terms(fleet, dd, p) for dd, p in zip(fleet.devices, trial))

            best_m = min(range(1 if d.private else 0, u + 1), key=lambda m: (with_cut(m), m != cuts[i]))
            if best_m != cuts[i]:
                cuts[i], changed = best_m, True
        _, shares, _ = iteration_time(fleet, [Path(c, u) for c in cuts])
        shares = [s if s > 0 else equal for s in shares]  # a device that sent nothing may start to
        if not changed:
            break
    return plan_of("edgesplit", fleet, [Path(c, u) for c in cuts])


def baseline(fleet: Fleet, policy: str) -> FleetPlan:
    u = fleet.units
    if policy == "hiertrain":
        return solve(fleet)
    if policy == "edgesplit":
        return edgesplit(fleet)
    if policy == "all-local":
        return plan_of(policy, fleet, [Path(u, u)] * len(fleet.devices))
    if policy == "all-edge":  # a private device keeps its first unit
        return plan_of(policy, fleet, [Path(1 if d.private else 0, u) for d in fleet.devices])
    if policy == "all-cloud":
        return plan_of(policy, fleet, [Path(1, 1) if d.private else Path(0, 0) for d in fleet.devices])
    if policy == "per-device-hiertrain":
        # each device's best path as if it were alone with the edge and the cloud, then run together
        chosen = []
        for d in fleet.devices:
            alone = Fleet(fleet.act_bytes, fleet.param_bytes, (d,), fleet.edge_s, fleet.cloud_s,
                          min(fleet.medium_mbps, d.rate_mbps), fleet.cloud_mbps)
            chosen.append(brute_force(alone).paths[0])  # one device: its paths, each timed
        return plan_of(policy, fleet, chosen)
    raise PlanError(f"unknown fleet policy {policy!r}; available: {', '.join(POLICIES)}")


def choose(fleet: Fleet, *, pins: Optional[list[Path]], policy: str, cloud: bool) -> FleetPlan:
    """The plan a coordinator runs: the pinned paths (while they fit: without the cloud every path
    must end at the edge), else the exact optimum of the conservative model or the baseline
    ``policy`` (without the cloud always the optimum), judged by the simulation; with devices that have
    an energy budget, the fastest plan within the budgets (:func:`hiertrain.planner.fleetenergy.fleet_budget`)."""
    if pins is not None and (cloud or all(p.k == fleet.units for p in pins)):
        plan = plan_of("pinned", fleet, pins)
    elif any(d.budget_j for d in fleet.devices) and (policy == "hiertrain" or not cloud):
        # devices with an energy budget: the fastest plan within every budget, or a baseline's if the
        # step as the runtime runs it is shorter and it keeps the budgets too
        from hiertrain.planner.fleetenergy import fleet_budget, within_budgets

        others = [b for b in (baseline(fleet, p) for p in POLICIES[1:]) if within_budgets(fleet, b)]
        plan = replace(refined(fleet, [fleet_budget(fleet, budget_s=0.5), *others]), policy="hiertrain-budget")
    elif policy == "hiertrain" or not cloud:
        plan = refined(fleet, [solve(fleet, budget_s=0.5), *(baseline(fleet, p) for p in POLICIES[1:])])
        plan = replace(plan, policy="hiertrain")
    else:
        plan = baseline(fleet, policy)
    return plan if plan.parts.get("conservative_s") is not None else refined(fleet, [plan])
