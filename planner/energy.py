"""Joules per step of a plan, and the plans that are best for energy (issue 26). Pure functions.

**What a step costs each machine** is read off the plan model (:mod:`hiertrain.plan`), for any job:
:func:`usage` gives every account its busy seconds (each stage's forward and backward over its
group's samples, an owner's updates) and the bytes its network interface sends and receives (raw
samples from the data source to the first stage, activations and their gradients across each cut,
logits to a loss on another account and their gradient back, a replica's weights from the owner and
its gradients back). Every message goes through the broker on the edge: a transfer between two
other machines (the device and the cloud) crosses the edge's interface twice. The joules follow from
each machine's :class:`~hiertrain.power.PowerModel` over the step's predicted seconds
(:func:`hiertrain.power.joules`): idle draw all step long, the busy increment while computing, the
radio per bit.

**Objectives** (:data:`OBJECTIVES`): ``time`` (the least seconds per step, what the planners did so
far), ``energy`` (the least joules per step within a deadline on the step's seconds; whose joules:
the devices', or ``all`` machines'), ``budget`` (the least seconds per step with no device above its
joules per step, nor above its average watts: a step may be *paced*, held until the device's joules
above idle fit its spare watts over it, :func:`paced`).

- The three-tier job (:func:`plan_three_tier`): every O/S/L schedule of HierTrain's space (6 mappings,
  every cut pair, every integer split; evaluated in numpy batches by :func:`osl_usage`, the same
  accounting as :func:`usage` written for arrays, tested equal to it) and every device -> edge -> cloud
  chain. Exhaustive, so exact under any objective.
- A fleet: its joules and its plans under budgets or for least energy are
  :mod:`hiertrain.planner.fleetenergy`'s.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from hiertrain import TIERS
from hiertrain.errors import PlanError
from hiertrain.plan import Plan
from hiertrain.power import DEFAULT_CLASS, PowerModel, joules, power_of
from hiertrain.profile import Profile
from hiertrain.schedule import Schedule
from hiertrain.planner import fleet as F
from hiertrain.planner.costmodel import DEVICE, EDGE, Bandwidth, Tables, chain_time, evaluate, tables
from hiertrain.planner.solver import MAX_CELLS, PATTERNS, candidates, splits

OBJECTIVES = ("time", "energy", "budget")
SCOPES = ("devices", "all")
BROKER = "edge"  # the machine the broker runs on: every message crosses its interface


# ------------------------------------------------------------------ usage of a plan

@dataclass
class Usage:
    busy_s: float = 0.0
    sent: float = 0.0      # bytes out of its network interface
    received: float = 0.0  # bytes in


@dataclass(frozen=True)
class Costs:
    """What a unit costs where: per account, each unit's forward + backward seconds per sample and its
    update's seconds (on its owner, once a step); per cut the activation bytes of one sample
    (``act_bytes[0]`` a raw sample); each unit's parameter bytes; how many steps apart an account
    that keeps its own copy (periodic sync) exchanges it."""

    unit_s: Mapping[str, Sequence[float]]
    update_s: Mapping[str, Sequence[float]]
    act_bytes: Sequence[float]
    param_bytes: Sequence[float]
    sync_every: int = 1

    @classmethod
    def of_profile(cls, profile: Profile) -> "Costs":
        return cls({t: [f + b for f, b in zip(v.forward_s, v.backward_s)] for t, v in profile.tiers.items()},
                   {t: list(v.update_s) for t, v in profile.tiers.items()},
                   [profile.sample_bytes, *(layer.output_bytes for layer in profile.layers)],
                   [layer.param_bytes for layer in profile.layers])

    @classmethod
    def of_fleet(cls, fleet: F.Fleet) -> "Costs":
        """The fleet model's costs (it has no update term: updates cost nothing)."""
        unit = {"edge": fleet.edge_s, "cloud": fleet.cloud_s, **{d.name: d.unit_s for d in fleet.devices}}
        return cls(unit, {}, fleet.act_bytes, fleet.param_bytes, fleet.sync_every)


