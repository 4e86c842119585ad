"""The exact HierTrain scheduler: the integer minimum of T_total over mappings, cuts and splits.

The search space is 6 mappings x (N+1)(N+2)/2 cut pairs x (B+1)(B+2)/2 sample splits. Instead
of one small MIP per (mapping, cuts) as in the paper's Algorithm 1 (which also rounds an LP
solution and can miss the integer optimum), we exploit two facts of the model's structure:

1. For fixed (mapping, m_s, m_l) every term of T_total is a max of functions *linear* in
   (b_o, b_s, b_l). Relaxing each segment's max on its own gives a valid lower bound in closed
   form: min over b >= 0, sum b = B of max_j c_j b_j is B / sum_j (1 / c_j).
2. Evaluating T_total for every integer split of one candidate is a single vectorised numpy
   expression (:func:`planner.costmodel.evaluate`), a few tens of microseconds for B = 64.

Candidates are visited in increasing order of their bound, in growing batches, and the search
stops as soon as the next bound is no better than the best integer value found: the result is
the exact optimum, without rounding loss. :mod:`planner.milp` states the same problem as one
python-mip MILP per mapping; tests check both against brute force.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from itertools import permutations

import numpy as np

from hiertrain import TIERS
from hiertrain.errors import PlanError
from hiertrain.profile import Profile
from hiertrain.schedule import Schedule
from hiertrain.planner.costmodel import DEVICE, Bandwidth, Tables, evaluate, overhead, tables

MAPPINGS: tuple[tuple[int, int, int], ...] = tuple(permutations(range(3)))  # (o, s, l) tier indices
PATTERNS: tuple[tuple[bool, bool], ...] = ((False, False), (True, False), (False, True), (True, True))
MAX_CELLS = 1 << 18  # candidate x split cells evaluated per numpy batch


@dataclass(frozen=True)
class Candidates:
    """(mapping, m_s, m_l) candidates for one activity pattern (is s busy, is l busy)."""

    o: np.ndarray
    s: np.ndarray
    l: np.ndarray
    m_s: np.ndarray
    m_l: np.ndarray


@functools.lru_cache(maxsize=64)
def splits(batch: int, pattern: tuple[bool, bool]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All integer (b_o, b_s, b_l) summing to ``batch`` with b_s > 0 iff s busy, b_l > 0 iff l busy."""
    i, j = np.triu_indices(batch + 1)  # 0 <= i <= j <= batch: b_s = i, b_s + b_l = j
    b_s, b_l = i, j - i
    keep = ((b_s > 0) == pattern[0]) & ((b_l > 0) == pattern[1])
    b_s, b_l = b_s[keep].astype(np.float64), b_l[keep].astype(np.float64)
    return batch - b_s - b_l, b_s, b_l


@functools.lru_cache(maxsize=64)
def candidates(n: int, pattern: tuple[bool, bool]) -> Candidates:
    """The cut pairs worth evaluating under ``pattern``.

    Idle workers make some cuts irrelevant: with both idle the cost is that of o alone (one
    candidate per tier of o); with only s busy, m_l does not change the cost (take m_l = m_s).
    A busy worker needs a cut > 0.
    """
    m_s, m_l = np.triu_indices(n + 1)
    busy_s, busy_l = pattern
    if not busy_s and not busy_l:
        keep = (m_s == 0) & (m_l == 0)
    elif busy_s and not busy_l:
        keep = (m_s > 0) & (m_l == m_s)
    else:
        keep = (m_l > 0) & ((m_s > 0) | (not busy_s))
    m_s, m_l = m_s[keep], m_l[keep]
    maps = np.array([m for m in MAPPINGS if busy_s or busy_l or m[1] < m[2]])  # idle s/l: order irrelevant
    k = len(m_s)
    return Candidates(np.repeat(maps[:, 0], k), np.repeat(maps[:, 1], k), np.repeat(maps[:, 2], k),
                      np.tile(m_s, len(maps)), np.tile(m_l, len(maps)))


def _balanced(batch: int, *terms: tuple[np.ndarray, bool]) -> np.ndarray:
    """min over real b_j >= 0 with sum b_j = batch of max_j c_j b_j, over the busy workers j.

    At the optimum every c_j b_j is equal, so the value is batch / sum_j (1 / c_j); a free
    worker (c_j = 0) makes it 0.
    """
    busy = [np.asarray(c, dtype=np.float64) for c, on in terms if on]
    if not busy:
        return np.zeros(())
    with np.errstate(divide="ignore"):
        inv_sum = sum(1.0 / c for c in busy)  # 1/0 = inf -> value 0
    return batch / inv_sum


