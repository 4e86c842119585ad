"""The fleet's step as the runtime runs it: a fluid simulation of one step of a plan.

:func:`hiertrain.planner.fleet.iteration_time` (what the exact solver minimises) is conservative:
the edge starts only once every device has sent. Here the edge serves each device as it arrives;
:func:`refined` picks, of several plans, the one the simulation finds fastest.
"""

from __future__ import annotations

from typing import Sequence

from hiertrain.planner.fleet import MBIT, Fleet, FleetPlan, Path, cloud_sync, prefix_bytes, server_terms


def simulated_time(fleet: Fleet, chosen: Sequence[Path]) -> float:
    """The step as the runtime runs it, in a fluid simulation. :func:`iteration_time` (what
    :func:`solve` minimises exactly) starts the edge only once every device has sent, over
    planned shares of the medium; here the edge starts on each device as it arrives, which is
    where paths that send raw samples early gain while a slow device still computes:

    each device receives its weights (P(1..m)), computes (C_d), and sends its activations or raw
    samples; transfers in progress share the half-duplex medium R fairly, each capped by its radio;
    the edge continues one device at a time in the order they arrive (e_d); then the device gets its
    gradient and sends its parameter gradients. The cloud's part (X + K) follows the edge's last
    device, and the devices on cloud paths finish after it.
    """
    u = fleet.units
    edge_end, phases = 0.0, []
    for d, p in zip(fleet.devices, chosen):
        a = d.samples * fleet.act_bytes[p.m] * 8.0
        pm = prefix_bytes(fleet, p.m) * 8.0
        post = (a if 0 < p.m < u else 0.0) + pm
        e = d.samples * sum(fleet.edge_s[p.m:p.k]) if p.m < u else 0.0
        phases.append([["tx", pm], ["cpu", d.samples * sum(d.unit_s[:p.m])], ["tx", a if p.m < u else 0.0],
                       ["edge", e], ["tx", post]])
    rate = [d.rate_mbps * MBIT for d in fleet.devices]
    t, queue, serving, done = 0.0, [], None, [0.0] * len(phases)
    cloud = [p.k < u for p in chosen]
    while True:
        for i, ph in enumerate(phases):      # skip empty phases; join the edge's queue on arrival
            while ph and ph[0][1] <= 1e-15 and (ph[0][0] != "edge" or i not in queue):
                ph.pop(0)
                if not ph:
                    done[i] = t
            if ph and ph[0][0] == "edge" and i not in queue and serving != i:
                queue.append(i)
        if serving is None and queue:
            serving = queue.pop(0)
        tx = [i for i, ph in enumerate(phases) if ph and ph[0][0] == "tx"]
        if not any(phases):
            break
        share = _water_fill([rate[i] for i in tx], fleet.medium_mbps * MBIT)
        steps = [phases[i][0][1] / r for i, r in zip(tx, share)]
        steps += [ph[0][1] for ph in phases if ph and ph[0][0] == "cpu"]
        steps += [phases[serving][0][1]] if serving is not None else []
        dt = min(steps)
        t += dt
        for i, r in zip(tx, share):
            phases[i][0][1] -= r * dt
        for ph in phases:
            if ph and ph[0][0] == "cpu":
                ph[0][1] -= dt
        if serving is not None:
            phases[serving][0][1] -= dt
            if phases[serving][0][1] <= 1e-15:
                phases[serving].pop(0)
                edge_end = t
                serving = None
    kappa = min((p.k for p in chosen), default=u)
    tail = sum(server_terms(fleet, d, p) - d.samples * sum(fleet.edge_s[p.m:p.k])
               for d, p in zip(fleet.devices, chosen)) + cloud_sync(fleet, kappa)
    return max([t if not c else 0.0 for t, c in zip(done, cloud)] + [edge_end + tail if any(cloud) else 0.0]
               + [edge_end])


def _water_fill(caps: Sequence[float], total: float) -> list[float]:
    """Fair shares of ``total`` among transfers each capped at its own rate."""
    out, left, todo = [0.0] * len(caps), total, sorted(range(len(caps)), key=lambda i: caps[i])
    for n, i in enumerate(todo):
        out[i] = min(caps[i], left / (len(todo) - n))
        left -= out[i]
    return out


def refined(fleet: Fleet, plans: Sequence[FleetPlan]) -> FleetPlan:
    """Of ``plans``, the one :func:`simulated_time` finds fastest, with that time as its prediction
    (the conservative time is kept in ``parts``)."""
    scored = [(simulated_time(fleet, p.paths), i, p) for i, p in enumerate(plans)]
    t, _, best = min(scored)
    return FleetPlan(best.policy, best.paths, best.shares_mbps, t, {**best.parts, "conservative_s": best.iteration_s})
