"""Any plan's step in one process: the reference every runtime is held to.

:class:`InProcessPlan` runs one step of a :class:`~hiertrain.plan.Plan` (HierTrain's O/S/L groups,
a layer chain, a fleet's members) by the same :class:`~hiertrain.train.part.Part` calls the tier
services make over MQTT; :class:`SingleProcess` trains the whole model on the whole batch. Over the
same batches both give the same losses and weights (the transparency test), except where BatchNorm
in training mode sees other rows together.

**Which rows run together** (what BatchNorm's batch statistics see), written once here for every
job kind: a group's rows run on their own, except that groups entering an account at the same unit,
from the same sender, with the rest of their chain in common run as one batch from there, in plan
order (a fleet's members cut at the same unit reach the cloud from the edge in one message). Each loss is the mean over
its rows weighted by ``rows / B``, so the gradients add up to those of the mean loss over the
step's ``B`` samples, and the step is one optimizer step on them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Optional

import numpy as np

from hiertrain.plan import Group, Plan
from hiertrain.train import periodic
from hiertrain.train.fleetroles import Round
from hiertrain.train.models import ModelSpec, init_params
from hiertrain.train.optim import Optimizer, OptimizerConfig
from hiertrain.train.part import Params, Part, add_into, rows
from hiertrain.train.runtime import Predictor, Runtime


def split(plan: Plan, x: np.ndarray, y: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """A step's samples (in group order, as the data source sends them) per group."""
    if len(x) != plan.batch or len(y) != plan.batch:
        raise ValueError(f"{len(x)} samples and {len(y)} labels for a plan of B = {plan.batch}")
    ends = np.cumsum([g.samples for g in plan.groups])
    return {g.name: (x[e - g.samples:e], y[e - g.samples:e]) for g, e in zip(plan.groups, ends)}


def chain(plan: Plan, g: Group) -> tuple[tuple[str, int, int], ...]:
    """Group ``g``'s stages as (account, first, last), with the loss account's when it computes the loss
    on another's output (units U+1..U: the loss alone)."""
    stages = tuple((st.tier, st.first, st.last) for st in g.stages)
    return stages + (((g.loss, plan.units + 1, plan.units),) if g.loss != g.stages[-1].tier else ())


@dataclass
class _Rows:
    """Rows on their way along a chain (one group's, or several groups' that run as one batch from an
    entry on): their activations at the next stage's input, and the computation that made them."""

    groups: tuple[int, ...]                    # the groups' indices in the plan, ascending
    rows: int
    sender: str                                # who computed them (for the first stage: the data's source)
    stages: tuple[tuple[str, int, int], ...]  # what is left of the chain
    h: np.ndarray
    y: np.ndarray
    made_by: Optional["_Run"] = None


@dataclass
class _Run:
    """One computation: a stage on some rows (the loss, on the last)."""

    inputs: list[_Rows]
    stage: tuple[str, int, int]
    stash: Any = None
    grads: Optional[Params] = None      # its parameter gradients
    g_in: Optional[np.ndarray] = None   # the loss's gradient at the input
    g_out: Optional[np.ndarray] = None  # the gradient at the output, once the consumer has it


