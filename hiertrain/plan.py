"""The plan model: what one step of any job trains where, as data (issue 23).

A plan is a set of **sample groups**. Each group is some samples of one data source (the device of
a three-tier job, or an enrolled device of a fleet) trained along a **chain of stages**
``(account, first unit, last unit)`` that covers units 1..U in order; the activations at each stage's
end go to the next stage, their gradients come back, and the group's loss is computed by its
``loss`` account (the last stage's, unless a worker_o computes it on another tier's logits). Every
unit has one **owner**, which holds its weights and optimizer state: a stage that trains units it
does not own gets their weights from the owner before the step and sends their gradients back,
unless its account *keeps* its own copy (a fleet's device in periodic sync, :mod:`hiertrain.train.periodic`):
then it steps that copy itself and the owner averages the copies every K steps.

- HierTrain's O/S/L schedule with o = cloud is three groups owned by the cloud:
  ``[(cloud,1,U)]``, ``[(s,1,m_s),(cloud,m_s+1,U)]``, ``[(l,1,m_l),(cloud,m_l+1,U)]``;
- a layer chain (JointDNN, JointDNN+, JALAD) is one group whose stages own their units;
- a fleet is one group per member device, ``[(pi,1,m),(edge,m+1,k),(cloud,k+1,U)]`` (empty stages
  dropped), owned by the edge.

The clock's **driver** is the device for a lone device with its data, the edge for a fleet. Plans are
built by pure functions (:func:`from_schedule`, :func:`for_fleet`), compared by :func:`handover`, and
travel on the schedule topic as :meth:`Plan.to_json` (validated by :meth:`Plan.from_json`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Optional, Sequence

from hiertrain.errors import PlanError, TopicError
from hiertrain.net.topics import validate_party

if TYPE_CHECKING:
    from hiertrain.schedule import Schedule

KIND = "groups"  # the schedule JSON's ``plan.kind`` for this model


@dataclass(frozen=True)
class Stage:
    """Units ``first..last`` (1-based, inclusive) trained by ``tier`` (an account: a tier or a device)."""

    tier: str
    first: int
    last: int

    @property
    def units(self) -> range:
        return range(self.first, self.last + 1)


@dataclass(frozen=True)
class Group:
    """``samples`` samples of ``source``'s data, trained along ``stages``; ``loss`` computes their loss."""

    name: str
    source: str
    samples: int
    stages: tuple[Stage, ...]
    loss: str = ""  # default: the last stage's account

    def __post_init__(self) -> None:
        if not self.loss and self.stages:
            object.__setattr__(self, "loss", self.stages[-1].tier)

    @property
    def accounts(self) -> tuple[str, ...]:
        """Who computes on these samples, in chain order (the loss's account last, if it is another)."""
        out = tuple(st.tier for st in self.stages)
        return out + (self.loss,) if self.loss != out[-1] else out

    def stage_of(self, account: str) -> Optional[Stage]:
        return next((st for st in self.stages if st.tier == account), None)


