"""Planning a fleet: many heterogeneous devices, one edge server and a cloud (EdgeSplit + HierTrain).

Each device trains on its own ``samples`` per iteration along one *path*: units 1..m on the device,
m+1..k on the edge, k+1..U on the cloud (0 <= m <= k <= U). ``m = 0`` sends the raw samples up (never
for a *private* device); ``k = U`` leaves the cloud out. EdgeSplit is the special case k = U for
every device; HierTrain's chains are paths of one device.

Exact mode: every unit has one owner, the edge; a tier that trains a replica of it (a device its
prefix, the cloud the suffix it serves) sends its gradient there and gets the new weights back, so an
iteration is exactly one SGD step over every device's samples.

The per-iteration time, its terms written once here as pure functions:

- device d: compute ``C_d = n_d * sum_{u<=m} t_d[u]``; over its own link, in bits,
  ``V_d = 8 * (n_d * a[m] * dirs + 2 * P(1..m))`` (dirs: 2 for activations up and their gradient
  down, 1 for raw samples, 0 when the device trains everything; P: parameter bytes, gradients up
  and weights down);
- the shared medium: device d is given ``b_d <= r_d`` Mbit/s with ``sum b_d <= R``;
- edge: ``E = sum_d n_d * sum_{m<u<=k} t_e[u]``;
- cloud: ``X = 8 * (sum_d dirs_d * n_d * a[k_d] + 2 * P(kappa+1..U)) / R_c`` with kappa the smallest
  k (the units the cloud trains; dirs_d: 2 for activations up and their gradient down, 1 for raw
  samples, k = 0, and 0 when k = U), and ``K = sum_d n_d * sum_{u>k_d} t_c[u]``;

``T = max_d (C_d + V_d / b_d) + E + X + K``: the devices work in parallel, each over its share of the
medium, then the edge serves every device's suffix and the cloud its part (a conservative model: no
overlap between the phases).

:func:`solve` finds the exact optimum over every device's path and the bandwidth shares;
:func:`brute_force` checks it on small instances. The baselines (EdgeSplit's alternating algorithm,
all-local, all-edge, all-cloud, per-device HierTrain), all timed by the same :func:`iteration_time`,
and the coordinator's choice are :mod:`hiertrain.planner.fleetpolicies`'; the step as the runtime
runs it (the edge serving each device as it arrives) is :mod:`hiertrain.planner.fleetsim`'s.
"""

from __future__ import annotations

import itertools
import math
import random
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Optional, Sequence

import numpy as np

from hiertrain.errors import PlanError
from hiertrain.power import PowerModel

MBIT = 1e6


@dataclass(frozen=True)
class Device:
    name: str
    samples: int                       # its samples in every iteration (n_d)
    unit_s: tuple[float, ...]          # seconds per sample, forward + backward, of each unit on it
    rate_mbps: float                   # the most its radio carries (r_d)
    private: bool = False              # its raw samples never leave it (m >= 1)
    power: Optional[PowerModel] = None  # what it draws (default: hiertrain.power's pi4)
    budget_j: Optional[float] = None   # the most joules it may spend in a step (planner.energy)
    budget_w: Optional[float] = None   # the most watts it may draw on average over training (an hour's joules / 3600)


@dataclass(frozen=True)
class Fleet:
    act_bytes: tuple[float, ...]       # per sample at each cut: a[0] a raw sample, a[k] unit k's output
    param_bytes: tuple[float, ...]     # per unit
    devices: tuple[Device, ...]
    edge_s: tuple[float, ...]          # seconds per sample per unit on the edge
    cloud_s: tuple[float, ...]         # ... on the cloud
    medium_mbps: float                 # the shared device-edge medium (R)
    cloud_mbps: float                  # the edge-cloud link (R_c)
    layers: tuple[str, ...] = ()       # the model's layer names (a device's profile must be of the same model)
    sync_every: int = 1                # periodic sync: a device's weights travel once every K steps (1: exact)

    def __post_init__(self) -> None:
        u = len(self.param_bytes)
        if len(self.act_bytes) != u + 1 or len(self.edge_s) != u or len(self.cloud_s) != u:
            raise PlanError(f"a fleet of {u} units needs {u + 1} activation sizes and {u} timings per tier")
        for d in self.devices:
            if len(d.unit_s) != u or d.samples < 0 or not d.rate_mbps > 0:
                raise PlanError(f"device {d.name}: {len(d.unit_s)} timings for {u} units, {d.samples} samples, "
                                f"{d.rate_mbps} Mbit/s")
        if not (self.medium_mbps > 0 and self.cloud_mbps > 0):
            raise PlanError("link rates must be > 0")
        if self.sync_every < 1:
            raise PlanError(f"sync_every = {self.sync_every} must be >= 1")

    @property
    def units(self) -> int:
        return len(self.param_bytes)


