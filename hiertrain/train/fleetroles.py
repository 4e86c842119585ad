"""A fleet's round: one attempt at one SGD step, who trains which samples along which path.

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
members' samples in member order (periodic sync, ``every`` = K > 0: each device steps its own copy of
units 1..m, averaged every K steps, :mod:`hiertrain.train.periodic`). A round is a plan of the plan model (:meth:`Round.plan`): the
in-process reference (:mod:`hiertrain.train.reference`) runs it without MQTT, the services in
``device/``, ``edge/`` and ``cloud/`` compute its parts (:mod:`hiertrain.train.part`) over MQTT.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from hiertrain import plan as P
from hiertrain.errors import PlanError, ProtocolError


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
    every: int = 0        # periodic sync every K steps (hiertrain.train.periodic); 0: exact mode
    upload: bool = False  # periodic: the round ends a window, every member uploads its copy after its step

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

    def plan(self, *, edge: str = "edge", cloud: str = "cloud") -> P.Plan:
        """The round as the plan model has it: a group per member, owned by the edge."""
        return P.for_fleet(((mb.name, mb.n, mb.m, mb.k) for mb in self.members), units=self.units, edge=edge,
                           cloud=cloud, keep=self.every > 0)

    def to_meta(self) -> dict[str, Any]:
        cols = ("name", "n", "offset", "m", "k")
        return {"round": self.round, "step": self.step, "version": self.version, "units": self.units,
                **{f"members_{c}": [getattr(mb, c) for mb in self.members] for c in cols},
                **({"sync_every": self.every, "sync_upload": self.upload} if self.every else {})}

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> "Round":
        try:
            cols = [list(meta[f"members_{c}"]) for c in ("name", "n", "offset", "m", "k")]
            if len({len(c) for c in cols}) != 1:
                raise ValueError("member columns of different lengths")
            members = tuple(Member(str(a), int(b), int(c), int(d), int(e)) for a, b, c, d, e in zip(*cols))
            every, upload = int(meta.get("sync_every", 0)), meta.get("sync_upload", False)
            if every < 0 or not isinstance(upload, bool):
                raise ValueError(f"sync every {every}, upload {upload!r}")
            return cls(int(meta["round"]), int(meta["step"]), int(meta["version"]), int(meta["units"]), members,
                       every, upload)
        except PlanError as exc:
            raise ProtocolError(f"not a fleet round: {exc}") from None
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"not a fleet round: {type(exc).__name__}: {exc}") from None
