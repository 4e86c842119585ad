"""A fleet's plans by policy: the exact optimum, EdgeSplit's alternating algorithm and the other
baselines (all-local, all-edge, all-cloud, per-device HierTrain), each timed by the same cost model
(:func:`hiertrain.planner.fleet.iteration_time`); and the plan a coordinator runs (:func:`choose`)."""

from __future__ import annotations

from dataclasses import replace
from typing import Optional

from hiertrain.errors import PlanError
import numpy as np

from hiertrain.planner.fleet import (MBIT, Device, Fleet, FleetPlan, Path, cloud_sync, iteration_time, plan_of, solve,
                                     terms_table)
from hiertrain.planner.fleetsim import refined

POLICIES = ("hiertrain", "edgesplit", "all-local", "all-edge", "all-cloud", "per-device-hiertrain")


def edgesplit(fleet: Fleet, *, rounds: int = 50) -> FleetPlan:
    """EdgeSplit's alternating algorithm (device prefix, the rest on the edge; no cloud): with the
    shares fixed, each device takes the cut that minimises the iteration given the others';
    with the cuts fixed, the shares are re-balanced; until nothing changes."""
    u = fleet.units
    equal = fleet.medium_mbps / len(fleet.devices)
    tables = [terms_table(fleet, d) for d in fleet.devices]
    cuts = [max(1, u // 2) if d.private else u // 2 for d in fleet.devices]
    shares = [equal] * len(fleet.devices)  # the first round: an equal split

    def device_s(i: int, ms: np.ndarray) -> np.ndarray:
        """Device i's phase at cuts ms over its share: compute, then its bits."""
        compute, bits, _ = tables[i]
        rate = min(shares[i], fleet.devices[i].rate_mbps) * MBIT
        return compute[ms] + np.where(bits[ms] > 0, bits[ms] / rate, 0.0)

    for _ in range(rounds):
        changed = False
        devs = np.array([device_s(i, np.array([c]))[0] for i, c in enumerate(cuts)])
        servers = np.array([t[2][c, u] for t, c in zip(tables, cuts)])
        for i, d in enumerate(fleet.devices):
            # the iteration with device i at each cut, the others' as they are: max of the device
            # phases, plus every device's seconds on the edge
            ms = np.arange(1 if d.private else 0, u + 1)
            own = device_s(i, ms)
            others = max(np.delete(devs, i), default=0.0)
            total = np.maximum(others, own) + (servers.sum() - servers[i]) + tables[i][2][ms, u]
            ties = ms[total == total.min()]
            best_m = cuts[i] if cuts[i] in ties else int(ties[0])  # a tie keeps the cut it has
            if best_m != cuts[i]:
                cuts[i], changed = best_m, True
                devs[i], servers[i] = own[best_m - ms[0]], tables[i][2][best_m, u]
        _, shares, _ = iteration_time(fleet, [Path(c, u) for c in cuts])
        shares = [s if s > 0 else equal for s in shares]  # a device that sent nothing may start to
        if not changed:
            break
    return plan_of("edgesplit", fleet, [Path(c, u) for c in cuts])


def alone(fleet: Fleet, d: Device) -> Path:
    """A device's best path as if it were alone with the edge and the cloud (the first of equals)."""
    compute, bits, g = terms_table(fleet, d)
    rate = min(fleet.medium_mbps, d.rate_mbps) * MBIT
    sync = np.array([cloud_sync(fleet, k) for k in range(fleet.units + 1)])
    t = (compute + np.where(bits > 0, bits / rate, 0.0))[:, None] + g + sync[None, :]
    m, k = np.unravel_index(int(np.argmin(t)), t.shape)  # row-major: paths' order, m then k
    return Path(int(m), int(k))


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
        return plan_of(policy, fleet, [alone(fleet, d) for d in fleet.devices])
    raise PlanError(f"unknown fleet policy {policy!r}; available: {', '.join(POLICIES)}")


def choose(fleet: Fleet, *, pins: Optional[list[Path]], policy: str, cloud: bool) -> FleetPlan:
    """The plan a coordinator runs: the pinned paths (while they fit: without the cloud every path
    must end at the edge), else the exact optimum of the conservative model or the baseline
    ``policy`` (without the cloud always the optimum), judged by the simulation; with devices that have
    an energy budget, the fastest plan within the budgets (:func:`hiertrain.planner.fleetenergy.fleet_budget`),
    its ``parts["pace_s"]`` the least seconds a step may take under average-watts budgets."""
    if pins is not None and (cloud or all(p.k == fleet.units for p in pins)):
        plan = plan_of("pinned", fleet, pins)
    elif any(d.budget_j or d.budget_w for d in fleet.devices) and (policy == "hiertrain" or not cloud):
        # devices with an energy budget: the fastest plan within every budget, or a baseline's if the
        # step as the runtime runs it is shorter and it keeps the budgets too (paced for average watts)
        from hiertrain.planner.fleetenergy import fleet_budget, paced, within_budgets

        others = [b for b in (baseline(fleet, p) for p in POLICIES[1:]) if within_budgets(fleet, b)]
        plan = min((paced(fleet, refined(fleet, [p])) for p in [fleet_budget(fleet, budget_s=0.5), *others]),
                   key=lambda p: p.iteration_s)
        plan = replace(plan, policy="hiertrain-budget")
    elif policy == "hiertrain" or not cloud:
        plan = refined(fleet, [solve(fleet, budget_s=0.5), *(baseline(fleet, p) for p in POLICIES[1:])])
        plan = replace(plan, policy="hiertrain")
    else:
        plan = baseline(fleet, policy)
    plan = plan if plan.parts.get("conservative_s") is not None else refined(fleet, [plan])
    if "pace_s" not in plan.parts and any(d.budget_w for d in fleet.devices):  # (pinned: held to the budgets too)
        from hiertrain.planner.fleetenergy import paced

        plan = paced(fleet, plan)
    return plan
