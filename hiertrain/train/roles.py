"""HierTrain's worker roles, written once for every tier (paper section IV-B).

- :class:`SliceRole` is worker_s or worker_l: it trains units 1..cut on its own samples, sends
  the activations at the cut to worker_o, gets their gradient back, and returns its parameter
  gradients; worker_o then sends it the updated weights.
- :class:`OwnerRole` is worker_o: it trains the whole model on its own samples, continues s's and
  l's activations from their cuts, owns the loss over all B samples and the optimizer.

The roles compute; they do not communicate. The in-process trainer (:mod:`hiertrain.train.hybrid`)
and the MQTT tier services pass their inputs and outputs around.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Union

import numpy as np

from hiertrain.errors import PlanError
from hiertrain.train.models import ModelSpec
from hiertrain.train.optim import Optimizer, OptimizerConfig
from hiertrain.train.segments import Runtime, Segment

Params = dict[str, np.ndarray]
Source = Union[None, np.ndarray, Callable[[], np.ndarray]]   # an array, or how to wait for it
Sink = Optional[Callable[[np.ndarray], None]]                # where a gradient goes as soon as it exists


def _get(source: Source) -> Optional[np.ndarray]:
    return source() if callable(source) else source


def _rows(spec: ModelSpec, cut: int, *parts: Optional[np.ndarray]) -> np.ndarray:
    """Concatenate the samples of ``parts`` at ``cut`` (an empty batch if there are none)."""
    present = [p for p in parts if p is not None and len(p)]
    if not present:
        return np.zeros((0, *spec.shape_at(cut)), np.float32)
    return present[0] if len(present) == 1 else np.concatenate(present, axis=0)


def _add(into: dict[str, np.ndarray], grads: Mapping[str, np.ndarray]) -> None:
    for k, g in grads.items():
        into[k] = into[k] + g if k in into else g


class StageRole:
    """One stage of a layer chain (JointDNN, JointDNN+, JALAD): units first..last on all B samples.

    Unlike O/S/L roles, a stage owns its units: it steps its own optimizer on their gradients and
    nobody else holds their weights.
    """

    def __init__(self, spec: ModelSpec, runtime: Runtime, first: int, last: int, params: Mapping[str, np.ndarray],
                 optimizer: Optimizer) -> None:
        self.spec, self.first, self.last = spec, first, last
        self.is_last = last == spec.n_units
        self.segment = runtime.head(spec, first) if self.is_last else runtime.segment(spec, first, last)
        self.params: Params = dict(params)
        self.optimizer = optimizer
        self._stash: Optional[list[np.ndarray]] = None

    def forward(self, x: np.ndarray) -> np.ndarray:
        y, self._stash = self.segment.forward(self.params, x)
        return y

    def backward(self, grad: np.ndarray) -> Optional[np.ndarray]:
        """Gradient at the stage's input (None for the first stage); updates the stage's units."""
        if self._stash is None:
            raise PlanError("backward before forward")
        gx, grads = self.segment.backward(self.params, self._stash, grad)
        self._stash = None
        self.params = self.optimizer.step(self.params, grads)
        return gx

    def head(self, x: np.ndarray, labels: np.ndarray) -> tuple[float, Optional[np.ndarray]]:
        """The last stage: (loss, gradient at its input); updates its units."""
        loss, _, gx, grads = self.segment.step(self.params, x, labels)
        self.params = self.optimizer.step(self.params, grads)
        return loss, gx


def weights_of(spec: ModelSpec, params: Mapping[str, np.ndarray], last: int) -> Params:
    """The parameters of units 1..last."""
    names = spec.param_shapes(1, last)
    return {k: params[k] for k in names}


class SliceRole:
    """worker_s / worker_l: units 1..cut on its own samples."""

    def __init__(self, spec: ModelSpec, runtime: Runtime, cut: int, weights: Mapping[str, np.ndarray]) -> None:
        if not 1 <= cut <= spec.n_units:
            raise PlanError(f"a slice worker needs a cut in 1..{spec.n_units}, got {cut}")
        self.spec, self.cut = spec, cut
        self.segment: Segment = runtime.segment(spec, 1, cut, input_grad=False)
        self.params: Params = {}
        self.load(weights)
        self._stash: Optional[list[np.ndarray]] = None

    def load(self, weights: Mapping[str, np.ndarray]) -> None:
        missing = set(self.segment.built.params) - set(weights)
        if missing:
            raise PlanError(f"weights for units 1..{self.cut} lack {sorted(missing)[:3]}")
        self.params = {k: weights[k] for k in self.segment.built.params}

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Activations at the cut for worker_o; keeps what the backward needs."""
        y, self._stash = self.segment.forward(self.params, x)
        return y

    def backward(self, grad: np.ndarray) -> Params:
        """Parameter gradients of units 1..cut from the gradient at the cut."""
        if self._stash is None:
            raise PlanError("backward before forward")
        _, grads = self.segment.backward(self.params, self._stash, grad)
        self._stash = None
        return grads


