"""A fleet's iteration, written once for every tier: what the devices, the edge and the cloud compute.

A *round* is one attempt at one SGD step. Every member (an online device the plan includes) trains
its ``n`` samples, taken from its own data at ``offset``, along its path (:mod:`hiertrain.planner.fleet`):

- the device units 1..m (``m = 0``: its raw samples go up; ``m = U``: it computes its own loss);
- the edge units m+1..k (``k = U``: the edge computes the loss of the member's samples);
- the cloud units k+1..U, on the activations of every member whose ``k < U``, concatenated per cut
  ``k`` in member order (one message per cut). Labels ride with a member's rows (its samples or its
  activations) to the edge, which checks each member sent one per sample, and with the cut's rows
  on to the cloud.

Exact mode: the edge owns every parameter and the optimizer. A loss is computed where a member's
samples reach the last unit, as the mean over those rows; its gradient is weighted by rows / B
(B: the round's samples over all members), so the gradients summed at the edge are exactly those of
the mean loss over all B samples, and one step is single-process SGD over the concatenation of the
members' samples in member order (:class:`InProcessFleet` checks this without MQTT; the services in
``device/``, ``edge/`` and ``cloud/`` pass the same inputs and outputs over MQTT).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional

import numpy as np

from hiertrain.train import batchnorm
from hiertrain.train.data import normalize
from hiertrain.errors import PlanError, ProtocolError
from hiertrain.train.models import ModelSpec
from hiertrain.train.roles import Params, weights_of
from hiertrain.train.segments import Runtime


@dataclass(frozen=True)
class Member:
    name: str
    n: int        # its samples in this round
    offset: int   # where they start in its data (samples it trained in earlier steps)
    m: int        # it trains units 1..m
    k: int        # the edge m+1..k, the cloud k+1..U


@dataclass(frozen=True)
class Round:
    round: int    # the message clock: one per attempt (a redone step gets a new round)
    step: int     # the SGD step it makes
    version: int  # the fleet plan it runs
    units: int
    members: tuple[Member, ...]

    def __post_init__(self) -> None:
        names = [mb.name for mb in self.members]
        if not self.members or len(set(names)) != len(names):
            raise PlanError(f"a round needs members with distinct names, got {names}")
        for mb in self.members:
            if not (mb.n >= 1 and mb.offset >= 0 and 0 <= mb.m <= mb.k <= self.units):
                raise PlanError(f"member {mb.name}: n = {mb.n}, offset = {mb.offset}, path ({mb.m}, {mb.k}) "
                                f"does not fit {self.units} units")

    @property
    def batch(self) -> int:
        return sum(mb.n for mb in self.members)

    def member(self, name: str) -> Member:
        for mb in self.members:
            if mb.name == name:
                return mb
        raise PlanError(f"{name} is not a member of round {self.round}")

    def weight(self, rows: int) -> float:
        """How much a mean loss over ``rows`` of this round's samples counts in the mean over all B."""
        return rows / self.batch

    def loss_at(self, mb: Member) -> str:
        """Where a member's loss is computed: ``device``, ``edge`` or ``cloud``."""
        return "device" if mb.m == self.units else "edge" if mb.k == self.units else "cloud"

    def cloud_groups(self) -> list[tuple[int, tuple[Member, ...]]]:
        """The cloud's work: per cut k < U (ascending), the members whose activations it continues."""
        cuts = sorted({mb.k for mb in self.members if mb.k < self.units})
        return [(k, tuple(mb for mb in self.members if mb.k == k)) for k in cuts]

    @property
    def kappa(self) -> int:
        """The cloud trains units kappa+1..U (kappa = U: the cloud is idle)."""
        return min(mb.k for mb in self.members)

    def to_meta(self) -> dict[str, Any]:
        cols = ("name", "n", "offset", "m", "k")
        return {"round": self.round, "step": self.step, "version": self.version, "units": self.units,
                **{f"members_{c}": [getattr(mb, c) for mb in self.members] for c in cols}}

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> "Round":
        try:
            cols = [list(meta[f"members_{c}"]) for c in ("name", "n", "offset", "m", "k")]
            if len({len(c) for c in cols}) != 1:
                raise ValueError("member columns of different lengths")
            members = tuple(Member(str(a), int(b), int(c), int(d), int(e)) for a, b, c, d, e in zip(*cols))
            return cls(int(meta["round"]), int(meta["step"]), int(meta["version"]), int(meta["units"]), members)
        except PlanError as exc:
            raise ProtocolError(f"not a fleet round: {exc}") from None
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"not a fleet round: {type(exc).__name__}: {exc}") from None


