"""The paper's cost model (HierTrain eq. 1-12 as pinned down in shared/COSTMODEL.md), the chain
model the layer-split baselines need, and a calibrated variant of both for our runtime.

``calibrated`` differs from ``paper`` in three measured respects (see :class:`Calibration`):

- *prefetch*: the device sends iteration i+1's samples while i runs, so input transfers leave
  the critical path; instead the iteration cannot be shorter than the busiest link needs for
  everything crossing it, both directions added (inputs, activations, gradients, weights: the
  downstream transfers wait for the upstream ones, which queue behind the prefetched inputs),
  plus one frame's store-and-forward at the broker when a transfer crosses both links;
- *link efficiency*: a shaped link carries TCP payload at MSS / frame = 1448 / 1514 of its rate;
- *framework overhead*: each tier computing in an iteration adds a per-iteration constant to the
  critical path (MQTT hops, Python, telemetry, copies and checks of the weights, at that tier's CPU
  speed). Fitted from single-tier runs, where the tier held every parameter; a tier holding a
  slice or a chain stage pays the share of it its parameters are;
- *device loop*: the device stamps and sends samples every iteration even when it computes
  nothing, so its loop is a floor. Measured apart (its framework seconds per iteration in the runs
  where it is idle): the owner's overhead, which can be seconds for a large model on a slow device,
  is no floor for plans that leave the device idle.
- *message cost*: every message of an exchange on the critical path (weights, activations,
  gradients, parameter gradients between worker_o and a slice worker; activations and gradients
  between chain stages) costs its sender and its receiver their per-message seconds: the MQTT
  client, dispatch and decoding, at that tier's CPU speed. Measured in the same single-tier runs
  (framework CPU per message, stretched as the tier's compute is), since they exchange none.

So T = max(critical path + overheads of the busy tiers + message costs, busiest link, device loop).

Everything here is a pure function of precomputed :class:`Tables` (prefix sums of a profile and
the inverse bandwidths). :func:`evaluate` is written once with numpy broadcasting: the solver calls
it on arrays of candidate schedules, :func:`iteration_time` on one schedule, and both get the
same arithmetic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from hiertrain import TIERS
from hiertrain.errors import PlanError
from hiertrain.profile import Profile
from hiertrain.schedule import Schedule, Stage

BYTES_PER_MBIT = 125_000.0
DEVICE, EDGE, CLOUD = (TIERS.index(t) for t in ("device", "edge", "cloud"))
MODELS = ("paper", "calibrated")
TCP_EFFICIENCY = 1448.0 / 1514.0  # TCP payload per Ethernet frame at MTU 1500 (timestamps on)


@dataclass(frozen=True)
class Calibration:
    """Per-tier framework seconds per iteration (TIERS order), fitted by ``hiertrain bench testbed``
    and stored in the profile as ``"calibration": {"overhead_s": {"device": ..., ...}}``."""

    overhead_s: tuple[float, float, float]
    chunk_bytes: float = 256 * 1024  # the runtime's frame size (store-and-forward unit at the broker)
    message_s: tuple[float, float, float] = (0.0, 0.0, 0.0)  # per message sent or received on the critical path
    loop_s: float = 0.0  # the idle device's loop per iteration: a floor under every plan

    @classmethod
    def of(cls, profile: Profile) -> "Calibration":
        block = profile.extra.get("calibration")
        try:
            values = tuple(float(block["overhead_s"][t]) for t in TIERS)  # type: ignore[index]
            chunk = float(block.get("chunk_bytes", cls.chunk_bytes))  # type: ignore[union-attr]
            per_message = tuple(float(block.get("message_s", {}).get(t, 0.0)) for t in TIERS)  # type: ignore[union-attr]
            loop = float(block.get("loop_s", 0.0))  # type: ignore[union-attr]
        except (TypeError, KeyError, ValueError, AttributeError):
            raise PlanError("the calibrated cost model needs a profile with a \"calibration\" block "
                            "({\"overhead_s\": {device, edge, cloud}}); hiertrain bench testbed fits one") from None
        if not all(math.isfinite(v) and v >= 0 for v in (*values, chunk, *per_message, loop)):
            raise PlanError(f"calibration overheads, message costs, loop_s and chunk_bytes must be finite and >= 0, "
                            f"got {values}, {per_message}, {loop}, {chunk}")
        return cls(values, chunk, per_message, loop)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Bandwidth:
    """Link rates in Mbit/s; device and cloud talk through the edge at the slower link's rate."""

    device_edge: float
    edge_cloud: float

    def __post_init__(self) -> None:
        for name in ("device_edge", "edge_cloud"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise PlanError(f"bandwidth {name.replace('_', '-')} must be a positive number of Mbit/s, got {v!r}")

    def seconds_per_byte(self) -> np.ndarray:
        """3x3 matrix over (device, edge, cloud): 1 / bytes per second, 0 within a tier."""
        de = 1.0 / (self.device_edge * BYTES_PER_MBIT)
        ec = 1.0 / (self.edge_cloud * BYTES_PER_MBIT)
        dc = max(de, ec)
        inv = np.zeros((3, 3))
        inv[DEVICE, EDGE] = inv[EDGE, DEVICE] = de
        inv[EDGE, CLOUD] = inv[CLOUD, EDGE] = ec
        inv[DEVICE, CLOUD] = inv[CLOUD, DEVICE] = dc
        return inv


@dataclass(frozen=True)
class Tables:
    """Prefix sums over units (index k = units 1..k; index 0 = none), tiers in TIERS order."""

    n: int
    q: float              # sample bytes
    pf: np.ndarray        # (3, N+1) forward seconds per sample
    pb: np.ndarray        # (3, N+1) backward seconds per sample
    pu: np.ndarray        # (3, N+1) update seconds per iteration
    mo: np.ndarray        # (N+1,) output bytes of unit k per sample (mo[0] = sample bytes)
    pp: np.ndarray        # (N+1,) parameter bytes of units 1..k
    inv: np.ndarray       # (3, 3) seconds per byte between tiers
    can_train: np.ndarray  # (3,) bool
    prefetch: bool = False  # inputs travel during the previous iteration: bound by link loads instead
    overhead: np.ndarray = field(default_factory=lambda: np.zeros(3))  # per-iteration seconds of each busy tier
    message: np.ndarray = field(default_factory=lambda: np.zeros(3))  # seconds per message sent or received
    loop: float = 0.0     # the idle device's loop per iteration (calibrated model): a floor
    chunk: float = 0.0    # frame bytes stored and forwarded at the broker (calibrated model)

    @property
    def share(self) -> np.ndarray:
        """(N+1,) share of the model's parameters in units 1..k (all 1 for a model without any)."""
        return self.pp / self.pp[self.n] if self.pp[self.n] > 0 else np.ones_like(self.pp)

    @property
    def q_path(self) -> float:
        """Sample bytes on the critical path: none when inputs are prefetched."""
        return 0.0 if self.prefetch else self.q


def tables(profile: Profile, bw: Bandwidth, cost_model: str = "paper") -> Tables:
    if cost_model not in MODELS:
        raise PlanError(f"unknown cost model {cost_model!r}; available: {', '.join(MODELS)}")
    profile.require_tiers()
    calibrated = cost_model == "calibrated"
    cal = Calibration.of(profile) if calibrated else Calibration((0.0, 0.0, 0.0), 0.0)

    def prefix(values: Sequence[float]) -> np.ndarray:
        return np.concatenate([[0.0], np.cumsum(np.asarray(values, dtype=np.float64))])

    per_tier = [profile.tiers[t] for t in TIERS]
    return Tables(
        n=profile.n_units,
        q=profile.sample_bytes,
        pf=np.stack([prefix(t.forward_s) for t in per_tier]),
        pb=np.stack([prefix(t.backward_s) for t in per_tier]),
        pu=np.stack([prefix(t.update_s) for t in per_tier]),
        mo=np.concatenate([[profile.sample_bytes], [l.output_bytes for l in profile.layers]]),
        pp=prefix([l.param_bytes for l in profile.layers]),
        inv=bw.seconds_per_byte() / (TCP_EFFICIENCY if calibrated else 1.0),
        can_train=np.array([t.can_train for t in per_tier]),
        prefetch=calibrated,
        overhead=np.array(cal.overhead_s),
        message=np.array(cal.message_s),
        loop=cal.loop_s,
        chunk=cal.chunk_bytes,
    )


def _path(src: Any, dst: Any) -> dict[str, Any]:
    """Which directed link halves a transfer src -> dst crosses (device-cloud goes through the edge)."""
    return {"de_up": (src == DEVICE) & (dst != DEVICE), "de_down": (dst == DEVICE) & (src != DEVICE),
            "ec_up": (dst == CLOUD) & (src != CLOUD), "ec_down": (src == CLOUD) & (dst != CLOUD)}


def link_time(tab: Tables, transfers: Sequence[tuple[Any, Any, Any]]) -> Any:
    """Seconds the busiest link needs for ``transfers`` = [(src, dst, bytes), ...], plus one frame
    stored and forwarded at the broker if any transfer crosses both links."""
    load = {k: 0.0 for k in ("de_up", "de_down", "ec_up", "ec_down")}
    frame: Any = 0.0  # the largest first frame of a device <-> cloud transfer
    for src, dst, nbytes in transfers:
        src, dst = np.asarray(src), np.asarray(dst)
        for k, on in _path(src, dst).items():
            load[k] = load[k] + np.where(on, nbytes, 0.0)
        both = (np.minimum(src, dst) == DEVICE) & (np.maximum(src, dst) == CLOUD)
        frame = np.maximum(frame, np.where(both, np.minimum(nbytes, tab.chunk), 0.0))
    de, ec = tab.inv[DEVICE, EDGE], tab.inv[EDGE, CLOUD]
    # a link's two directions are used one after the other, not at once: every downstream transfer
    # (gradients, weights) waits for an upstream one (activations, queued behind the prefetched
    # inputs on the same connection)
    busiest = np.maximum((load["de_up"] + load["de_down"]) * de, (load["ec_up"] + load["ec_down"]) * ec)
    return busiest + frame * min(de, ec)


def overhead(tab: Tables, o: Any, busy_s: Any, s: Any, m_s: Any, busy_l: Any, l: Any, m_l: Any) -> Any:
    """Framework seconds the busy tiers (o; s and l when they have samples) add to the critical path.

    A tier's overhead was fitted where it held the whole model; a slice worker holding units 1..m
    pays the share of it its parameters are (the per-iteration work outside ORT, copies and checks
    of the weights, grows with them), plus its exchanges' message costs."""
    ov, msg, share = tab.overhead, tab.message, tab.share
    exchange = 4 * (msg[o] + msg[s]) * busy_s + 4 * (msg[o] + msg[l]) * busy_l  # weights, act, grad, wgrad
    return (ov[o] + np.where(busy_s, ov[s] * share[m_s], 0.0) + np.where(busy_l, ov[l] * share[m_l], 0.0)
            + exchange)


def evaluate(tab: Tables, o: Any, s: Any, l: Any, m_s: Any, m_l: Any, b_o: Any, b_s: Any, b_l: Any,
             *, parts: bool = False) -> Any:
    """T_total of eq. (12) for broadcastable arrays of tier indices, cuts and splits.

    Infeasible combinations (a role on a tier that cannot train given samples, samples behind a
    zero cut, m_s > m_l) cost ``inf``. With ``parts=True`` returns a dict of the terms.
    """
    o, s, l, m_s, m_l = (np.asarray(x) for x in (o, s, l, m_s, m_l))
    b_o, b_s, b_l = (np.asarray(x, dtype=np.float64) for x in (b_o, b_s, b_l))
    pf, pb, pu, inv, n = tab.pf, tab.pb, tab.pu, tab.inv, tab.n
    batch = b_o + b_s + b_l
    act_s, act_l = b_s > 0, b_l > 0

    t_in_o = b_o * tab.q_path * inv[DEVICE, o]
    t_in_s = b_s * tab.q_path * inv[DEVICE, s]
    t_in_l = b_l * tab.q_path * inv[DEVICE, l]
    t_out_s = b_s * tab.mo[m_s] * inv[s, o]          # = T_s,grad
    t_out_l = b_l * tab.mo[m_l] * inv[l, o]          # = T_l,grad

    t1f = np.maximum(np.maximum(t_in_o + b_o * pf[o, m_s], t_in_s + b_s * pf[s, m_s] + t_out_s),
                     t_in_l + b_l * pf[l, m_s])
    t1b = np.maximum(np.maximum(b_o * pb[o, m_s], b_s * pb[s, m_s] + t_out_s), b_l * pb[l, m_s])
    t2f = np.maximum((b_o + b_s) * (pf[o, m_l] - pf[o, m_s]), b_l * (pf[l, m_l] - pf[l, m_s]) + t_out_l)
    t2b = np.maximum((b_o + b_s) * (pb[o, m_l] - pb[o, m_s]), b_l * (pb[l, m_l] - pb[l, m_s]) + t_out_l)
    t3f = batch * (pf[o, n] - pf[o, m_l])
    t3b = batch * (pb[o, n] - pb[o, m_l])
    t_up = np.maximum(np.maximum(pu[o, n], np.where(act_s, pu[s, m_s], 0.0)), np.where(act_l, pu[l, m_l], 0.0))
    t_sync = np.maximum(np.where(act_s, 2 * tab.pp[m_s] * inv[s, o], 0.0),
                        np.where(act_l, 2 * tab.pp[m_l] * inv[l, o], 0.0))
    total = t1f + t1b + t2f + t2b + t3f + t3b + t_up + t_sync
    if tab.prefetch:
        x_s, x_l = b_s * tab.mo[m_s], b_l * tab.mo[m_l]
        w_s, w_l = np.where(act_s, tab.pp[m_s], 0.0), np.where(act_l, tab.pp[m_l], 0.0)
        links = link_time(tab, [
            (DEVICE, o, b_o * tab.q), (DEVICE, s, b_s * tab.q), (DEVICE, l, b_l * tab.q),
            (s, o, x_s + w_s), (o, s, x_s + w_s), (l, o, x_l + w_l), (o, l, x_l + w_l)])
        total = np.maximum(np.maximum(total + overhead(tab, o, act_s, s, m_s, act_l, l, m_l), links), tab.loop)
    bad = (~tab.can_train[o] | (act_s & ~tab.can_train[s]) | (act_l & ~tab.can_train[l])
           | (act_s & (m_s == 0)) | (act_l & (m_l == 0)) | (m_s > m_l))
    total = np.where(bad, np.inf, total)
    if parts:
        return {"T1f": t1f, "T1b": t1b, "T2f": t2f, "T2b": t2b, "T3f": t3f, "T3b": t3b,
                "T_update": t_up + t_sync, "T_total": total}
    return total


def chain_time(tab: Tables, stages: Sequence[Stage], batch: int, *, compress_bits: int = 0) -> float:
    """One iteration of a layer chain (JointDNN, JointDNN+, JALAD): all samples through every stage.

    Input from the device to the first stage; each stage computes its units on all B samples;
    activations cross each cut forward (``compress_bits``/32 of their size if compressed) and
    gradients backward at full size; every stage updates its own units, in parallel.
    """
    ratio = compress_bits / 32.0 if compress_bits else 1.0
    tiers = [TIERS.index(st.tier) for st in stages]
    if not all(tab.can_train[t] for t in tiers):
        return math.inf
    compute = sum(batch * (tab.pf[t, st.last] - tab.pf[t, st.first - 1] + tab.pb[t, st.last] - tab.pb[t, st.first - 1])
                  for t, st in zip(tiers, stages))
    cuts = sum(batch * tab.mo[a.last] * (ratio + 1.0) * tab.inv[ta, tb]
               for (ta, a), tb in zip(zip(tiers, stages), tiers[1:]))
    update = max(tab.pu[t, st.last] - tab.pu[t, st.first - 1] for t, st in zip(tiers, stages))
    total = batch * tab.q_path * tab.inv[DEVICE, tiers[0]] + compute + cuts + update
    if tab.prefetch:
        hops = list(zip(zip(tiers, stages), tiers[1:]))
        links = link_time(tab, [(DEVICE, tiers[0], batch * tab.q)]
                          + [(ta, tb, batch * tab.mo[a.last] * ratio) for (ta, a), tb in hops]
                          + [(tb, ta, batch * tab.mo[a.last]) for (ta, a), tb in hops])
        messages = sum(2 * (tab.message[a] + tab.message[b]) for a, b in zip(tiers, tiers[1:]))  # act, grad
        held = sum(tab.overhead[t] * (tab.share[st.last] - tab.share[st.first - 1]) for t, st in zip(tiers, stages))
        total = max(total + held + messages, float(links), tab.loop)
    return float(total)


def iteration_time(profile: Profile, bw: Bandwidth, schedule: Schedule, *, cost_model: str = "paper") -> float:
    """Predicted seconds per iteration of ``schedule`` (``inf`` if it cannot run)."""
    schedule.check(n_units=profile.n_units)
    tab = tables(profile, bw, cost_model)
    if schedule.chain is not None:
        return chain_time(tab, schedule.chain, schedule.batch, compress_bits=schedule.compress_bits)
    o, s, l = (TIERS.index(schedule.mapping[r]) for r in ("o", "s", "l"))
    return float(evaluate(tab, o, s, l, schedule.m_s, schedule.m_l, schedule.b_o, schedule.b_s, schedule.b_l))


def fit_overhead(profile: Profile, bw: Bandwidth, batch: int, measured: dict[str, float], *,
                 chunk_bytes: float = Calibration.chunk_bytes, margin: float = 0.05,
                 loop_s: float = 0.0) -> dict[str, float]:
    """Per-tier framework overhead from measured seconds per iteration of the ``all-<tier>`` runs.

    all-device uses no link: overhead_device = measured - critical path. For the edge and the
    cloud, overhead_t = measured - critical path when the run was not held up by a link or the
    idle device's loop ``loop_s`` (measured more than ``margin`` above both); otherwise it cannot
    be observed there and is 0 (it is hidden behind the link in that run, and would be in similar plans).
    """
    zero = tables(with_calibration(profile, {t: 0.0 for t in TIERS}, chunk_bytes=chunk_bytes), bw, "calibrated")

    def parts(tier: str) -> tuple[float, float]:  # (critical path, link-and-loop floor) with zero overheads
        t = TIERS.index(tier)
        path = float(batch * (zero.pf[t, zero.n] + zero.pb[t, zero.n]) + zero.pu[t, zero.n])
        return path, float(evaluate(zero, t, (t + 1) % 3, (t + 2) % 3, 0, 0, batch, 0, 0))

    if any(not measured.get(t) for t in TIERS):
        raise PlanError(f"fitting overheads needs a measured time for every all-<tier> run, got {measured}")
    path, _ = parts("device")
    out = {"device": max(0.0, measured["device"] - path)}
    for tier in ("edge", "cloud"):
        path, floor = parts(tier)
        floor = max(floor, loop_s)
        out[tier] = max(0.0, measured[tier] - path) if measured[tier] > (1 + margin) * floor else 0.0
    return {t: round(v, 5) for t, v in out.items()}


def with_calibration(profile: Profile, overhead_s: dict[str, float], **record: Any) -> Profile:
    """``profile`` with a calibration block (what :class:`Calibration` reads; ``record`` may hold
    ``chunk_bytes``, ``message_s``, ``loop_s`` and notes on how it was fitted)."""
    return Profile(profile.model, profile.sample_bytes, profile.layers, profile.tiers,
                   {**profile.extra, "calibration": {"overhead_s": dict(overhead_s), **record}})


def breakdown(profile: Profile, bw: Bandwidth, schedule: Schedule, *, cost_model: str = "paper") -> dict[str, float]:
    """The terms of eq. (12) for an O/S/L schedule."""
    tab = tables(profile, bw, cost_model)
    o, s, l = (TIERS.index(schedule.mapping[r]) for r in ("o", "s", "l"))
    parts = evaluate(tab, o, s, l, schedule.m_s, schedule.m_l, schedule.b_o, schedule.b_s, schedule.b_l, parts=True)
    return {k: float(v) for k, v in parts.items()}


REPLICA_SHARE = 0.1  # the device link time a state replica may take, as a share of the iterations it covers


def replica_every(profile: Profile, bw: Bandwidth, schedule: Schedule) -> int:
    """K for failover: the tiers other than the device that hold weights (worker_o, or a chain's
    stages) send the device a replica of their state (weights and up to two optimizer moments)
    every K iterations, K the smallest that keeps the replicas' transfer within
    :data:`REPLICA_SHARE` of the K iterations' predicted time; 0 when the device holds it all."""
    path_rate = {"edge": bw.device_edge, "cloud": min(bw.device_edge, bw.edge_cloud)}
    if schedule.chain is not None:
        held = {st.tier: sum(profile.layers[u - 1].param_bytes for u in range(st.first, st.last + 1))
                for st in schedule.chain if st.tier != "device"}
    else:
        held = {} if schedule.tier_of("o") == "device" else \
            {schedule.tier_of("o"): sum(layer.param_bytes for layer in profile.layers)}
    if not any(held.values()):
        return 0
    transfer_s = sum(8e-6 * 3 * b / path_rate[t] for t, b in held.items())
    per_iteration = schedule.iteration_s if math.isfinite(schedule.iteration_s) and schedule.iteration_s > 0 else \
        iteration_time(profile, bw, schedule)
    return max(1, math.ceil(transfer_s / (REPLICA_SHARE * per_iteration)))