@dataclass(frozen=True)
class Path:
    m: int   # the device trains units 1..m
    k: int   # the edge m+1..k, the cloud k+1..U


@dataclass(frozen=True)
class FleetPlan:
    policy: str
    paths: tuple[Path, ...]
    shares_mbps: tuple[float, ...]
    iteration_s: float
    parts: dict = field(default_factory=dict, compare=False)


def random_fleet(rng: random.Random, devices: int, units: int, *, private: float = 0.3) -> Fleet:
    """A heterogeneous fleet for tests and benchmarks: devices 5-60x slower than the edge (a Pi 3 to
    a Jetson), radios of 2-40 Mbit/s on a 5-60 Mbit/s medium, activations and parameters of varied
    size, a share of the devices private."""
    base = [rng.uniform(1e-4, 5e-3) for _ in range(units)]
    return Fleet(
        act_bytes=tuple(rng.uniform(1e3, 2e5) for _ in range(units + 1)),
        param_bytes=tuple(rng.uniform(1e3, 5e5) for _ in range(units)),
        devices=tuple(Device(f"pi{i}", rng.randint(4, 32), tuple(b * rng.uniform(5, 60) for b in base),
                             rng.uniform(2, 40), rng.random() < private) for i in range(devices)),
        edge_s=tuple(b * rng.uniform(0.8, 1.2) for b in base),
        cloud_s=tuple(b * rng.uniform(0.1, 0.3) for b in base),
        medium_mbps=rng.uniform(5, 60), cloud_mbps=rng.uniform(1, 20))


# ------------------------------------------------------------------------------ cost terms (pure)

def paths(fleet: Fleet, d: Device, *, min_k: int = 0) -> list[Path]:
    """Every path a device may take (raw samples up only for a device that is not private)."""
    u = fleet.units
    return [Path(m, k) for m in range(1 if d.private else 0, u + 1) for k in range(max(m, min_k), u + 1)]


def prefix_bytes(fleet: Fleet, m: int) -> float:
    """A device's parameter bytes of units 1..m each way per step: every step in exact mode (the
    weights down, the gradients up), once every K steps in periodic sync (a fresh copy down, its copy up)."""
    return sum(fleet.param_bytes[:m]) / fleet.sync_every


def device_bytes(fleet: Fleet, d: Device, m: int) -> tuple[float, float]:
    """(bytes up, bytes down) over a device's link when it trains units 1..m: its activations at the
    cut up and their gradient down (raw samples up alone for m = 0, nothing for m = U), the gradients
    of its units up and their new weights down (:func:`prefix_bytes`)."""
    u = fleet.units
    act = d.samples * fleet.act_bytes[m]
    params = prefix_bytes(fleet, m)
    return (act if m < u else 0.0) + params, (act if 0 < m < u else 0.0) + params


def device_terms(fleet: Fleet, d: Device, m: int) -> tuple[float, float]:
    """(compute seconds, bits over its link) of a device training units 1..m."""
    compute = d.samples * sum(d.unit_s[:m])
    return compute, 8.0 * sum(device_bytes(fleet, d, m))


def cloud_bytes(fleet: Fleet, d: Device, k: int) -> float:
    """Bytes of a device's rows over the edge-cloud link when the cloud trains units k+1..U: the
    activations at k up and their gradient down, raw samples up alone (k = 0), nothing (k = U)."""
    dirs = 0 if k == fleet.units else 1 if k == 0 else 2
    return dirs * d.samples * fleet.act_bytes[k]