def scaled(grads: Mapping[str, np.ndarray], w: float) -> Params:
    """Gradients weighted by ``w``; BatchNorm buffers' sums are not gradients and add up unweighted."""
    return {k: g if batchnorm.is_buffer(k) else g * np.float32(w) for k, g in grads.items()}


def add_into(into: Params, grads: Mapping[str, np.ndarray]) -> None:
    for k, g in grads.items():
        into[k] = into[k] + g if k in into else g


class Part:
    """What one tier computes in a round; segments are built (or fetched) once per unit range."""

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


class InProcessFleet:
    """A round run in one process by the same :class:`Part` calls the services make: the reference
    the MQTT fleet is held to, and the check that a round equals single-process SGD."""

    def __init__(self, spec: ModelSpec, runtime: Runtime, params: Params, optimizer: Any) -> None:
        self.part = Part(spec, runtime)
        self.params, self.optimizer, self.units = dict(params), optimizer, spec.n_units

    def step(self, rnd: Round, batches: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> float:
        P, part, U = self.params, self.part, self.units
        grads: Params = {}
        loss = 0.0
        at_cut: dict[str, tuple[np.ndarray, Any, Any]] = {}  # member -> (activation at k, device stash, edge stash)
        for mb in rnd.members:
            x, y = batches[mb.name]
            w = rnd.weight(mb.n)
            if mb.m == U:                                    # the device alone
                l, _, g = part.loss(weights_of(part.spec, P, U), 1, x, y, w)
                loss += w * l
                add_into(grads, g)
                continue
            h, st_d = part.forward(P, 1, mb.m, x)
            if mb.k == U:                                    # the edge's loss
                l, gm, g = part.loss(P, mb.m + 1, h, y, w)
                loss += w * l
                add_into(grads, g)
                self._down(mb, gm, st_d, None, grads)
            else:
                h2, st_e = part.forward(P, mb.m + 1, mb.k, h)
                at_cut[mb.name] = (h2, st_d, st_e)
        for k, group in rnd.cloud_groups():                  # the cloud, per cut
            x = rows(at_cut[mb.name][0] for mb in group)
            y = rows(batches[mb.name][1] for mb in group)
            w = rnd.weight(len(y))
            l, gk, g = part.loss(P, k + 1, x, y, w)
            loss += w * l
            add_into(grads, g)
            start = 0
            for mb in group:
                _, st_d, st_e = at_cut[mb.name]
                self._down(mb, None if gk is None else gk[start:start + mb.n], st_d, st_e, grads)
                start += mb.n
        self.params = self.optimizer.step(P, grads)
        return loss

    def _down(self, mb: Member, g_in: Optional[np.ndarray], st_d: Any, st_e: Any, grads: Params) -> None:
        """The backward of a member's edge part (k..m+1, if ``st_e``: else ``g_in`` is already the
        gradient at m), then its device part (m..1)."""
        if g_in is None:
            return
        gm = g_in
        if st_e is not None:
            gm, g = self.part.backward(self.params, mb.m + 1, mb.k, st_e, g_in)
            add_into(grads, g)
        if mb.m:
            _, g = self.part.backward(self.params, 1, mb.m, st_d, gm)
            add_into(grads, g)
