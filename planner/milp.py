"""HierTrain's scheduling problem as one python-mip MILP per mapping (the reference formulation).

Cuts are one-hot binaries x_k (m_s = k) and y_k (m_l = k); the products b_j * x_k and b_j * y_k
that the prefix sums need are linearised exactly (McCormick with the integer b_j <= B); maxes are
epigraph variables. Solved to optimality by CBC; the status is checked. This states the problem
independently of :mod:`planner.solver` (which is much faster) so each can check the other.
"""

from __future__ import annotations

import time
from typing import Optional

import mip

from hiertrain import TIERS
from hiertrain.errors import PlanError
from hiertrain.profile import Profile
from hiertrain.schedule import Schedule
from hiertrain.planner.costmodel import DEVICE, Bandwidth, Tables, tables
from hiertrain.planner.solver import MAPPINGS


def _solve_mapping(tab: Tables, o: int, s: int, l: int, B: int) -> Optional[tuple[float, tuple[int, ...]]]:
    if not tab.can_train[o]:
        return None
    N, K = tab.n, range(tab.n + 1)
    pf, pb, pu, inv, mo, pp, q = tab.pf, tab.pb, tab.pu, tab.inv, tab.mo, tab.pp, tab.q
    m = mip.Model(sense=mip.MINIMIZE, solver_name=mip.CBC)
    m.verbose = 0
    m.max_mip_gap, m.max_mip_gap_abs = 1e-10, 1e-12

    x = [m.add_var(f"x({k})", var_type=mip.BINARY) for k in K]   # m_s = k
    y = [m.add_var(f"y({k})", var_type=mip.BINARY) for k in K]   # m_l = k
    b = {j: m.add_var(f"b_{j}", var_type=mip.INTEGER, lb=0, ub=B) for j in "osl"}
    busy = {j: m.add_var(f"busy_{j}", var_type=mip.BINARY) for j in "sl"}
    P = {j: [m.add_var(f"P_{j}({k})", lb=0, ub=B) for k in K] for j in "osl"}  # b_j * x_k
    R = {j: [m.add_var(f"R_{j}({k})", lb=0, ub=B) for k in K] for j in "osl"}  # b_j * y_k
    U = {"s": [m.add_var(f"U_s({k})", lb=0, ub=1) for k in K],                # busy_s * x_k
         "l": [m.add_var(f"U_l({k})", lb=0, ub=1) for k in K]}                # busy_l * y_k
    t1f, t1b, t2f, t2b, t_up, t_sync = (m.add_var(name, lb=0) for name in ("t1f", "t1b", "t2f", "t2b", "t_up", "t_sync"))

    m += mip.xsum(x) == 1, "one(m_s)"
    m += mip.xsum(y) == 1, "one(m_l)"
    m += mip.xsum(k * x[k] for k in K) <= mip.xsum(k * y[k] for k in K), "order(m_s,m_l)"
    m += b["o"] + b["s"] + b["l"] == B, "batch"
    for j, cut, tier in (("s", x, s), ("l", y, l)):
        m += b[j] <= B * busy[j], f"busy_ub({j})"
        m += b[j] >= busy[j], f"busy_lb({j})"
        m += busy[j] <= 1 - cut[0], f"cut_positive({j})"
        if not tab.can_train[tier]:
            m += busy[j] == 0, f"cannot_train({j})"
    for j in "osl":
        for name, prod, cut in (("P", P, x), ("R", R, y)):
            for k in K:
                m += prod[j][k] <= B * cut[k], f"{name}_ub1({j},{k})"
                m += prod[j][k] <= b[j], f"{name}_ub2({j},{k})"
                m += prod[j][k] >= b[j] - B * (1 - cut[k]), f"{name}_lb({j},{k})"
            m += mip.xsum(prod[j]) == b[j], f"{name}_sum({j})"
    for j, cut in (("s", x), ("l", y)):
        for k in K:
            m += U[j][k] <= cut[k], f"U_ub1({j},{k})"
            m += U[j][k] <= busy[j], f"U_ub2({j},{k})"
            m += U[j][k] >= cut[k] + busy[j] - 1, f"U_lb({j},{k})"

    def at(table, tier: int, prod: list) -> mip.LinExpr:  # b_j * table[tier, cut]
        return mip.xsum(float(table[tier, k]) * prod[k] for k in K)

    t_in = {j: float(q * inv[DEVICE, t]) * b[j] for j, t in (("o", o), ("s", s), ("l", l))}
    t_out_s = mip.xsum(float(mo[k] * inv[s, o]) * P["s"][k] for k in K)
    t_out_l = mip.xsum(float(mo[k] * inv[l, o]) * R["l"][k] for k in K)
    m += t1f >= t_in["o"] + at(pf, o, P["o"]), "T1f(o)"
    m += t1f >= t_in["s"] + at(pf, s, P["s"]) + t_out_s, "T1f(s)"
    m += t1f >= t_in["l"] + at(pf, l, P["l"]), "T1f(l)"
    m += t1b >= at(pb, o, P["o"]), "T1b(o)"
    m += t1b >= at(pb, s, P["s"]) + t_out_s, "T1b(s)"
    m += t1b >= at(pb, l, P["l"]), "T1b(l)"
    for t2, table, name in ((t2f, pf, "T2f"), (t2b, pb, "T2b")):
        m += t2 >= at(table, o, R["o"]) + at(table, o, R["s"]) - at(table, o, P["o"]) - at(table, o, P["s"]), f"{name}(o)"
        m += t2 >= at(table, l, R["l"]) - at(table, l, P["l"]) + t_out_l, f"{name}(l)"
    t3 = B * float(pf[o, N] + pb[o, N]) - mip.xsum(B * float(pf[o, k] + pb[o, k]) * y[k] for k in K)
    m += t_up >= float(pu[o, N]), "T_up(o)"
    m += t_up >= mip.xsum(float(pu[s, k]) * U["s"][k] for k in K), "T_up(s)"
    m += t_up >= mip.xsum(float(pu[l, k]) * U["l"][k] for k in K), "T_up(l)"
    m += t_sync >= mip.xsum(float(2 * pp[k] * inv[s, o]) * U["s"][k] for k in K), "T_sync(s)"
    m += t_sync >= mip.xsum(float(2 * pp[k] * inv[l, o]) * U["l"][k] for k in K), "T_sync(l)"
    m.objective = t1f + t1b + t2f + t2b + t3 + t_up + t_sync

    status = m.optimize()
    if status == mip.OptimizationStatus.INFEASIBLE:
        return None
    if status != mip.OptimizationStatus.OPTIMAL:
        raise PlanError(f"CBC did not prove optimality for mapping o={TIERS[o]}, s={TIERS[s]}, l={TIERS[l]}: {status.name}")
    ms = next(k for k in K if x[k].x > 0.5)
    ml = next(k for k in K if y[k].x > 0.5)
    return float(m.objective_value), (o, s, l, ms, ml, *(int(round(b[j].x)) for j in "osl"))


def solve(profile: Profile, bw: Bandwidth, batch: int) -> Schedule:
    if batch < 1:
        raise PlanError(f"batch size must be at least 1, got {batch}")
    t0 = time.perf_counter()
    tab = tables(profile, bw)
    results = [r for r in (_solve_mapping(tab, *mp, batch) for mp in MAPPINGS) if r is not None]
    if not results:
        raise PlanError("no feasible schedule: no tier that can train can hold the whole model")
    value, (o, s, l, ms, ml, bo, bs, bl) = min(results, key=lambda r: r[0])
    return Schedule(mapping={"o": TIERS[o], "s": TIERS[s], "l": TIERS[l]}, m_s=ms, m_l=ml, b_o=bo, b_s=bs, b_l=bl,
                    policy="hiertrain", cost_model="paper", iteration_s=value, solve_s=time.perf_counter() - t0,
                    extra={"solver": "milp"})