@dataclass(frozen=True)
class Plan:
    units: int
    groups: tuple[Group, ...]
    owners: tuple[str, ...]       # owners[u - 1]: the account holding unit u's weights and optimizer state
    driver: str = "device"        # who runs the clock: the device with its data, or the edge of a fleet
    compress_bits: int = 0        # cut activations quantised to 8 bits (JALAD), else 0
    keeps: frozenset[str] = frozenset()  # accounts that keep and step their own copy of the units they train

    def __post_init__(self) -> None:
        if isinstance(self.units, bool) or not isinstance(self.units, int) or self.units < 1:
            raise PlanError(f"a plan needs units >= 1, got {self.units!r}")
        if len(self.owners) != self.units:
            raise PlanError(f"a plan of {self.units} units needs an owner for each, got {len(self.owners)}")
        names = [g.name for g in self.groups]
        if len(set(names)) != len(names):
            raise PlanError(f"sample groups need distinct names, got {names}")
        if self.compress_bits not in (0, 8):
            raise PlanError(f"compress_bits must be 0 or 8, got {self.compress_bits!r}")
        for who in (self.driver, *self.owners, *(a for g in self.groups for a in (g.source, *g.accounts))):
            _account(who)
        for g in self.groups:
            if isinstance(g.samples, bool) or not isinstance(g.samples, int) or g.samples < 1:
                raise PlanError(f"group {g.name}: samples must be an integer >= 1, got {g.samples!r}")
            covered = [u for st in g.stages for u in st.units]
            if not g.stages or any(st.first > st.last for st in g.stages) or covered != list(range(1, self.units + 1)):
                raise PlanError(f"group {g.name}: stages {[(s.tier, s.first, s.last) for s in g.stages]} must cover "
                                f"units 1..{self.units} in consecutive non-empty ranges")
            tiers = [st.tier for st in g.stages]
            if len(set(tiers)) != len(tiers):
                raise PlanError(f"group {g.name}: {tiers} visits an account twice")
        for who in self.keeps:
            if who in self.owners or _account(who) not in {st.tier for g in self.groups for st in g.stages}:
                raise PlanError(f"{who} keeps a copy of units it does not train, or owns")

    # ------------------------------------------------------------------ views

    @property
    def batch(self) -> int:
        return sum(g.samples for g in self.groups)

    @property
    def working(self) -> frozenset[str]:
        """The accounts that compute or own units in a step (the others are idle)."""
        return frozenset(a for g in self.groups for a in g.accounts) | frozenset(self.owners)

    def start_of(self, name: str) -> int:
        """Where group ``name``'s rows start in the step's batch (the groups' samples in plan order)."""
        start = 0
        for g in self.groups:
            if g.name == name:
                return start
            start += g.samples
        raise PlanError(f"no sample group {name!r} in the plan")

    def owned(self, account: str) -> frozenset[int]:
        """The units whose weights and optimizer state ``account`` holds."""
        return frozenset(u for u, o in enumerate(self.owners, 1) if o == account)

    def replicas(self, account: str) -> frozenset[int]:
        """The units ``account`` trains without owning them: their weights come from the owner before the
        step, their gradients go back to it."""
        trained = {u for g in self.groups for st in g.stages if st.tier == account for u in st.units}
        return frozenset(trained) - self.owned(account)

    def arrives_from(self, sender: str, receiver: str) -> str:
        """Whom a message from ``sender`` reaches ``receiver`` from: the sender itself, except in a plan
        driven by an account that holds no samples (a fleet's edge), through which every message passes."""
        hub = self.driver
        if hub in (sender, receiver) or any(g.source == hub for g in self.groups):
            return sender
        return hub

    def describe(self) -> list[str]:
        """Lines for people: each group's samples and chain, then who owns what."""
        lines = []
        for g in self.groups:
            chain = " -> ".join(f"{st.tier} {st.first}..{st.last}" for st in g.stages)
            loss = f", loss on the {g.loss}" if g.loss != g.stages[-1].tier else ""
            lines.append(f"{g.name}: {g.samples} samples of the {g.source}'s data: {chain}{loss}")
        bits = f"; cut activations in {self.compress_bits} bits" if self.compress_bits else ""
        keeps = f"; {', '.join(sorted(self.keeps))} keep their own copies" if self.keeps else ""
        lines.append("owners: " + ", ".join(f"{o} {a}..{b}" for o, a, b in _runs(self.owners)) + bits + keeps)
        return lines

    # ------------------------------------------------------------------- JSON

    def to_json(self) -> dict[str, Any]:
        return {"kind": KIND, "units": self.units, "driver": self.driver, "compress_bits": self.compress_bits,
                "owners": [list(r) for r in _runs(self.owners)], **({"keeps": sorted(self.keeps)} if self.keeps else {}),
                "groups": [{"name": g.name, "source": g.source, "samples": g.samples, "loss": g.loss,
                            "stages": [[st.tier, st.first, st.last] for st in g.stages]} for g in self.groups]}

    @classmethod
    def from_json(cls, data: Any) -> "Plan":
        """A plan from the schedule topic: anything malformed is one :class:`PlanError` naming it."""
        try:
            if not isinstance(data, dict) or data.get("kind") != KIND:
                raise ValueError(f"expected an object of kind {KIND!r}")
            owners: list[str] = []
            for who, a, b in data["owners"]:
                if _int(a) != len(owners) + 1 or _int(b) < _int(a):
                    raise ValueError(f"owner runs must be consecutive from unit 1 (at {[who, a, b]})")
                owners += [str(who)] * (b - a + 1)
            groups = tuple(Group(str(g["name"]), str(g["source"]), _int(g["samples"]),
                                 tuple(Stage(str(t), _int(a), _int(b)) for t, a, b in g["stages"]), str(g.get("loss", "")))
                           for g in data["groups"])
            keeps = data.get("keeps", [])
            if not isinstance(keeps, list):
                raise ValueError("keeps must be a list of accounts")
            return cls(_int(data["units"]), groups, tuple(owners), str(data.get("driver", "device")),
                       _int(data.get("compress_bits", 0)), frozenset(map(str, keeps)))
        except PlanError as exc:
            raise PlanError(f"not a plan: {exc}") from None
        except (KeyError, TypeError, ValueError) as exc:
            raise PlanError(f"not a plan: {type(exc).__name__}: {exc}") from None


