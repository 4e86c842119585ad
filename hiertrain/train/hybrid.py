"""One HierTrain iteration in process: the three roles, no MQTT (paper section IV-B).

:class:`InProcessHybrid` is the reference the MQTT runtime is held to; :class:`SingleProcess` is
plain single-process training of the whole model on the whole batch. Over the same batches both
must give the same losses and weights (the transparency test).
"""

from __future__ import annotations

from typing import Mapping, Optional

import numpy as np

from hiertrain.train.models import ModelSpec, init_params
from hiertrain.train.optim import Optimizer, OptimizerConfig
from hiertrain.train.roles import OwnerRole, Params, SliceRole
from hiertrain.schedule import Schedule
from hiertrain.train.segments import Predictor, Runtime


def split_batch(schedule: Schedule, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The device's dispatch: the first b_o samples to o, the next b_s to s, the last b_l to l."""
    if len(x) != schedule.batch:
        raise ValueError(f"batch of {len(x)} samples for a schedule of B = {schedule.batch}")
    a, b = schedule.b_o, schedule.b_o + schedule.b_s
    return x[:a], x[a:b], x[b:]


class InProcessHybrid:
    def __init__(self, spec: ModelSpec, schedule: Schedule, *, optimizer: OptimizerConfig = OptimizerConfig(),
                 runtime: Optional[Runtime] = None, params: Optional[Mapping[str, np.ndarray]] = None,
                 seed: int = 0) -> None:
        if schedule.chain is not None:
            raise ValueError("chain schedules are not O/S/L schedules")
        self.spec = spec
        self.runtime = runtime or Runtime()
        self.schedule = schedule.check(n_units=spec.n_units)
        params = dict(params) if params is not None else init_params(spec, seed)
        self.owner = OwnerRole(spec, self.runtime, schedule.m_s, schedule.m_l, params,
                               Optimizer(optimizer, spec.param_shapes(), momenta=spec.momentum))
        self.s = SliceRole(spec, self.runtime, schedule.m_s, self.owner.weights(schedule.m_s)) if schedule.b_s else None
        self.l = SliceRole(spec, self.runtime, schedule.m_l, self.owner.weights(schedule.m_l)) if schedule.b_l else None

    def step(self, x: np.ndarray, labels: np.ndarray) -> float:
        x_o, x_s, x_l = split_batch(self.schedule, x)
        act_s = self.s.forward(x_s) if self.s else None                      # forward phase
        act_l = self.l.forward(x_l) if self.l else None
        res = self.owner.forward_backward(x_o, labels, act_s, act_l)          # o: loss, backward
        remote = []
        if self.s:
            remote.append(self.s.backward(res.grad_s))                       # backward phase
        if self.l:
            remote.append(self.l.backward(res.grad_l))
        self.owner.step(*remote)                                             # weight update
        if self.s:
            self.s.load(self.owner.weights(self.schedule.m_s))
        if self.l:
            self.l.load(self.owner.weights(self.schedule.m_l))
        return res.loss

    @property
    def params(self) -> Params:
        return self.owner.params


class SingleProcess:
    """The whole model on the whole batch: one fused ORT graph and the same optimizer."""

    def __init__(self, spec: ModelSpec, *, optimizer: OptimizerConfig = OptimizerConfig(),
                 runtime: Optional[Runtime] = None, params: Optional[Mapping[str, np.ndarray]] = None,
                 seed: int = 0) -> None:
        self.spec = spec
        self.head = (runtime or Runtime()).head(spec, 1)
        self._predict: Optional[Predictor] = None
        self.params: Params = dict(params) if params is not None else init_params(spec, seed)
        self.optimizer = Optimizer(optimizer, spec.param_shapes(), momenta=spec.momentum)

    def step(self, x: np.ndarray, labels: np.ndarray) -> float:
        loss, _, _, grads = self.head.step(self.params, x, labels)
        self.params = self.optimizer.step(self.params, grads)
        return loss

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Logits in evaluation mode (BatchNorm by its running statistics)."""
        if self._predict is None:
            self._predict = Predictor(self.spec)
        return self._predict(self.params, x)
