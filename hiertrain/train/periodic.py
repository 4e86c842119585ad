"""Periodic sync (SplitFed-style): fleet devices keep their own prefix, averaged every K steps.

In exact mode the edge owns every parameter: a device trains a replica of its units 1..m whose
weights travel down before every step and whose gradients travel up after it. In periodic mode
(``[fleet] sync = {every = K}``) a device *keeps* its copy (:attr:`hiertrain.plan.Plan.keeps`) and
steps it with an optimizer of its own; every K steps the copies of each unit are averaged, weighted
by the rows each trained on it since the last average, and the average goes down with the next
round. The edge's part stays shared: its units step every step, and the cloud's replica is exact.

The algorithm, written once here for the coordinator (``edge/coordinator.py``), the device
(``device/worker.py``) and the in-process reference (:class:`hiertrain.train.reference.Periodic`):

- **Holders.** A copy of unit u is trained by each member with m >= u, on its own rows, and by the
  edge, on the rows of every other member (:func:`rows_per_unit`).
- **Local steps.** Every holder steps its copy on the gradient of the mean loss over its own rows:
  the summed gradients (each loss weighted rows / B, as in exact mode) times B / its rows
  (:func:`local_grads`). A unit of the edge's copy that no rows reached stays as it was.
- **Averages.** At a window's end (:meth:`Window.due`) every member uploads its copy (weights and
  optimizer moments); each unit's copies, the edge's among them, are averaged weighted by the rows
  each trained on it in the window (:meth:`Window.average`). With SGD and K = 1 that is exact mode's
  step: ``sum_h (s_h / B) (w - lr B / s_h g_h) = w - lr sum_h g_h``.
- **Fresh copies.** A device gets the edge's copy (the average, at a window's start) at the first round
  of a window, when it joins and when its m changes. What it trained since its last fresh copy is lost
  if it leaves before the window ends: it is dropped from the average, as FedAvg drops a straggler.
- **Redone steps.** A device's local step stays pending until a round of a later step says it was
  made; a redone step rolls it back (:class:`Replica`), so every step is still made once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np

from hiertrain.errors import ProtocolError
from hiertrain.train import batchnorm
from hiertrain.train.models import ModelSpec
from hiertrain.train.optim import KINDS, Optimizer, OptimizerConfig
from hiertrain.train.part import Params, scaled

SHARED = "edge"  # the holder of the shared copy in :func:`rows_per_unit` (no device may be named so)
MOMENTS = ("m:", "v:")


@dataclass(frozen=True)
class Sync:
    """``[fleet] sync``: exact mode (``every = 0``), every K steps, or the planner's K up to a bound."""

    every: int = 0   # K, fixed
    up_to: int = 0   # the planner picks K in 1..up_to (0: ``every`` is fixed)

    @property
    def periodic(self) -> bool:
        return self.every > 0 or self.up_to > 0


def is_moment(name: str) -> bool:
    return name[:2] in MOMENTS


def rows_per_unit(members: Iterable[Any], units: int) -> dict[str, np.ndarray]:
    """The rows each holder trains on each unit in a round (index u = 1..U; 0 unused): a member
    ``(name, n, m, ...)`` its n on units 1..m, the edge (:data:`SHARED`) every other member's."""
    out: dict[str, np.ndarray] = {}
    edge = np.zeros(units + 1, np.int64)
    for mb in members:
        if mb.m:
            mine = np.zeros(units + 1, np.int64)
            mine[1:mb.m + 1] = mb.n
            out[mb.name] = mine
        edge[mb.m + 1:] += mb.n
    out[SHARED] = edge
    return out


def _unit_names(spec: ModelSpec) -> list[tuple[int, list[str]]]:
    return [(u, list(spec.param_shapes(u, u))) for u in range(1, spec.n_units + 1)]


def local_grads(spec: ModelSpec, grads: Mapping[str, np.ndarray], rows: np.ndarray, batch: int
                ) -> tuple[Params, frozenset[str]]:
    """A holder's summed gradients (losses weighted rows / B) as the gradient of the mean loss over
    its own rows on each unit (times B / rows), and the parameters of units it trained no rows of
    (to stay as they are)."""
    out: Params = {}
    frozen: set[str] = set()
    for u, names in _unit_names(spec):
        if rows[u] == 0:
            frozen.update(names)
            continue
        out.update(scaled({n: grads[n] for n in names if n in grads}, batch / float(rows[u])))
    return out, frozenset(frozen)


def opt_meta(config: OptimizerConfig, steps: int) -> list[Any]:
    """The optimizer a fresh copy continues with, as a round's meta carries it."""
    return [config.kind, config.lr, config.beta1, config.beta2, config.eps, config.weight_decay, steps]