def usage(plan: Plan, costs: Costs, accounts: Sequence[str] = ()) -> dict[str, Usage]:
    """Each account's busy seconds and bytes in one step of ``plan`` (``accounts``: those to list even
    when idle)."""
    out = {a: Usage() for a in (*accounts, *sorted(plan.working), BROKER)}

    def send(src: str, dst: str, nbytes: float) -> None:
        if src == dst or not nbytes:
            return
        out.setdefault(src, Usage()).sent += nbytes
        out.setdefault(dst, Usage()).received += nbytes
        if BROKER not in (src, dst):
            out[BROKER].received += nbytes
            out[BROKER].sent += nbytes

    for g in plan.groups:
        send(g.source, g.stages[0].tier, g.samples * costs.act_bytes[0])
        for st in g.stages:
            out.setdefault(st.tier, Usage()).busy_s += g.samples * sum(costs.unit_s[st.tier][st.first - 1:st.last])
        for a, b in zip(g.stages, g.stages[1:]):
            send(a.tier, b.tier, g.samples * costs.act_bytes[a.last])
            send(b.tier, a.tier, g.samples * costs.act_bytes[a.last])
        if g.loss != g.stages[-1].tier:  # logits to the loss's account, their gradient back
            send(g.stages[-1].tier, g.loss, g.samples * costs.act_bytes[plan.units])
            send(g.loss, g.stages[-1].tier, g.samples * costs.act_bytes[plan.units])
    for account in sorted(plan.working):
        for u in sorted(plan.replicas(account)):
            owner, nbytes = plan.owners[u - 1], costs.param_bytes[u - 1]
            nbytes /= costs.sync_every if account in plan.keeps else 1  # a kept copy: down and up every K steps
            send(owner, account, nbytes)  # weights
            send(account, owner, nbytes)  # gradients
    for u, owner in enumerate(plan.owners, 1):
        update = costs.update_s.get(owner)
        if update:
            out.setdefault(owner, Usage()).busy_s += update[u - 1]
    return out


def energies(use: Mapping[str, Usage], step_s: float, powers: Mapping[str, PowerModel]) -> dict[str, float]:
    """Joules per step of every account with a power model (idle ones too: they burn their idle draw)."""
    return {a: float(joules(p, step_s, use[a].busy_s if a in use else 0.0, use[a].sent if a in use else 0.0,
                            use[a].received if a in use else 0.0)) for a, p in powers.items()}


# -------------------------------------------------------------- the three-tier job

def tier_powers(profile: Profile, overrides: Optional[Mapping[str, Any]] = None) -> dict[str, PowerModel]:
    """Each tier's power model: ``overrides[tier]`` (a class or a table), else its profile entry's
    ``power``, else its tier's default class (:data:`hiertrain.power.DEFAULT_CLASS`)."""
    out = {}
    for t in TIERS:
        spec = (overrides or {}).get(t)
        if spec is None and t in profile.tiers:
            spec = profile.tiers[t].extra.get("power")
        out[t] = power_of(spec if spec is not None else DEFAULT_CLASS[t], where=f"the {t}'s power")
    return out