class InProcessPlan:
    def __init__(self, spec: ModelSpec, *, optimizer: OptimizerConfig | Optimizer = OptimizerConfig(),
                 runtime: Optional[Runtime] = None, params: Optional[Mapping[str, np.ndarray]] = None,
                 seed: int = 0) -> None:
        self.spec = spec
        self.part = Part(spec, runtime or Runtime())
        self.params: Params = dict(params) if params is not None else init_params(spec, seed)
        self.optimizer = optimizer if isinstance(optimizer, Optimizer) else Optimizer(
            optimizer, spec.param_shapes(), momenta=spec.momentum)

    def step(self, plan: Plan, x: np.ndarray, y: np.ndarray) -> float:
        """One step of ``plan`` on its samples ``x`` (as stored) and labels ``y``, in group order: the
        sum of the weighted losses."""
        loss, grads = self.gradients(plan, x, y, lambda account: self.params)
        self.params = self.optimizer.step(self.params, grads.get("", {}))
        return loss

    def gradients(self, plan: Plan, x: np.ndarray, y: np.ndarray, params_of: Callable[[str], Params]
                  ) -> tuple[float, dict[str, Params]]:
        """The sum of the weighted losses of one step of ``plan``, each account computing with
        ``params_of(account)``, and the parameter gradients: those of an account that keeps its own copy
        (:attr:`~hiertrain.plan.Plan.keeps`) under its name, the owners' under ``""``."""
        if plan.units != self.spec.n_units:
            raise ValueError(f"a plan of {plan.units} units for a model of {self.spec.n_units}")
        part, B = self.part, plan.batch
        batches = split(plan, x, y)
        active = [_Rows((j,), g.samples, g.source, chain(plan, g), *batches[g.name]) for j, g in enumerate(plan.groups)]
        runs: list[_Run] = []
        loss = 0.0
        while active:  # forward: the earliest entry first, so every group reaching an entry is there
            first = min(r.stages[0][1] for r in active)
            entering: dict[tuple[Any, ...], list[_Rows]] = {}
            for r in [r for r in active if r.stages[0][1] == first]:
                account = r.stages[0][0]
                entering.setdefault((account, plan.arrives_from(r.sender, account), r.stages), []).append(r)
            active = [r for r in active if r.stages[0][1] != first]
            for (account, _, stages), inputs in entering.items():
                inputs.sort(key=lambda r: r.groups)  # plan order, however they got here
                run = _Run(inputs, stages[0])
                runs.append(run)
                h, labels = rows(r.h for r in inputs), rows(r.y for r in inputs)
                _, a, b = stages[0]
                if len(stages) == 1:  # the loss
                    w = len(labels) / B
                    part_loss, run.g_in, run.grads = part.loss(params_of(account), a, h, labels, w)
                    loss += w * part_loss
                else:
                    out, run.stash = part.forward(params_of(account), a, b, h)
                    active.append(_Rows(sum((r.groups for r in inputs), ()), len(labels), account, stages[1:], out,
                                        labels, run))
        for run in reversed(runs):  # backward: a run's consumer ran after it
            g_in = run.g_in
            if run.g_out is not None:
                g_in, run.grads = part.backward(params_of(run.stage[0]), run.stage[1], run.stage[2], run.stash, run.g_out)
            start = 0
            for r in run.inputs:
                if r.made_by is not None and g_in is not None:
                    r.made_by.g_out = g_in[start:start + r.rows]
                start += r.rows
        grads: dict[str, Params] = {}
        for run in sorted(runs, key=lambda r: r.stash is not None):  # as the three-tier owner sums them: the
            holder = run.stage[0] if run.stage[0] in plan.keeps else ""  # losses' first, then the others', in
            add_into(grads.setdefault(holder, {}), run.grads or {})  # forward order
        return loss, grads


class Periodic:
    """A fleet in periodic sync in one process (:mod:`hiertrain.train.periodic`): the edge's copy and
    optimizer, each device's own copy, the window; the reference the runtime's periodic mode is held to."""

    def __init__(self, spec: ModelSpec, *, optimizer: OptimizerConfig = OptimizerConfig(),
                 runtime: Optional[Runtime] = None, params: Optional[Mapping[str, np.ndarray]] = None,
                 seed: int = 0) -> None:
        self.shared = InProcessPlan(spec, optimizer=optimizer, runtime=runtime, params=params, seed=seed)
        self.spec, self.config = spec, optimizer
        self.copies: dict[str, periodic.Replica] = {}
        self.window = periodic.Window()

    @property
    def params(self) -> Params:
        return self.shared.params

    def step(self, rnd: Round, x: np.ndarray, y: np.ndarray, fresh: Iterable[str]) -> float:
        """Round ``rnd`` (periodic, completed) on its members' samples (as stored, in member order);
        ``fresh``: the members that got the edge's copy with it."""
        shared, spec, B = self.shared, self.spec, rnd.batch
        opt = shared.optimizer
        for mb in rnd.members:
            if mb.name in fresh and mb.m:
                state = periodic.state_of(shared.params, opt, spec.param_shapes(1, mb.m))
                self.copies[mb.name] = periodic.Replica(spec, self.config, state, opt.step_count)
        plan = rnd.plan()
        loss, grads = shared.gradients(plan, x, y, lambda a: self.copies[a].params if a in plan.keeps else shared.params)
        for mb in rnd.members:
            if mb.m:
                self.copies[mb.name].step(rnd.step, grads.get(mb.name, {}), B / mb.n)
        mine, frozen = periodic.local_grads(spec, grads.get("", {}), periodic.rows_per_unit(rnd.members, rnd.units)
                                            [periodic.SHARED], B)
        shared.params = opt.step(shared.params, mine, frozen)
        self.window.add(rnd.members, rnd.units, fresh)
        if rnd.upload:
            average = self.window.average(spec, periodic.state_of(shared.params, opt, shared.params),
                                          {mb.name: self.copies[mb.name].state() for mb in rnd.members if mb.m})
            shared.params = periodic.adopt(opt, average)
        return loss


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
