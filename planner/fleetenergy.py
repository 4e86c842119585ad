"""A fleet's joules per step, and its plans under energy budgets or for least energy. Pure functions.

A fleet device's joules in a step of T seconds are ``E_d = idle_d * T + dyn_d(m)``: its idle draw all
step long plus what training units 1..m and sending their activations costs (:func:`device_dynamic`),
read off the plan model as for any job (:func:`hiertrain.planner.energy.usage`).

- Under budgets (:func:`fleet_budget`): a plan meets the budgets at its own T iff every path's
  ``dyn_d <= budget_d - idle_d * T``. Starting from T = 0, the exact fleet optimum over the paths
  allowed at T is found and T raised to its seconds until the optimum meets the budgets at its own
  seconds: each round's T is a lower bound of the budgeted optimum (its set of plans contains it),
  so the first plan that meets the budgets is that optimum.
- Under average watts (``budget_w``, a budget per hour of training): a step may be *paced*, held until
  the devices' joules above idle fit their spare watts over it (:func:`pace_s`), and the plan of least
  paced seconds is found by a binary search over the paces (:func:`_fastest_paced`), inside the loop
  above when a device has both kinds of budget.
- For least energy within a deadline (:func:`fleet_energy`): exact over every choice of cuts, visited
  by a lower bound; exponential in the devices.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Callable, Mapping, Optional, Sequence

from hiertrain.errors import PlanError
from hiertrain.plan import for_fleet
from hiertrain.planner import fleet as F
from hiertrain.planner.energy import Costs, Goal, energies, usage
from hiertrain.planner.energy import paced as paced_step
from hiertrain.power import CLASSES, DEFAULT_CLASS, PowerModel, joules


def power_of_device(d: F.Device) -> PowerModel:
    """A fleet device's power model (the default class's when it names none)."""
    return d.power or CLASSES[DEFAULT_CLASS["device"]]


def fleet_powers(fleet: F.Fleet) -> dict[str, PowerModel]:
    """The edge's, the cloud's and every device's power model (a device's from its ``power``)."""
    return {"edge": CLASSES["server"], "cloud": CLASSES["server"], **{d.name: power_of_device(d) for d in fleet.devices}}


def device_dynamic(fleet: F.Fleet, d: F.Device, m: int) -> float:
    """A device's joules per step above its idle draw when it trains units 1..m (compute and radio)."""
    p = power_of_device(d)
    compute, _ = F.device_terms(fleet, d, m)
    up, down = F.device_bytes(fleet, d, m)
    return float(joules(p, 0.0, compute, up, down))


def fleet_joules(fleet: F.Fleet, plan: F.FleetPlan) -> dict[str, float]:
    """Joules per step of every machine of a fleet plan at its predicted seconds."""
    members = [(d.name, d.samples, p.m, p.k) for d, p in zip(fleet.devices, plan.paths)]
    model = for_fleet([mb for mb in members if mb[1] > 0], units=fleet.units, keep=fleet.sync_every > 1)
    return energies(usage(model, Costs.of_fleet(fleet), ("edge", "cloud")), plan.iteration_s, fleet_powers(fleet))


def pace_s(fleet: F.Fleet, paths: Sequence[F.Path]) -> float:
    """The shortest step that keeps every device with a ``budget_w`` at or under it on average: a device
    drawing ``dyn_d`` joules above its idle draw in a step needs ``T >= dyn_d / (budget_w - idle_w)``
    (:func:`hiertrain.planner.energy.paced` of the step's joules at T = 0; the coordinator holds each
    round that long). 0 without such devices; inf if one's budget is at or under its idle draw."""
    watts = {d.name: d.budget_w for d in fleet.devices if d.budget_w}
    if not watts:
        return 0.0
    at_zero = fleet_joules(fleet, F.FleetPlan("paced", tuple(paths), (), 0.0))
    return float(paced_step(Goal("budget", budget_w=watts), 0.0, at_zero, fleet_powers(fleet))[0])


def paced(fleet: F.Fleet, plan: F.FleetPlan) -> F.FleetPlan:
    """``plan`` at the step its devices' average-watts budgets allow (:func:`pace_s`): its seconds are
    the longer of its own and the pace, ``parts["pace_s"]`` the pace and ``parts["unpaced_s"]`` its own
    (when there is a pace)."""
    pace = pace_s(fleet, plan.paths)
    if not pace:
        return plan
    return replace(plan, iteration_s=max(plan.iteration_s, pace),
                   parts={**plan.parts, "pace_s": pace, "unpaced_s": plan.iteration_s})