def opt_from(meta: Any) -> tuple[OptimizerConfig, int]:
    try:
        kind, lr, b1, b2, eps, wd, steps = meta
        if kind not in KINDS or isinstance(steps, bool) or int(steps) != steps or steps < 0:
            raise ValueError
        return OptimizerConfig(kind, float(lr), float(b1), float(b2), float(eps), float(wd)), int(steps)
    except Exception:
        raise ProtocolError(f"not an optimizer for a fresh copy: {meta!r}") from None


def state_of(params: Mapping[str, np.ndarray], optimizer: Optimizer, names: Iterable[str]) -> Params:
    """Weights and optimizer moments of the parameters ``names``: a copy as it travels."""
    out: Params = {}
    for n in names:
        out[n] = params[n]
        out.update({f"{p}{n}": optimizer.moments[f"{p}{n}"] for p in MOMENTS if f"{p}{n}" in optimizer.moments})
    return out


class Replica:
    """A device's own copy of units 1..m and its optimizer between averages. A step stays pending
    until a round of a later step begins (:meth:`begin`); a round of the same step (redone) rolls it back."""

    def __init__(self, spec: ModelSpec, config: OptimizerConfig, state: Mapping[str, np.ndarray], steps: int) -> None:
        self.params: Params = {k: v for k, v in state.items() if not is_moment(k)}
        moments = {k: v for k, v in state.items() if is_moment(k)}
        self.optimizer = Optimizer(config, {k: v.shape for k, v in self.params.items()}, steps, moments,
                                   spec.momentum)
        self._pending: Optional[tuple[int, Params, dict[str, np.ndarray], int]] = None

    def begin(self, step: int) -> None:
        if self._pending is not None and self._pending[0] >= step:
            _, self.params, self.optimizer.moments, self.optimizer.step_count = self._pending
        self._pending = None

    def step(self, step: int, grads: Mapping[str, np.ndarray], scale: float) -> None:
        opt = self.optimizer
        self._pending = (step, self.params, dict(opt.moments), opt.step_count)
        self.params = opt.step(self.params, scaled(grads, scale))

    def state(self) -> Params:
        return state_of(self.params, self.optimizer, self.params)


@dataclass
class Window:
    """The steps since the last average: the rows each holder trained on each unit of its current copy."""

    steps: int = 0
    rows: dict[str, np.ndarray] = field(default_factory=dict)

    def due(self, every: int, step: int, iterations: int) -> bool:
        """Whether the round of ``step`` ends the window (the run's last step ends one too)."""
        return self.steps + 1 >= every or step + 1 >= iterations

    def add(self, members: Sequence[Any], units: int, fresh: Iterable[str]) -> None:
        """A completed round: members with a fresh copy start counting anew."""
        for name in fresh:
            self.rows.pop(name, None)
        for who, r in rows_per_unit(members, units).items():
            self.rows[who] = self.rows.get(who, 0) + r
        self.steps += 1

    def average(self, spec: ModelSpec, shared: Mapping[str, np.ndarray], uploads: Mapping[str, Mapping[str, np.ndarray]]
                ) -> Params:
        """Each unit's copies (the edge's ``shared`` state and the members' ``uploads``), weighted by
        the rows each trained on it in the window; the window starts anew."""
        copies = [(shared, self.rows.get(SHARED))] + [(uploads[n], self.rows.get(n)) for n in sorted(uploads)]
        out: Params = dict(shared)
        for u, names in _unit_names(spec):
            held = [(state, float(rows[u])) for state, rows in copies if rows is not None and rows[u] > 0]
            total = sum(w for _, w in held)
            if not total:
                continue
            for name in (f"{p}{n}" for n in names for p in ("", *MOMENTS)):
                if name in shared:
                    have = [(state[name], w) for state, w in held if name in state]
                    acc = sum(np.asarray(t, np.float64) * w for t, w in have)
                    out[name] = (acc / sum(w for _, w in have)).astype(shared[name].dtype)
        self.steps, self.rows = 0, {}
        return out


def adopt(optimizer: Optimizer, state: Mapping[str, np.ndarray]) -> Params:
    """A whole model's state (an average, :meth:`Window.average`) taken in by its holder: its
    optimizer moments set, its weights returned."""
    optimizer.moments.update({k: v for k, v in state.items() if is_moment(k)})
    return {k: v for k, v in state.items() if not is_moment(k)}


def check_copy(spec: ModelSpec, who: str, m: int, state: Mapping[str, np.ndarray], kind: str) -> None:
    """A copy that travels (the edge's down, a member's up) is whole: every parameter of units 1..m
    and, under AdamW, its moments."""
    names = set(spec.param_shapes(1, m))
    want = names | ({f"{p}{n}" for n in names if not batchnorm.is_buffer(n) for p in MOMENTS} if kind == "adamw" else set())
    if set(state) != want:
        missing, extra = sorted(want - set(state))[:3], sorted(set(state) - want)[:3]
        raise ProtocolError(f"{who} sent a copy of units 1..{m} without {missing} or with {extra}", sender=who)