def server_terms(fleet: Fleet, d: Device, p: Path) -> float:
    """Seconds this device's path adds to the edge and the cloud (compute, and its activations
    over the edge-cloud link), all additive over devices."""
    edge = d.samples * sum(fleet.edge_s[p.m:p.k])
    cloud = d.samples * sum(fleet.cloud_s[p.k:])
    return edge + cloud + 8.0 * cloud_bytes(fleet, d, p.k) / (fleet.cloud_mbps * MBIT)


def sync_bytes(fleet: Fleet, kappa: int) -> float:
    """Bytes of the cloud's gradients of units kappa+1..U to the edge and their new weights back."""
    return 2 * sum(fleet.param_bytes[kappa:])


def cloud_sync(fleet: Fleet, kappa: int) -> float:
    """Seconds of :func:`sync_bytes` over the edge-cloud link."""
    return 8.0 * sync_bytes(fleet, kappa) / (fleet.cloud_mbps * MBIT)


def allocate(compute: Sequence[float], bits: Sequence[float], caps: Sequence[float],
             total: float) -> tuple[float, list[float]]:
    """Shares of the medium minimising ``max_d compute_d + bits_d / share_d`` (share_d <= caps_d,
    sum <= total, Mbit/s): the device phase's seconds and the shares. Infinite if it cannot fit."""
    need = [i for i, b in enumerate(bits) if b > 0]
    lo = max([0.0, *compute, *(compute[i] + bits[i] / (caps[i] * MBIT) for i in need)])

    def shares(tau: float) -> list[float]:
        return [bits[i] / MBIT / (tau - compute[i]) if bits[i] > 0 else 0.0 for i in range(len(bits))]

    if not need or sum(shares(lo)) <= total * (1 + 1e-12):
        return lo, (shares(lo) if need else [0.0] * len(bits))
    hi = max(compute[i] for i in need) + sum(bits) / (total * MBIT)
    hi = max(hi, lo)
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if sum(shares(mid)) <= total:
            hi = mid
        else:
            lo = mid
        if hi - lo <= 1e-13 * hi:
            break
    return hi, shares(hi)


def iteration_time(fleet: Fleet, chosen: Sequence[Path]) -> tuple[float, list[float], dict]:
    """T for the devices' paths, with the best shares of the medium: (seconds, shares, the parts)."""
    if len(chosen) != len(fleet.devices):
        raise PlanError(f"{len(chosen)} paths for {len(fleet.devices)} devices")
    terms = [device_terms(fleet, d, p.m) for d, p in zip(fleet.devices, chosen)]
    for d, p in zip(fleet.devices, chosen):
        if not 0 <= p.m <= p.k <= fleet.units or (d.private and p.m == 0):
            raise PlanError(f"device {d.name}: path {p} is not allowed")
    tau, shares = allocate([c for c, _ in terms], [b for _, b in terms], [d.rate_mbps for d in fleet.devices],
                           fleet.medium_mbps)
    servers = sum(server_terms(fleet, d, p) for d, p in zip(fleet.devices, chosen))
    kappa = min((p.k for p in chosen), default=fleet.units)
    sync = cloud_sync(fleet, kappa)
    return tau + servers + sync, shares, {"devices_s": tau, "servers_s": servers, "cloud_sync_s": sync}


def every_within(fleet: Fleet, chosen: Sequence[Path], up_to: int, *, slack: float = 0.02) -> int:
    """Periodic sync's K for these paths: the smallest K <= ``up_to`` (the user's accuracy-safe bound)
    whose step is within ``slack`` of the step at ``up_to``. Averaging more often only costs time, so
    the devices average as often as it is nearly free."""
    floor = iteration_time(replace(fleet, sync_every=up_to), chosen)[0]
    return next(k for k in range(1, up_to + 1) if iteration_time(replace(fleet, sync_every=k), chosen)[0]
                <= floor * (1 + slack))


def plan_of(policy: str, fleet: Fleet, chosen: Sequence[Path]) -> FleetPlan:
    """The plan of given paths, timed, with the best shares of the medium."""
    t, shares, parts = iteration_time(fleet, chosen)
    return FleetPlan(policy, tuple(chosen), tuple(shares), t, parts)


# ------------------------------------------------------------------------------------ exact

Allow = Callable[[Device, Path], bool]
"""Which paths a device may take besides what :func:`paths` allows (an energy budget's)."""