def within_budgets(fleet: F.Fleet, plan: F.FleetPlan) -> bool:
    """Whether every device with a ``budget_j`` spends no more in a step of ``plan``, paced (average
    watts are kept by pacing, :func:`paced`)."""
    joule = fleet_joules(fleet, paced(fleet, plan))
    return all(joule[d.name] <= d.budget_j * (1 + 1e-9) for d in fleet.devices if d.budget_j)


OkM = Callable[[str, int], bool]  # whether a device may train units 1..m


def _fastest_paced(fleet: F.Fleet, ok: OkM, watts: Mapping[str, float], idle: Mapping[str, float],
                   dyn: Mapping[tuple[str, int], float], budget_s: float) -> F.FleetPlan:
    """The least paced seconds, ``max(T(plan), pace(plan))``, over the plans whose cuts ``ok`` allows, exact.
    Every plan's pace is one of the ratios ``dyn_d(m) / (budget_w - idle_w)``; for a ratio tau, t(tau), the
    fastest plan with every pace-bound device's ratio <= tau, falls as tau grows, so the least of
    ``max(t(tau), tau)`` is at the first tau with t(tau) <= tau or the one before it (a binary search of
    exact solves); a plan's paced seconds are at most that, and the optimum's at least."""
    def solve(tau: float) -> F.FleetPlan:
        return paced(fleet, F.solve(fleet, budget_s=budget_s, allow=lambda d, p: ok(d.name, p.m) and (
            d.name not in watts or dyn[d.name, p.m] <= tau * (watts[d.name] - idle[d.name]) * (1 + 1e-12))))

    if not watts:
        return F.solve(fleet, budget_s=budget_s, allow=lambda d, p: ok(d.name, p.m))
    m0 = {d.name: 1 if d.private else 0 for d in fleet.devices}
    ratio = {n: sorted(dyn[n, m] / (w - idle[n]) for m in range(m0[n], fleet.units + 1) if ok(n, m))
             for n, w in watts.items()}
    lo = max(r[0] for r in ratio.values())  # below it some device has no cut
    taus = sorted({t for r in ratio.values() for t in r if t >= lo})
    found: dict[int, F.FleetPlan] = {}

    def at(i: int) -> F.FleetPlan:
        if i not in found:
            found[i] = solve(taus[i])
        return found[i]

    a, b = 0, len(taus) - 1  # the first i with t(tau_i) <= tau_i (b if none): t(tau) is the plan's unpaced seconds
    while a < b:
        mid = (a + b) // 2
        if at(mid).parts.get("unpaced_s", at(mid).iteration_s) <= taus[mid] * (1 + 1e-12):
            b = mid
        else:
            a = mid + 1
    best = min((at(i) for i in {a, max(0, a - 1)}), key=lambda p: p.iteration_s)
    best.parts["optimal"] = all(p.parts.get("optimal", True) for p in found.values())
    return best


