"""The three-tier job's workers that hold a segment between its forward and its backward (paper
section IV-B), written once for every tier.

- :class:`SliceRole` is worker_s or worker_l: it trains units 1..cut on its own samples, sends
  the activations at the cut to worker_o, gets their gradient back, and returns its parameter
  gradients; worker_o then sends it the updated weights.
- :class:`StageRole` is one stage of a layer chain, which owns its units.

worker_o computes each sample group's part through :class:`hiertrain.train.part.Part`. The roles
compute; they do not communicate: the tier services pass their inputs and outputs around.
"""

from __future__ import annotations

from typing import Mapping, Optional

import numpy as np

from hiertrain.errors import PlanError
from hiertrain.train.models import ModelSpec
from hiertrain.train.optim import Optimizer
from hiertrain.train.segments import Runtime, Segment

Params = dict[str, np.ndarray]


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