def _int(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"{v!r} is not an integer")
    return v


def _account(who: Any) -> str:
    try:
        return validate_party(who, what="account")
    except TopicError as exc:
        raise PlanError(str(exc)) from None


def _runs(owners: Sequence[str]) -> list[tuple[str, int, int]]:
    """``owners`` as (account, first, last) runs."""
    out: list[tuple[str, int, int]] = []
    for u, o in enumerate(owners, 1):
        if out and out[-1][0] == o:
            out[-1] = (o, out[-1][1], u)
        else:
            out.append((o, u, u))
    return out


# ---------------------------------------------------------------- builders

def from_schedule(s: "Schedule", *, units: int, batch: int) -> Plan:
    """A three-tier schedule as a plan: O/S/L (three groups owned by o, empty ones left out) or a
    chain (one group of ``batch`` samples whose stages own their units). The device drives."""
    if s.chain is not None:
        group = Group("chain", "device", batch, tuple(Stage(st.tier, st.first, st.last) for st in s.chain))
        owners = tuple(st.tier for st in s.chain for _ in range(st.first, st.last + 1))
        return Plan(units, (group,), owners, "device", s.compress_bits)
    o = s.tier_of("o")
    groups = [Group("o", "device", s.b_o, (Stage(o, 1, units),))] if s.b_o else []
    for role in ("s", "l"):
        cut, n = s.cut(role), s.samples(role)
        if n:
            stages = (Stage(s.tier_of(role), 1, cut),) + ((Stage(o, cut + 1, units),) if cut < units else ())
            groups.append(Group(role, "device", n, stages, loss=o))
    return Plan(units, tuple(groups), (o,) * units, "device")


def for_fleet(members: Iterable[tuple[str, int, int, int]], *, units: int, cloud: str = "cloud",
              edge: str = "edge", keep: bool = False) -> Plan:
    """A fleet step: per member ``(name, samples, m, k)`` the group ``[(name,1,m),(edge,m+1,k),(cloud,k+1,U)]``
    (empty stages left out), every unit owned by the edge, which drives; ``keep`` (periodic sync): each
    device keeps its copy of units 1..m."""
    groups = []
    for name, n, m, k in members:
        if not 0 <= m <= k <= units:
            raise PlanError(f"member {name}: path ({m}, {k}) does not fit {units} units")
        stages = tuple(Stage(t, a, b) for t, a, b in ((name, 1, m), (edge, m + 1, k), (cloud, k + 1, units)) if a <= b)
        groups.append(Group(name, name, n, stages))
    keeps = frozenset(g.name for g in groups if g.stage_of(g.name) is not None) if keep else frozenset()
    return Plan(units, tuple(groups), (edge,) * units, edge, keeps=keeps)


def handover(prev: Plan, nxt: Plan) -> dict[tuple[str, str], frozenset[int]]:
    """Which units change owner between two plans: ``(giver, taker) -> units``, for the state keeper to
    move (weights, optimizer moments and step) at the step boundary."""
    if prev.units != nxt.units:
        raise PlanError(f"plans of {prev.units} and {nxt.units} units do not follow each other")
    moves: dict[tuple[str, str], set[int]] = {}
    for u, (a, b) in enumerate(zip(prev.owners, nxt.owners), 1):
        if a != b:
            moves.setdefault((a, b), set()).add(u)
    return {k: frozenset(v) for k, v in moves.items()}


def paths(plan: Plan, *, edge: str = "edge") -> Mapping[str, tuple[int, int]]:
    """A fleet plan's members as ``name -> (m, k)``: the device trains 1..m, the edge m+1..k."""
    out = {}
    for g in plan.groups:
        own, at_edge = g.stage_of(g.source), g.stage_of(edge)
        m = own.last if own is not None else 0
        out[g.name] = (m, at_edge.last if at_edge is not None else m)
    return out