def lower_bound(tab: Tables, c: Candidates, batch: int, pattern: tuple[bool, bool]) -> np.ndarray:
    """A valid lower bound of each candidate's integer optimum under ``pattern`` (inf if infeasible)."""
    o, s, l, m_s, m_l = c.o, c.s, c.l, c.m_s, c.m_l
    busy_s, busy_l = pattern
    pf, pb, pu, inv, n, q = tab.pf, tab.pb, tab.pu, tab.inv, tab.n, tab.q_path
    x_s = tab.mo[m_s] * inv[s, o]
    x_l = tab.mo[m_l] * inv[l, o]
    seg1f = _balanced(batch, (q * inv[DEVICE, o] + pf[o, m_s], True),
                      (q * inv[DEVICE, s] + pf[s, m_s] + x_s, busy_s), (q * inv[DEVICE, l] + pf[l, m_s], busy_l))
    seg1b = _balanced(batch, (pb[o, m_s], True), (pb[s, m_s] + x_s, busy_s), (pb[l, m_s], busy_l))
    # in segment 2, o's and s's samples both run on o: one variable b_o + b_s
    seg2f = _balanced(batch, (pf[o, m_l] - pf[o, m_s], True), (pf[l, m_l] - pf[l, m_s] + x_l, busy_l))
    seg2b = _balanced(batch, (pb[o, m_l] - pb[o, m_s], True), (pb[l, m_l] - pb[l, m_s] + x_l, busy_l))
    seg3 = batch * (pf[o, n] - pf[o, m_l] + pb[o, n] - pb[o, m_l])
    update = np.maximum(np.maximum(pu[o, n], pu[s, m_s] * busy_s), pu[l, m_l] * busy_l)
    sync = np.maximum(2 * tab.pp[m_s] * inv[s, o] * busy_s, 2 * tab.pp[m_l] * inv[l, o] * busy_l)
    bound = seg1f + seg1b + seg2f + seg2b + seg3 + update + sync + overhead(tab, o, busy_s, s, m_s, busy_l, l, m_l)
    feasible = tab.can_train[o] & (tab.can_train[s] | (not busy_s)) & (tab.can_train[l] | (not busy_l))
    return np.where(feasible, bound, np.inf)


@dataclass(frozen=True)
class Solution:
    o: int
    s: int
    l: int
    m_s: int
    m_l: int
    b_o: int
    b_s: int
    b_l: int
    iteration_s: float
    evaluated: int  # candidates evaluated exactly


def search(tab: Tables, batch: int) -> Solution:
    """Best-first branch and bound over candidates (see the module docstring)."""
    if batch < 1:
        raise PlanError(f"batch size must be at least 1, got {batch}")
    patterns = [p for p in PATTERNS if len(splits(batch, p)[0])]
    groups = [candidates(tab.n, p) for p in patterns]
    bounds = np.concatenate([lower_bound(tab, g, batch, p) for g, p in zip(groups, patterns)])
    which = np.concatenate([np.full(len(g.o), i) for i, g in enumerate(groups)])
    index = np.concatenate([np.arange(len(g.o)) for g in groups])
    order = np.argsort(bounds, kind="stable")
    sizes = np.array([len(splits(batch, p)[0]) for p in patterns])[which]
    best, arg, done, budget = np.inf, None, 0, 4096
    while done < len(order) and bounds[order[done]] < best:
        end = done + 1 + int(np.searchsorted(np.cumsum(sizes[order[done + 1:]]), budget))
        batch_ids = order[done:end]
        batch_ids = batch_ids[bounds[batch_ids] < best]
        for g in np.unique(which[batch_ids]):
            ids = index[batch_ids[which[batch_ids] == g]]
            c, (b_o, b_s, b_l) = groups[g], splits(batch, patterns[g])
            vals = evaluate(tab, c.o[ids, None], c.s[ids, None], c.l[ids, None], c.m_s[ids, None],
                            c.m_l[ids, None], b_o[None, :], b_s[None, :], b_l[None, :])
            i, k = np.unravel_index(np.argmin(vals), vals.shape)
            if vals[i, k] < best:
                best = float(vals[i, k])
                arg = (c.o[ids[i]], c.s[ids[i]], c.l[ids[i]], c.m_s[ids[i]], c.m_l[ids[i]], b_o[k], b_s[k], b_l[k])
        done = end
        budget = min(2 * budget, MAX_CELLS)
    if arg is None:
        raise PlanError("no feasible schedule: the tier that would hold the whole model cannot train "
                        "(every tier reports can_train: false?)")
    return Solution(*(int(x) for x in arg), best, done)


def solve(profile: Profile, bw: Bandwidth, batch: int, *, cost_model: str = "paper") -> Schedule:
    """The optimal O/S/L schedule under ``cost_model``, timed (``solve_s``)."""
    t0 = time.perf_counter()
    tab = tables(profile, bw, cost_model)
    sol = search(tab, batch)
    solve_s = time.perf_counter() - t0
    return Schedule(
        mapping={"o": TIERS[sol.o], "s": TIERS[sol.s], "l": TIERS[sol.l]},
        m_s=sol.m_s, m_l=sol.m_l, b_o=sol.b_o, b_s=sol.b_s, b_l=sol.b_l,
        policy="hiertrain", cost_model=cost_model, iteration_s=sol.iteration_s, solve_s=solve_s,
    )
