"""What one account computes of a sample group's chain, written once for every job kind: units
first..last forward and backward, or units first..U with the loss, on whatever rows it is given.

The three-tier owner, a layer chain's stages, a fleet's devices, edge and cloud, and the in-process
reference (:mod:`hiertrain.train.reference`) all compute through :class:`Part`. A loss is the mean
over the rows it is computed on, weighted by their share of the step's samples (``rows / B``), so
the gradients summed at the owner are exactly those of the mean loss over all B samples.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional

import numpy as np

from hiertrain.train import batchnorm
from hiertrain.train.data import normalize
from hiertrain.train.models import ModelSpec
from hiertrain.train.runtime import Runtime

Params = dict[str, np.ndarray]


def scaled(grads: Mapping[str, np.ndarray], w: float) -> Params:
    """Gradients weighted by ``w``; BatchNorm buffers' sums are not gradients and add up unweighted."""
    return {k: g if batchnorm.is_buffer(k) else g * np.float32(w) for k, g in grads.items()}


def add_into(into: Params, grads: Mapping[str, np.ndarray]) -> None:
    for k, g in grads.items():
        into[k] = into[k] + g if k in into else g


class Part:
    """What one account computes of a sample group; segments are built (or fetched) once per unit range."""

    def __init__(self, spec: ModelSpec, runtime: Runtime) -> None:
        self.spec, self.runtime = spec, runtime
        self.units = spec.n_units

    def forward(self, params: Params, first: int, last: int, x: np.ndarray) -> tuple[np.ndarray, Any]:
        """Units first..last on ``x`` (raw samples are normalised when first = 1): (output, stash)."""
        if last < first:
            return x, None
        seg = self.runtime.segment(self.spec, first, last, input_grad=first > 1)
        return seg.forward(params, normalize(x) if first == 1 else x)

    def backward(self, params: Params, first: int, last: int, stash: Any, g: np.ndarray
                 ) -> tuple[Optional[np.ndarray], Params]:
        """(gradient at the input of unit ``first``, parameter gradients) from the gradient at ``last``."""
        if last < first:
            return g, {}
        seg = self.runtime.segment(self.spec, first, last, input_grad=first > 1)
        return seg.backward(params, stash, g)

    def loss(self, params: Params, first: int, x: np.ndarray, labels: np.ndarray, weight: float
             ) -> tuple[float, Optional[np.ndarray], Params]:
        """Units first..U and the loss on ``x``, weighted: (loss, weighted gradient at the input, weighted
        parameter gradients)."""
        head = self.runtime.head(self.spec, first)
        loss, _, g, grads = head.step(params, normalize(x) if first == 1 else x, labels)
        return float(loss), (None if g is None else g * np.float32(weight)), scaled(grads, weight)

    def weights(self, params: Params, first: int, last: int) -> Params:
        names = self.spec.param_shapes(first, last) if last >= first else {}
        return {k: params[k] for k in names}


def rows(parts: Iterable[np.ndarray]) -> np.ndarray:
    parts = list(parts)
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)

