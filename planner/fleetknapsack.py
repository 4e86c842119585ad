"""The fleet search's inner problem (:func:`hiertrain.planner.fleet.solve`): for a deadline tau on the
device phase, the assignment of one path per device with the least additive server seconds G whose
bandwidths fit the shared medium, a multiple-choice knapsack over Pareto fronts of (bandwidth, G).
Each device's options are its undominated paths (:func:`options`, from
:func:`hiertrain.planner.fleet.terms_table`)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np

from hiertrain.planner.fleet import MBIT, Device, Fleet, Path, terms_table


@dataclass
class Options:
    """One device's paths as arrays: compute C, bits V, additive server seconds g."""
    paths: list[Path]
    compute: np.ndarray
    bits: np.ndarray
    g: np.ndarray


def options(fleet: Fleet, d: Device, kappa: int,
             table: Optional[tuple[np.ndarray, np.ndarray, np.ndarray]] = None) -> Options:
    """The device's paths in ``table`` (default: all it may take) with k >= kappa, less the dominated
    ones (no better in C, V and g). C and V depend on m alone, so of each m only its least-g k can be
    undominated."""
    compute, bits, g = table if table is not None else terms_table(fleet, d)
    g = g[:, kappa:]
    best_k = np.argmin(g, axis=1)
    best_g = g[np.arange(len(g)), best_k]
    ms = np.flatnonzero(np.isfinite(best_g))
    if not len(ms):
        return Options([], np.zeros(0), np.zeros(0), np.zeros(0))
    c, v, gg = compute[ms], bits[ms], best_g[ms]
    order = np.lexsort((v, c, gg))  # a path is dominated iff one before it in this order is no worse
    c, v, gg, ms = c[order], v[order], gg[order], ms[order]
    no_worse = (c[None, :] <= c[:, None]) & (v[None, :] <= v[:, None]) & (gg[None, :] <= gg[:, None])
    keep = ~np.any(np.tril(no_worse, -1), axis=1)
    keep_at = np.flatnonzero(keep)[np.argsort(ms[keep])]
    return Options([Path(int(ms[i]), int(best_k[ms[i]]) + kappa) for i in keep_at],
                    c[keep_at], v[keep_at], gg[keep_at])


FRONT = 512
"""Beyond 2 * FRONT (bandwidth, g) pairs after a device, the knapsack keeps two of each 1/FRONT of the
medium (the cheapest and the leanest; what it finds still fits) and is no longer exact."""


class OutOfTime(Exception):
    """The search's budget is spent (:func:`solve` keeps the best plan found)."""


def cheapest_within(fleet: Fleet, opts: list[Options], tau: float, cap: float = math.inf, *,
                     deadline: float = math.inf, front: int = FRONT) -> Optional[tuple[float, list[int], bool]]:
    """The least total g over one option per device whose bandwidth at device-phase deadline tau
    fits the medium (a multiple-choice knapsack over Pareto fronts of (bandwidth, g), exact while
    they stay within ``front`` pairs): (g, the picks, exact), or None if nothing fits, or nothing
    costs less than ``cap``. Raises :class:`OutOfTime` past ``deadline`` (perf_counter)."""
    total = fleet.medium_mbps * (1 + 1e-12)
    exact = True
    rest = np.cumsum([float(o.g.min()) for o in opts][::-1])[::-1].tolist() + [0.0]  # least g still to add
    front_b, front_g = np.zeros(1), np.zeros(1)
    back: list[tuple[np.ndarray, np.ndarray]] = []
    for n, (d, o) in enumerate(zip(fleet.devices, opts)):
        if time.perf_counter() > deadline:
            raise OutOfTime
        with np.errstate(divide="ignore", invalid="ignore"):
            slack = tau - o.compute
            beta = np.where(o.bits > 0, o.bits / MBIT / slack, 0.0)
        ok = (slack >= -1e-15 * max(1.0, abs(tau))) & ((o.bits == 0) | ((slack > 0) & (beta <= d.rate_mbps * (1 + 1e-12))))
        idx = np.flatnonzero(ok)
        if not len(idx):
            return None
        b = (front_b[:, None] + beta[idx][None, :]).ravel()
        g = (front_g[:, None] + o.g[idx][None, :]).ravel()
        parent = np.repeat(np.arange(len(front_b)), len(idx))
        choice = np.tile(idx, len(front_b))
        fits = (b <= total) & (g + rest[n + 1] < cap)
        b, g, parent, choice = b[fits], g[fits], parent[fits], choice[fits]
        if not len(b):
            return None
        order = np.lexsort((b, g))  # by g, then bandwidth: keep those needing less than every cheaper one
        b, g, parent, choice = b[order], g[order], parent[order], choice[order]
        best_b = np.minimum.accumulate(b)
        keep = np.concatenate(([True], b[1:] < best_b[:-1]))
        b, g, parent, choice = b[keep], g[keep], parent[keep], choice[keep]
        if len(b) > 2 * front:  # thin: of each 1/front of the medium, its cheapest pair and its leanest
            bucket = np.floor(b * (front / total))
            edge = bucket[1:] != bucket[:-1]  # b falls along the front
            keep = np.concatenate(([True], edge)) | np.concatenate((edge, [True]))
            b, g, parent, choice = b[keep], g[keep], parent[keep], choice[keep]
            exact = False
        front_b, front_g = b, g
        back.append((parent, choice))
    i = int(np.argmin(front_g))
    picks = []
    for parent, choice in reversed(back):
        picks.append(int(choice[i]))
        i = int(parent[i])
    return float(front_g.min()), picks[::-1], exact
