"""What one tier holds of the model: the units the plan makes it the owner of, their weights and
their optimizer state, and how they move when a new schedule gives units to another tier.

Each unit has one owner (the plan model's :meth:`hiertrain.plan.Plan.owned`). At an iteration
boundary the owner of units that change hands sends their weights and optimizer moments to the
next owner (:meth:`Holding.hand_over`), which takes them before it computes (:meth:`Holding.acquire`);
at a run's first iteration the owner starts from the initial weights or the state it resumes from.
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np

from hiertrain import TIERS
from hiertrain.errors import PlanError
from hiertrain.schedule import Schedule
from hiertrain.train import checkpoint, models
from hiertrain.train.models import ModelSpec
from hiertrain.train.optim import Optimizer, OptimizerConfig

Tensors = dict[str, np.ndarray]
MOMENTS = ("m:", "v:")


class Holding:
    def __init__(self, spec: ModelSpec, tier: str, *, batch: int, optimizer: OptimizerConfig, seed: int) -> None:
        self.spec, self.tier, self.batch, self.optimizer_cfg, self.seed = spec, tier, batch, optimizer, seed
        self.units: frozenset[int] = frozenset()
        self.params: Tensors = {}
        self.optimizer: Optional[Optimizer] = None

    def owned(self, sched: Schedule, tier: str) -> frozenset[int]:
        """The units whose weights and optimizer state ``tier`` holds under ``sched``."""
        return sched.plan(units=self.spec.n_units, batch=self.batch).owned(tier)

    def names(self, units: frozenset[int]) -> dict[str, tuple[int, ...]]:
        return {k: v for u in sorted(units) for k, v in self.spec.param_shapes(u, u).items()}

    def whole_model(self) -> bool:
        return self.units == frozenset(range(1, self.spec.n_units + 1))

    def snapshot(self, iteration: int, sched_json: Optional[dict] = None) -> checkpoint.Checkpoint:
        opt = self.optimizer
        return checkpoint.Checkpoint(iteration, dict(self.params), dict(opt.moments) if opt else {},
                                     opt.step_count if opt else 0, sched_json)

    def clear(self) -> None:
        self.units, self.params, self.optimizer = frozenset(), {}, None

    def acquire(self, sched: Schedule, prev: Schedule, *, start: Optional[Callable[[], Optional[checkpoint.Checkpoint]]],
                take: Callable[[str], tuple[Tensors, Optional[int]]]) -> bool:
        """Hold exactly the units ``sched`` gives us; True if any moved. The missing ones come from
        ``start()`` at the run's first iteration (a checkpoint, or ``None``: the initial weights),
        otherwise from their previous owners under ``prev`` (``take(tier)``: its tensors and the
        optimizer step it names, if any)."""
        need = self.owned(sched, self.tier)
        if need == self.units:
            return False
        params = {k: v for k, v in self.params.items() if k in self.names(need)}
        moments = {k: v for k, v in (self.optimizer.moments.items() if self.optimizer else ()) if k[2:] in params}
        step = self.optimizer.step_count if self.optimizer else 0
        missing = need - self.units
        if start is not None:
            ck = start()
            source = ck.params if ck is not None else models.init_params(self.spec, self.seed)
            params.update({k: source[k] for k in self.names(missing)})
            if ck is not None:
                moments.update({k: v for k, v in ck.moments.items() if k[2:] in params})
                step = ck.optimizer_step
        else:
            for tier in TIERS:
                if tier != self.tier and self.owned(prev, tier) & missing:
                    tensors, named = take(tier)
                    step = step if named is None else named
                    params.update({k: v for k, v in tensors.items() if k[:2] not in MOMENTS})
                    moments.update({k: v for k, v in tensors.items() if k[:2] in MOMENTS})
        shapes = self.names(need)
        if set(params) != set(shapes):
            raise PlanError(f"{self.tier}: after handover the weights of units {sorted(need)} are incomplete")
        self.params, self.units = params, need
        self.optimizer = Optimizer(self.optimizer_cfg, shapes, step_count=step, moments=moments,
                                   momenta=self.spec.momentum) if shapes else None
        return True

    def hand_over(self, sched: Schedule, nxt: Schedule) -> dict[str, tuple[Tensors, int]]:
        """What we send, tier by tier, of the units we lose under ``nxt``: tensors and optimizer step."""
        mine, out = self.owned(sched, self.tier), {}
        for tier in TIERS:
            give = mine & self.owned(nxt, tier) if tier != self.tier else frozenset()
            if give:
                names, opt = self.names(give), self.optimizer
                tensors = {k: self.params[k] for k in names}
                if opt is not None:
                    tensors.update({k: v for k, v in opt.moments.items() if k[2:] in names})
                out[tier] = (tensors, opt.step_count if opt else 0)
        return out