def osl_usage(tab: Tables, o: Any, s: Any, l: Any, m_s: Any, m_l: Any, b_o: Any, b_s: Any, b_l: Any
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`usage` of O/S/L schedules as arrays: (busy, sent, received), each of shape (3, ...) over
    TIERS, for broadcastable arrays of tier indices, cuts and splits."""
    o, s, l, m_s, m_l = (np.asarray(x) for x in (o, s, l, m_s, m_l))
    b_o, b_s, b_l = (np.asarray(x, dtype=np.float64) for x in (b_o, b_s, b_l))
    full = tab.pf + tab.pb
    n = tab.n
    act_s, act_l = b_s > 0, b_l > 0
    shape = np.broadcast(o, s, l, m_s, m_l, b_o, b_s, b_l).shape
    busy, sent, recv = (np.zeros((3, *shape)) for _ in range(3))
    tiers = np.arange(3).reshape(3, *([1] * len(shape)))

    def add(into: np.ndarray, who: Any, value: Any) -> None:
        into += np.where(tiers == who, value, 0.0)

    add(busy, o, b_o * full[o, n] + b_s * (full[o, n] - full[o, m_s]) + b_l * (full[o, n] - full[o, m_l]) + tab.pu[o, n])
    add(busy, s, b_s * full[s, m_s])
    add(busy, l, b_l * full[l, m_l])

    def send(src: Any, dst: Any, nbytes: Any) -> None:
        nbytes = np.where(src != dst, nbytes, 0.0)
        add(sent, src, nbytes)
        add(recv, dst, nbytes)
        relay = np.where((src != EDGE) & (dst != EDGE), nbytes, 0.0)
        add(sent, EDGE, relay)
        add(recv, EDGE, relay)

    for who, b in ((o, b_o), (s, b_s), (l, b_l)):
        send(DEVICE, who, b * tab.q)
    for who, b, m, on in ((s, b_s, m_s, act_s), (l, b_l, m_l, act_l)):
        x = b * tab.mo[m] + np.where(on, tab.pp[m], 0.0)  # activations (or logits) and gradients; weights
        send(who, o, x)
        send(o, who, x)
    return busy, sent, recv


@dataclass(frozen=True)
class Goal:
    """What a plan is chosen for: ``objective`` with its ``deadline_s`` (energy) or the devices'
    ``budget_j`` per step and ``budget_w`` average watts (budget: the step is paced to keep the watts,
    :func:`paced`), the joules of ``scope`` minimised (energy)."""

    objective: str = "time"
    deadline_s: float = math.inf
    budget_j: Mapping[str, float] = field(default_factory=dict)
    scope: str = "devices"
    budget_w: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise PlanError(f"unknown objective {self.objective!r}; available: {', '.join(OBJECTIVES)}")
        if self.scope not in SCOPES:
            raise PlanError(f"unknown energy scope {self.scope!r}; available: {', '.join(SCOPES)}")
        if not self.deadline_s > 0:
            raise PlanError(f"a deadline must be > 0 seconds, got {self.deadline_s!r}")
        for budgets, unit in ((self.budget_j, "joules per step"), (self.budget_w, "watts on average")):
            for who, j in budgets.items():
                if not (isinstance(j, (int, float)) and not isinstance(j, bool) and j > 0 and math.isfinite(j)):
                    raise PlanError(f"{who}'s energy budget must be a positive number of {unit}, got {j!r}")
        if self.objective == "budget" and not self.budget_j and not self.budget_w:
            raise PlanError("the budget objective needs a budget (joules per step or average watts) for at least "
                            "one device")


def paced(goal: Goal, step_s: Any, joule: Mapping[str, Any], powers: Mapping[str, PowerModel]
          ) -> tuple[Any, dict[str, Any]]:
    """(The step's seconds, every machine's joules) with the step held long enough that every machine
    with a ``budget_w`` draws no more on average: its joules above idle over its spare watts (inf when
    its budget is at or under its idle draw). Works on arrays of candidate plans."""
    if not goal.budget_w:
        return step_s, dict(joule)
    pace = np.zeros(np.shape(step_s))
    for who, w in goal.budget_w.items():
        idle = powers[who].idle_w
        spare = w - idle
        above = joule[who] - idle * step_s
        pace = np.maximum(pace, above / spare if spare > 0 else np.full(np.shape(step_s), np.inf))
    held = np.maximum(step_s, pace)
    return held, {k: v + powers[k].idle_w * (held - step_s) for k, v in joule.items()}


def _score(goal: Goal, step_s: np.ndarray, joule: Mapping[str, np.ndarray], devices: Sequence[str],
           powers: Mapping[str, PowerModel]) -> tuple[np.ndarray, np.ndarray]:
    """(value to minimise, tie-break) of candidate plans under ``goal``; infeasible ones score inf."""
    if goal.objective == "budget":
        step_s, joule = paced(goal, step_s, joule, powers)
    if goal.objective == "time":
        return step_s, sum(joule[d] for d in devices)
    if goal.objective == "energy":
        spent = sum(joule.values()) if goal.scope == "all" else sum(joule[d] for d in devices)
        return np.where(step_s <= goal.deadline_s * (1 + 1e-12), spent, np.inf), step_s
    fits = np.ones(np.shape(step_s), dtype=bool)
    for who, limit in goal.budget_j.items():
        fits &= joule[who] <= limit * (1 + 1e-12)
    return np.where(fits, step_s, np.inf), sum(joule[d] for d in devices)


@dataclass(frozen=True)
class EnergyPlan:
    schedule: Schedule
    joules: dict[str, float]  # per tier, per step
    evaluated: int


def plan_three_tier(profile: Profile, bw: Bandwidth, batch: int, goal: Goal, *, cost_model: str = "paper",
                    powers: Optional[Mapping[str, PowerModel]] = None) -> EnergyPlan:
    """The best schedule of HierTrain's space (O/S/L and device -> edge -> cloud chains) under ``goal``;
    :class:`PlanError` in one line when no schedule meets it (naming the least that is possible)."""
    from hiertrain.planner.baselines import _chains, chain_schedule

    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise PlanError(f"batch size must be an integer >= 1, got {batch!r}")
    unknown = (set(goal.budget_j) | set(goal.budget_w)) - {"device"}
    if unknown:
        raise PlanError(f"a three-tier job budgets its device only, not {', '.join(sorted(unknown))}")
    t0 = time.perf_counter()
    tab = tables(profile, bw, cost_model)
    powers = dict(powers or tier_powers(profile))
    costs = Costs.of_profile(profile)
    best: tuple[float, float, Any] = (math.inf, math.inf, None)
    least_j, quickest, evaluated = math.inf, math.inf, 0  # for the error when nothing fits
    for pattern in PATTERNS:
        b_o, b_s, b_l = splits(batch, pattern)
        if not len(b_o):
            continue
        c = candidates(tab.n, pattern)
        step = max(1, MAX_CELLS // len(b_o))
        for a in range(0, len(c.o), step):
            ids = slice(a, a + step)
            args = (c.o[ids, None], c.s[ids, None], c.l[ids, None], c.m_s[ids, None], c.m_l[ids, None],
                    b_o[None, :], b_s[None, :], b_l[None, :])
            t = evaluate(tab, *args)
            busy, sent, recv = osl_usage(tab, *args)
            joule = {name: joules(powers[name], t, busy[i], sent[i], recv[i]) for i, name in enumerate(TIERS)}
            value, tie = _score(goal, t, joule, ["device"], powers)
            evaluated += t.size
            finite = np.isfinite(t)
            least_j = min(least_j, float(np.min(np.where(finite, joule["device"], np.inf))))
            quickest = min(quickest, float(np.min(t)))
            i = np.lexsort((tie.ravel(), value.ravel()))[0]
            if (value.flat[i], tie.flat[i]) < best[:2]:
                r, k = np.unravel_index(i, t.shape)
                best = (float(value.flat[i]), float(tie.flat[i]),
                        ("osl", int(c.o[a + r]), int(c.s[a + r]), int(c.l[a + r]), int(c.m_s[a + r]), int(c.m_l[a + r]),
                         int(b_o[k]), int(b_s[k]), int(b_l[k]), float(t[r, k])))
    tiers, cut_sets, _ = _chains("jointdnn+", profile.n_units)
    for cuts in cut_sets:
        cand = chain_schedule(tiers, cuts, profile.n_units, batch, policy="hiertrain")
        t = chain_time(tab, cand.chain, batch)
        evaluated += 1
        if not math.isfinite(t):
            continue
        joule = energies(usage(cand.plan(units=profile.n_units, batch=batch), costs, TIERS), t, powers)
        least_j, quickest = min(least_j, joule["device"]), min(quickest, t)
        value, tie = _score(goal, np.asarray(t), {k: np.asarray(v) for k, v in joule.items()}, ["device"], powers)
        if (float(value), float(tie)) < best[:2]:
            best = (float(value), float(tie), ("chain", cand, t))
    if best[2] is None or not math.isfinite(best[0]):
        raise PlanError(_unmet(goal, least_j, quickest, powers))
    if best[2][0] == "osl":
        _, o, s, l, m_s, m_l, n_o, n_s, n_l, t = best[2]
        sched = Schedule(mapping={"o": TIERS[o], "s": TIERS[s], "l": TIERS[l]}, m_s=m_s, m_l=m_l,
                         b_o=n_o, b_s=n_s, b_l=n_l, policy="hiertrain")
    else:
        _, sched, t = best[2]
    joule = energies(usage(sched.plan(units=profile.n_units, batch=batch), costs, TIERS), t, powers)
    held, joule = paced(goal, t, joule, powers) if goal.objective == "budget" else (t, joule)
    held = float(held)
    sched = replace(sched, iteration_s=held, cost_model=cost_model, solve_s=time.perf_counter() - t0,
                    extra={**sched.extra, "objective": goal.objective, **({"pace_s": held} if held > t else {})})
    return EnergyPlan(sched, {k: float(v) for k, v in joule.items()}, evaluated)


def _unmet(goal: Goal, least_j: float, quickest_s: float, powers: Mapping[str, PowerModel]) -> str:
    for who, w in goal.budget_w.items() if goal.objective == "budget" else ():
        if w <= powers[who].idle_w:
            return (f"no plan meets the {who}'s budget of {w:g} W on average: its idle draw alone is "
                    f"{powers[who].idle_w:g} W")
    if goal.objective == "budget":
        who, limit = next(iter(goal.budget_j.items()))
        return (f"no plan meets the {who}'s budget of {limit:g} J per step: the least it can spend is "
                f"{least_j:.4g} J per step")
    return f"no plan meets the deadline of {goal.deadline_s:g} s per step: the quickest takes {quickest_s:.4g} s"


def schedule_joules(profile: Profile, bw: Bandwidth, schedule: Schedule, *, cost_model: str = "paper",
                    powers: Optional[Mapping[str, PowerModel]] = None) -> dict[str, float]:
    """Each tier's joules per step of ``schedule`` at its predicted seconds."""
    from hiertrain.planner.costmodel import iteration_time

    t = schedule.iteration_s if math.isfinite(schedule.iteration_s) else \
        iteration_time(profile, bw, schedule, cost_model=cost_model)
    plan = schedule.plan(units=profile.n_units, batch=schedule.batch)
    return energies(usage(plan, Costs.of_profile(profile), TIERS), t, dict(powers or tier_powers(profile)))