def brute_force(fleet: Fleet, *, allow: Optional[Allow] = None) -> FleetPlan:
    """Every combination of paths (small fleets only: the tests' reference)."""
    best = None
    for chosen in itertools.product(*([p for p in paths(fleet, d) if allow is None or allow(d, p)]
                                      for d in fleet.devices)):
        t = iteration_time(fleet, chosen)[0]
        if best is None or t < best[0] - 1e-15:
            best = (t, chosen)
    if best is None:
        raise PlanError("no path of some device is allowed")
    return plan_of("brute-force", fleet, best[1])


def terms_table(fleet: Fleet, d: Device, allow: Optional[Allow] = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`device_terms` and :func:`server_terms` of every path of a device at once, from prefix
    sums: ``(C[m], V[m], g[m, k])``, g infinite where ``k < m``, m is not the device's to take or
    ``allow`` refuses the path."""
    u, n = fleet.units, d.samples
    act = np.asarray(fleet.act_bytes, dtype=float)
    params = np.concatenate(([0.0], np.cumsum(fleet.param_bytes))) / fleet.sync_every
    ms = np.arange(u + 1)
    compute = n * np.concatenate(([0.0], np.cumsum(d.unit_s)))
    up = np.where(ms < u, n * act, 0.0) + params
    down = np.where((ms > 0) & (ms < u), n * act, 0.0) + params
    edge = np.concatenate(([0.0], np.cumsum(fleet.edge_s)))
    cloud = np.concatenate(([0.0], np.cumsum(fleet.cloud_s)))
    link = np.array([cloud_bytes(fleet, d, k) for k in range(u + 1)])
    by_k = n * (cloud[u] - cloud) + 8.0 * link / (fleet.cloud_mbps * MBIT)
    g = n * (edge[None, :] - edge[:, None]) + by_k[None, :]
    g[np.tril_indices(u + 1, -1)] = np.inf
    if d.private:
        g[0, :] = np.inf
    if allow is not None:
        for m, k in zip(*np.nonzero(np.isfinite(g))):
            if not allow(d, Path(int(m), int(k))):
                g[m, k] = np.inf
    return compute, 8.0 * (up + down), g


def solve(fleet: Fleet, *, budget_s: float = 0.8, allow: Optional[Allow] = None) -> FleetPlan:
    """The exact optimum of :func:`iteration_time` over every device's path and the shares, or,
    when the search outgrows ``budget_s``, the best plan found (``parts["optimal"]`` says which);
    never worse than any baseline of :data:`POLICIES`, which seed it.

    For each kappa (the first unit the cloud may train), T = tau + G + sync(kappa): tau the device
    phase, G the additive server seconds. For a deadline tau the least G is a multiple-choice
    knapsack on the medium (:func:`hiertrain.planner.fleetknapsack.cheapest_within`), and G only grows as tau shrinks. So tau is
    walked down from infinity: each step takes the least-G assignment that fits below its
    predecessor's own tau, the only place a better plan can be; the walk ends when nothing fits, or
    when even the shortest device phase plus that G cannot beat the best plan (exact). Before any
    walk, deadlines on a coarse grid in every branch, then a finer one around each branch's best, give
    a good plan early, which tightens both ends (and is what a short budget returns). ``allow`` restricts each device's paths (the baselines that
    take another are not seeds)."""
    from hiertrain.planner.fleetknapsack import OutOfTime, cheapest_within, options
    from hiertrain.planner.fleetpolicies import baseline  # the baselines seed the walk (and one is this)

    if not fleet.devices:
        raise PlanError("a fleet needs at least one device")
    deadline = time.perf_counter() + budget_s
    best: Optional[tuple[float, list[Path]]] = None
    for policy in ("edgesplit", "all-edge", "all-cloud", "all-local", "per-device-hiertrain"):
        try:
            seed = baseline(fleet, policy)
        except PlanError:
            continue
        if allow is not None and not all(allow(d, p) for d, p in zip(fleet.devices, seed.paths)):
            continue
        if math.isfinite(seed.iteration_s) and (best is None or seed.iteration_s < best[0]):
            best = (seed.iteration_s, list(seed.paths))
    branches = []
    tables = [terms_table(fleet, d, allow) for d in fleet.devices]
    for kappa in range(fleet.units + 1):
        opts = [options(fleet, d, kappa, t) for d, t in zip(fleet.devices, tables)]
        if any(not len(o.paths) for o in opts):
            continue
        floor = max(float(np.min(o.compute)) for o in opts)  # no device phase is shorter
        sync = cloud_sync(fleet, kappa)
        branches.append((floor + sum(float(o.g.min()) for o in opts) + sync, kappa, opts, floor, sync))
    branches.sort(key=lambda b: b[0])

    def settle(opts, tau, floor, sync):
        """The least-G assignment within deadline tau (None if none fits or can pay); keeps the best."""
        nonlocal best, optimal
        found = cheapest_within(fleet, opts, tau, best[0] - floor - sync if best else math.inf, deadline=deadline)
        if found is None:
            return None
        g, picks, exact = found
        optimal &= exact
        chosen = [o.paths[i] for o, i in zip(opts, picks)]
        t, _, parts = iteration_time(fleet, chosen)
        if best is None or t < best[0]:
            best = (t, chosen)
        return g, parts["devices_s"], t

    def grid(opts, taus, floor, sync):
        """settle at each deadline of ``taus``; (seconds, deadline) of the branch's best among them."""
        found = [(got[2], float(tau)) for tau in taus for got in [settle(opts, float(tau), floor, sync)] if got]
        return min(found, default=(math.inf, math.inf))

    optimal = True
    try:
        walks, near = [], []  # first every branch's coarse grid (a good plan early, whatever the budget), then
        for bound, _, opts, floor, sync in branches:  # a finer grid around each branch's best, then the walks
            if best is not None and bound >= best[0]:
                break
            top = settle(opts, math.inf, floor, sync)
            if top is None:
                continue
            taus = np.geomspace(max(floor, 1e-9), max(top[1], 2e-9), 12)
            t, tau = grid(opts, taus[1:-1], floor, sync)
            if math.isfinite(t):
                near.append((t, tau, taus, opts, floor, sync))
            walks.append((bound, opts, floor, sync, top[1]))
        for t, tau, taus, opts, floor, sync in sorted(near, key=lambda n: n[0]):
            for _ in range(3):  # around the branch's best, each round a tenth of the last one's span
                i = int(np.searchsorted(taus, tau))
                taus = np.geomspace(taus[max(i - 1, 0)], taus[min(i + 1, len(taus) - 1)], 10)
                t, tau = min((t, tau), grid(opts, taus[1:-1], floor, sync))
        for bound, opts, floor, sync, tau in walks:
            if bound >= best[0]:
                continue
            while tau > 0:
                got = settle(opts, tau * (1 - 1e-9), floor, sync)
                if got is None or floor + got[0] + sync >= best[0]:
                    break  # nothing fits below, or a shorter deadline only costs more than the best
                tau = got[1]
    except OutOfTime:
        optimal = False
    if best is None:
        raise PlanError("no plan fits the medium (every device's path needs more than its radio carries)")
    plan = plan_of("hiertrain", fleet, best[1])
    plan.parts["optimal"] = optimal
    return plan


# ------------------------------------------------------------------------------ the cloud gone

NO_CLOUD_S = 1e9  # a unit's time on a cloud that is gone: longer than any plan


def without_cloud(fleet: Fleet) -> Fleet:
    """The fleet with its cloud gone: the cloud's units take longer than any plan (every k = U)."""
    return replace(fleet, cloud_s=(NO_CLOUD_S,) * fleet.units)


def describe(fleet: Fleet, plan: FleetPlan) -> list[str]:
    """One line per device: where its units run and its share of the medium."""
    u = fleet.units
    out = []
    for d, p, share in zip(fleet.devices, plan.paths, plan.shares_mbps):
        where = [f"device 1..{p.m}" if p.m else "raw samples up"]
        where += [f"edge {p.m + 1}..{p.k}"] if p.k > p.m else []
        where += [f"cloud {p.k + 1}..{u}"] if p.k < u else []
        out.append(f"{d.name}: {d.samples} samples, {', '.join(where)}; {share:.2f} of its {d.rate_mbps:g} Mbit/s")
    return out