def fleet_budget(fleet: F.Fleet, budgets: Optional[Mapping[str, float]] = None, *,
                 watts: Optional[Mapping[str, float]] = None, budget_s: float = 0.8) -> F.FleetPlan:
    """The least seconds per step with every device within its joules per step (``budgets``, default
    each device's own ``budget_j``) and its average watts (``watts``, default its ``budget_w``: kept by
    pacing the step, :func:`paced`); see the module docstring."""
    budgets = dict(budgets if budgets is not None else {d.name: d.budget_j for d in fleet.devices if d.budget_j})
    watts = dict(watts if watts is not None else {d.name: d.budget_w for d in fleet.devices if d.budget_w})
    unknown = (set(budgets) | set(watts)) - {d.name for d in fleet.devices}
    if unknown:
        raise PlanError(f"budgets for devices not in the fleet: {', '.join(sorted(unknown))}")
    if not budgets and not watts:
        return F.solve(fleet, budget_s=budget_s)
    if budgets:
        Goal("budget", budget_j=budgets)  # validates them
    idle = {d.name: power_of_device(d).idle_w for d in fleet.devices}
    for n, w in watts.items():
        if not (isinstance(w, (int, float)) and math.isfinite(w) and w > idle[n]):
            raise PlanError(f"no plan meets {n}'s budget of {w:g} W on average: its idle draw alone is {idle[n]:g} W")
    if watts:
        fleet = replace(fleet, devices=tuple(replace(d, budget_w=watts.get(d.name)) for d in fleet.devices))
    dyn = {(d.name, m): device_dynamic(fleet, d, m) for d in fleet.devices for m in range(fleet.units + 1)}
    floor, optimal = 0.0, True
    for _ in range(10_000):
        def ok(n: str, m: int, floor: float = floor) -> bool:
            return n not in budgets or dyn[n, m] <= (budgets[n] - idle[n] * floor) * (1 + 1e-12)

        least = {n: min(dyn[n, m] for m in range(1 if d.private else 0, fleet.units + 1))
                 for d in fleet.devices for n in [d.name] if n in budgets}
        short = [n for n in least if least[n] > (budgets[n] - idle[n] * floor) * (1 + 1e-12)]
        if short:
            n = short[0]
            raise PlanError(f"no plan meets {n}'s budget of {budgets[n]:g} J per step: it spends at least "
                            f"{least[n] + idle[n] * floor:.4g} J in a step of {floor:.4g} s (the shortest "
                            f"the other budgets allow)")
        plan = _fastest_paced(fleet, ok, watts, idle, dyn, budget_s)
        optimal &= bool(plan.parts.get("optimal", True))
        t = plan.iteration_s
        if all(dyn[d.name, p.m] + idle[d.name] * t <= budgets[d.name] * (1 + 1e-12)
               for d, p in zip(fleet.devices, plan.paths) if d.name in budgets):
            plan = replace(plan, policy="hiertrain-budget")
            plan.parts["optimal"] = optimal
            return plan
        if t <= floor:  # cannot happen with idle draw > 0 (the violation needs t > floor); guard the loop
            break
        floor = t
    raise PlanError("the budgeted fleet plan did not settle")  # pragma: no cover


MAX_CUT_VECTORS = 100_000


def fleet_energy(fleet: F.Fleet, deadline_s: float = math.inf, *, budget_s: float = 0.8) -> F.FleetPlan:
    """The plan of least device joules per step no slower than ``deadline_s``, exact: a device's joules
    depend on its cut m and on the step's seconds T (its idle draw), so for each choice of every
    device's cut the fastest plan with those cuts is the least-energy one (an exact fleet solve over
    the edge/cloud splits), and the choices are visited by a lower bound (their dynamic joules plus
    the idle draw over the fastest step of all) until none can beat the best. Exponential in the
    devices: up to :data:`MAX_CUT_VECTORS` choices of cuts (five devices of nine units)."""
    import itertools

    cuts = [list(range(1 if d.private else 0, fleet.units + 1)) for d in fleet.devices]
    if math.prod(len(c) for c in cuts) > MAX_CUT_VECTORS:
        raise PlanError(f"minimum energy over {len(fleet.devices)} devices of {fleet.units} units is "
                        f"{math.prod(len(c) for c in cuts)} choices of cuts, more than {MAX_CUT_VECTORS}; "
                        f"plan with a budget per device instead (fleet_budget)")
    fastest = F.solve(fleet, budget_s=budget_s)
    if fastest.iteration_s > deadline_s * (1 + 1e-12):
        raise PlanError(f"no plan meets the deadline of {deadline_s:g} s per step: the quickest takes "
                        f"{fastest.iteration_s:.4g} s")
    idle = sum(power_of_device(d).idle_w for d in fleet.devices)
    dyn = [[device_dynamic(fleet, d, m) for m in range(fleet.units + 1)] for d in fleet.devices]
    choices = sorted(itertools.product(*cuts), key=lambda ms: sum(dyn[i][m] for i, m in enumerate(ms)))
    best, best_j, optimal = fastest, sum(dyn[i][p.m] for i, p in enumerate(fastest.paths)) + idle * fastest.iteration_s, True
    for ms in choices:
        bound = sum(dyn[i][m] for i, m in enumerate(ms)) + idle * fastest.iteration_s
        if bound >= best_j * (1 - 1e-12):
            break  # sorted by their dynamic joules: every later choice is bounded higher
        want = dict(zip((d.name for d in fleet.devices), ms))
        plan = F.solve(fleet, budget_s=budget_s, allow=lambda d, p, want=want: p.m == want[d.name])
        optimal &= bool(plan.parts.get("optimal", True))
        j = sum(dyn[i][m] for i, m in enumerate(ms)) + idle * plan.iteration_s
        if plan.iteration_s <= deadline_s * (1 + 1e-12) and j < best_j:
            best, best_j = plan, j
    best = replace(best, policy="hiertrain-energy")
    best.parts["optimal"] = optimal
    return best