@dataclass
class OwnerResult:
    loss: float
    logits: np.ndarray
    grad_s: Optional[np.ndarray]  # gradient at m_s for s's samples
    grad_l: Optional[np.ndarray]  # gradient at m_l for l's samples


class OwnerRole:
    """worker_o: all N units on its samples, segments 2 and 3 on s's and l's, loss and optimizer."""

    def __init__(self, spec: ModelSpec, runtime: Runtime, m_s: int, m_l: int, params: Mapping[str, np.ndarray],
                 optimizer: Optimizer | OptimizerConfig) -> None:
        if not 0 <= m_s <= m_l <= spec.n_units:
            raise PlanError(f"cuts must satisfy 0 <= m_s <= m_l <= {spec.n_units} (m_s: {m_s}, m_l: {m_l})")
        self.spec, self.m_s, self.m_l = spec, m_s, m_l
        self.params: Params = dict(params)
        self.optimizer = optimizer if isinstance(optimizer, Optimizer) else Optimizer(
            optimizer, spec.param_shapes(), momenta=spec.momentum)
        self.seg1 = runtime.segment(spec, 1, m_s, input_grad=False) if m_s > 0 else None
        self.seg2 = runtime.segment(spec, m_s + 1, m_l, input_grad=m_s > 0) if m_l > m_s else None
        self.head = runtime.head(spec, m_l + 1)
        self.grads: Params = {}

    def forward_backward(self, x_o: np.ndarray, labels: Source, act_s: Source = None, act_l: Source = None, *,
                         send_s: Sink = None, send_l: Sink = None) -> OwnerResult:
        """Forward over all B samples (rows ordered o, s, l as ``labels``), loss, backward.

        ``labels``, ``act_s`` and ``act_l`` may be callables that wait for them: each is called
        only when needed, so o's own segment 1 runs while s's activations are on the way.
        ``send_l`` / ``send_s`` get l's and s's gradients as soon as they are computed, so l's
        backward overlaps o's remaining backward.
        """
        P, spec = self.params, self.spec
        h, stash1 = self._through(self.seg1, x_o, self.m_s)
        rows_o = len(h)
        act_s = _get(act_s)
        h, stash2 = self._through(self.seg2, _rows(spec, self.m_s, h, act_s), self.m_l)
        rows_os = len(h)
        act_l = _get(act_l)
        h = _rows(spec, self.m_l, h, act_l)
        labels = _get(labels)
        if len(h) != len(labels):
            raise PlanError(f"worker_o got {len(h)} samples but {len(labels)} labels")
        loss, logits, g, grads = self.head.step(P, h, labels)
        self.grads = dict(grads)
        grad_l = g[rows_os:] if g is not None and act_l is not None else None
        if grad_l is not None and send_l is not None:
            send_l(grad_l)
        if stash2 is not None:
            g, grads2 = self.seg2.backward(P, stash2, g[:rows_os])
            _add(self.grads, grads2)
        elif g is not None:
            g = g[:rows_os]
        grad_s = g[rows_o:] if g is not None and act_s is not None else None
        if grad_s is not None and send_s is not None:
            send_s(grad_s)
        if stash1 is not None:
            _, grads1 = self.seg1.backward(P, stash1, g[:rows_o])
            _add(self.grads, grads1)
        return OwnerResult(loss, logits, grad_s, grad_l)

    def _through(self, seg: Optional[Segment], h: np.ndarray, cut: int) -> tuple[np.ndarray, Optional[list[np.ndarray]]]:
        """Run ``h`` forward through ``seg`` (ending at ``cut``), if there is a segment and there are samples."""
        if seg is None:
            return h, None
        if not len(h):
            return _rows(self.spec, cut), None
        return seg.forward(self.params, h)

    def step(self, *remote: Mapping[str, np.ndarray]) -> None:
        """Add s's and l's parameter gradients to ours and step the optimizer (in ORT)."""
        for grads in remote:
            unknown = set(grads) - set(self.params)
            if unknown:
                raise PlanError(f"gradients for unknown parameters {sorted(unknown)[:3]}")
            _add(self.grads, grads)
        self.params = self.optimizer.step(self.params, self.grads)
        self.grads = {}

    def weights(self, last: int) -> Params:
        return weights_of(self.spec, self.params, last)
