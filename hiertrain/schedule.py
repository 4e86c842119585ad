"""A schedule: the planner's decision, as data.

A HierTrain schedule maps the roles o (whole model, loss and optimizer), s (units 1..m_s) and
l (units 1..m_l) onto the tiers, and splits the batch B = b_o + b_s + b_l. Baselines that are not
O/S/L schedules are described too: a *chain* (JointDNN+: consecutive unit ranges on successive
tiers, all samples), optionally with its cut activations quantised to 8 bits (JALAD).

On the wire it is the JSON of ``hiertrain plan --json`` plus ``version`` and
``effective_iteration`` (shared/CONTRACTS.md), and ``groups``: the same decision in the plan model
every job shares (:mod:`hiertrain.plan`), checked against the O/S/L keys. A fleet's schedule has only
``groups`` (no O/S/L mapping describes N devices): its ``mapping`` is empty and :meth:`Schedule.check`
refuses it to a three-tier tier.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Optional

from hiertrain import TIERS
from hiertrain.errors import PlanError
from hiertrain.plan import Plan, Stage, from_schedule

ROLES: tuple[str, ...] = ("o", "s", "l")
log = logging.getLogger("hiertrain.schedule")


@dataclass(frozen=True)
class Schedule:
    mapping: Mapping[str, str]
    m_s: int
    m_l: int
    b_o: int
    b_s: int
    b_l: int
    policy: str = "hiertrain"
    cost_model: str = "paper"
    iteration_s: float = math.nan
    solve_s: float = 0.0
    chain: Optional[tuple[Stage, ...]] = None
    compress_bits: int = 0
    version: int = 0
    effective_iteration: int = 0
    replica_every: int = 0  # K: worker_o sends the device a replica of its state every K iterations (failover)
    extra: Mapping[str, Any] = field(default_factory=dict)
    groups: Optional[Plan] = None  # the decision in the plan model (for a fleet: the whole decision)

    def __post_init__(self) -> None:
        if self.groups is not None and not self.mapping:  # a fleet's plan: nothing of O/S/L to check
            return
        if set(self.mapping) != set(ROLES) or sorted(self.mapping.values()) != sorted(TIERS):
            raise PlanError(f"mapping {dict(self.mapping)} must give each role o, s, l a different tier "
                            f"of {', '.join(TIERS)}")
        for name in ("m_s", "m_l", "b_o", "b_s", "b_l", "version", "effective_iteration", "compress_bits",
                     "replica_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise PlanError(f"{name} must be a non-negative integer, got {v!r}")
        if self.m_s > self.m_l:
            raise PlanError(f"cuts must satisfy m_s <= m_l (m_s: {self.m_s}, m_l: {self.m_l})")
        if self.b_s and not self.m_s or self.b_l and not self.m_l:
            raise PlanError(f"a worker with samples needs a cut > 0 (m_s: {self.m_s}, b_s: {self.b_s}, "
                            f"m_l: {self.m_l}, b_l: {self.b_l})")
        if self.batch < 1 and self.chain is None:
            raise PlanError("the batch b_o + b_s + b_l must be at least 1")
        if self.compress_bits not in (0, 8) or self.compress_bits and self.chain is None:
            raise PlanError(f"compress_bits must be 0 or 8 (and only in a chain), got {self.compress_bits}")
        if self.chain is not None:
            units = [u for st in self.chain for u in range(st.first, st.last + 1)]
            if not self.chain or units != list(range(1, len(units) + 1)) or any(
                    st.tier not in TIERS or st.first > st.last for st in self.chain):
                raise PlanError(f"chain {self.chain} must cover units 1..N in consecutive non-empty ranges")
        if self.groups is not None and self.groups != from_schedule(self, units=self.groups.units,
                                                                    batch=self.groups.batch):
            raise PlanError(f"groups {self.groups.to_json()} do not describe this schedule's O/S/L placement")

    # ------------------------------------------------------------------ views

    @property
    def batch(self) -> int:
        return self.b_o + self.b_s + self.b_l

    @property
    def is_fleet(self) -> bool:
        return not self.mapping

    def plan(self, *, units: int, batch: int) -> Plan:
        """This decision in the plan model."""
        return self.groups if self.groups is not None else from_schedule(self, units=units, batch=batch)

    def without(self, lost: "frozenset[str] | set[str]") -> "Schedule":
        """The schedule the survivors compute themselves when no planner answers after ``lost`` went
        (issue 28), the same on every tier: a lost slice worker's samples go to the owner o; a lost o's
        role goes to the device, whose own role passes to the lost tier (and its samples to o). The
        cuts and the other survivors' shares stay, so the step is still one exact SGD step. A layer
        chain has none (its stages own their units)."""
        lost = frozenset(lost) & self.working
        if not lost:
            return self
        if self.chain is not None or self.is_fleet or "device" in lost:
            raise PlanError(f"schedule v{self.version} has no fallback without {', '.join(sorted(lost))}")
        mapping = dict(self.mapping)
        if mapping["o"] in lost:
            mine = self.role_of("device")
            mapping["o"], mapping[mine] = "device", mapping["o"]
        b = {"o": self.b_o, "s": self.b_s, "l": self.b_l}
        if mapping != dict(self.mapping):  # the device is o now: what it trained as s or l too
            b["o"], b[self.role_of("device")] = b["o"] + b[self.role_of("device")], 0
        for role in ("s", "l"):
            if mapping[role] in lost:
                b["o"], b[role] = b["o"] + b[role], 0
        return replace(self, mapping=mapping, b_o=b["o"], b_s=b["s"], b_l=b["l"], groups=None,
                       policy=f"fallback without {', '.join(sorted(lost))}", iteration_s=math.nan)

    def with_groups(self, *, units: int, batch: int) -> "Schedule":
        return replace(self, groups=from_schedule(self, units=units, batch=batch))

    @property
    def working(self) -> frozenset[str]:
        """The tiers that compute under this schedule (the others are idle)."""
        if self.groups is not None:
            return self.groups.working
        if self.chain is not None:
            return frozenset(st.tier for st in self.chain)
        return frozenset(t for r, t in self.mapping.items() if r == "o" or self.samples(r))

    def tier_of(self, role: str) -> str:
        return self.mapping[role]

    def role_of(self, tier: str) -> str:
        return next(r for r, t in self.mapping.items() if t == tier)

    def samples(self, role: str) -> int:
        return {"o": self.b_o, "s": self.b_s, "l": self.b_l}[role]

    def cut(self, role: str) -> int:
        """The last unit ``role`` trains on its own samples (N for o is given by the model)."""
        return {"s": self.m_s, "l": self.m_l}[role]

    def check(self, *, n_units: int, batch: Optional[int] = None) -> "Schedule":
        """Raise :class:`PlanError` if the schedule does not fit a model of ``n_units`` and ``batch``."""
        if self.is_fleet:
            raise PlanError(f"schedule version {self.version} is a fleet's plan, not a three-tier schedule")
        if self.groups is not None and self.groups.units != n_units:
            raise PlanError(f"schedule's groups cover {self.groups.units} units, the model has {n_units}")
        if self.m_l > n_units:
            raise PlanError(f"cut m_l = {self.m_l} is beyond the model's {n_units} units")
        if self.chain is not None and self.chain[-1].last != n_units:
            raise PlanError(f"chain ends at unit {self.chain[-1].last}, the model has {n_units}")
        if batch is not None and self.batch != batch:
            raise PlanError(f"split b_o + b_s + b_l = {self.b_o} + {self.b_s} + {self.b_l} = {self.batch}, "
                            f"not the batch size {batch}")
        return self

    def describe(self) -> str:
        """One line for people: who does what, and the predicted time."""
        if self.is_fleet:
            assert self.groups is not None
            who = ", ".join(f"{g.name} ({g.samples})" for g in self.groups.groups)
            return f"{self.policy}: fleet of {len(self.groups.groups)}: {who}; {self.iteration_s:.4f} s/step"
        if self.chain is not None:
            where = " -> ".join(f"{st.tier}[{st.first}..{st.last}]" for st in self.chain)
            extra = f", cut activations in {self.compress_bits} bits" if self.compress_bits else ""
            return f"{self.policy}: chain {where}{extra}; {self.iteration_s:.4f} s/iteration"
        m = self.mapping
        parts = [f"o={m['o']} (b_o={self.b_o})"]
        for role, cut, b in (("s", self.m_s, self.b_s), ("l", self.m_l, self.b_l)):
            parts.append(f"{role}={m[role]} (units 1..{cut}, b_{role}={b})" if b else f"{m[role]} idle")
        return f"{self.policy}: {', '.join(parts)}; {self.iteration_s:.4f} s/iteration"

    def versioned(self, version: int, effective_iteration: int) -> "Schedule":
        return replace(self, version=version, effective_iteration=effective_iteration)

    # ------------------------------------------------------------------- JSON

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"policy": self.policy, "cost_model": self.cost_model}
        if not self.is_fleet:
            out.update({"mapping": dict(self.mapping), "m_s": self.m_s, "m_l": self.m_l, "b_o": self.b_o,
                        "b_s": self.b_s, "b_l": self.b_l})
        out.update({"iteration_s": self.iteration_s if math.isfinite(self.iteration_s) else None,  # strict JSON
                    "solve_s": self.solve_s})
        if self.chain is not None:
            out["plan"] = {"kind": "chain", "stages": [[s.tier, s.first, s.last] for s in self.chain],
                           "compress_bits": self.compress_bits}
        if self.groups is not None:
            out["groups"] = self.groups.to_json()
        if self.replica_every:
            out["replica_every"] = self.replica_every
        if self.version or self.effective_iteration:
            out["version"] = self.version
            out["effective_iteration"] = self.effective_iteration
        out.update(self.extra)
        return out

    @classmethod
    def from_json(cls, data: Any) -> "Schedule":
        if not isinstance(data, dict):
            raise PlanError(f"a schedule is a JSON object, not {type(data).__name__}")
        try:
            groups = Plan.from_json(data["groups"]) if "groups" in data else None
            plan = data.get("plan") or {}
            chain = None
            if plan.get("kind") == "chain":
                chain = tuple(Stage(str(t), int(a), int(b)) for t, a, b in plan["stages"])
            known = {"policy", "cost_model", "mapping", "m_s", "m_l", "b_o", "b_s", "b_l", "iteration_s",
                     "solve_s", "plan", "version", "effective_iteration", "replica_every", "groups"}
            fleet = groups is not None and "mapping" not in data
            return cls(
                mapping={} if fleet else dict(data["mapping"]), m_s=0 if fleet else data["m_s"],
                m_l=0 if fleet else data["m_l"], b_o=0 if fleet else data["b_o"], b_s=0 if fleet else data["b_s"],
                b_l=0 if fleet else data["b_l"], policy=str(data.get("policy", "hiertrain")),
                cost_model=str(data.get("cost_model", "paper")),
                iteration_s=float(math.nan if data.get("iteration_s") is None else data["iteration_s"]),
                solve_s=float(data.get("solve_s", 0.0)),
                chain=chain, compress_bits=int(plan.get("compress_bits", 0)),
                version=data.get("version", 0), effective_iteration=data.get("effective_iteration", 0),
                replica_every=data.get("replica_every", 0), groups=groups,
                extra={k: v for k, v in data.items() if k not in known},
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise PlanError(f"not a schedule: {type(exc).__name__}: {exc}") from None


class ScheduleFeed:
    """Follows the schedule topic: keeps the newest version, ignores older or repeated ones."""

    def __init__(self) -> None:
        self.current: Optional[Schedule] = None
        self.ignored = 0

    def offer(self, payload: Any) -> Optional[Schedule]:
        """Return the schedule if it is valid and newer than the current one, else ``None`` (logged)."""
        try:
            schedule = Schedule.from_json(payload)
        except PlanError as exc:
            self.ignored += 1
            log.warning("ignored a malformed schedule: %s", exc)
            return None
        if self.current is not None and schedule.version <= self.current.version:
            self.ignored += 1
            log.warning("ignored schedule version %d: version %d is already in effect",
                        schedule.version, self.current.version)
            return None
        self.current = schedule
        return schedule
