"""What the dashboard knows of a job: everything the observer account reads on its topics (statuses,
telemetry, schedules), folded into a bounded state the page draws.

Pure: :meth:`Board.offer` takes one message (account, kind, payload, time), :meth:`Board.snapshot`
gives the JSON the page polls. Memory is bounded whatever the job's length or the fleet's size: the
curves keep at most :data:`POINTS` points (every other one dropped when full, so an hour-long job's
whole history stays, at a coarser step), the event log the newest :data:`EVENTS`, and at most
:data:`ACCOUNTS` accounts are tracked.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Optional

from hiertrain.errors import PlanError
from hiertrain.schedule import Schedule

POINTS = 600
EVENTS = 200
ACCOUNTS = 256
SERVICES = ("edge", "cloud", "planner")  # the accounts that are no device


def _num(v: Any) -> Optional[float]:
    """A number the page can draw: ``None`` for what is absent or not finite (a diverged loss)."""
    if v is None:
        return None
    x = float(v)
    return x if math.isfinite(x) else None


class Curve:
    """A time series of at most ``limit`` points: when full, every other point is dropped and only
    every ``stride``-th new one kept from then on."""

    def __init__(self, limit: int = POINTS) -> None:
        self.limit, self.stride, self.seen = limit, 1, 0
        self.points: list[dict[str, Any]] = []

    def add(self, point: dict[str, Any]) -> None:
        self.seen += 1
        if (self.seen - 1) % self.stride:
            return
        self.points.append(point)
        if len(self.points) >= self.limit:
            self.points = self.points[::2]
            self.stride *= 2


@dataclass
class Account:
    name: str
    state: str = "unknown"
    since: float = 0.0
    role: str = ""
    iteration: Optional[int] = None
    telemetry_t: float = 0.0
    dropped: dict[str, int] = field(default_factory=dict)
    links: dict[str, float] = field(default_factory=dict)
    joules: Optional[float] = None

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "state": self.state, "since": self.since, "role": self.role,
                "iteration": self.iteration, "telemetry_t": self.telemetry_t, "dropped": self.dropped,
                "refused": sum(self.dropped.values()), "links": self.links, "joules": self.joules,
                "kind": "service" if self.name in SERVICES or self.name.startswith("edge") else "device"}


def drawing(s: Schedule) -> dict[str, Any]:
    """A schedule as the page draws it: each sample group's name, samples and stages (tier, first
    unit, last unit; ``None``: to the model's last unit, when the schedule does not say how many)."""
    if s.groups is not None:
        g = s.groups
        return {"units": g.units, "groups": [{"name": x.name, "samples": x.samples,
                                              "stages": [[st.tier, st.first, st.last] for st in x.stages]}
                                             for x in g.groups]}
    if s.chain is not None:
        return {"units": s.chain[-1].last, "groups": [{"name": "chain", "samples": s.b_o + s.b_s + s.b_l,
                                                       "stages": [[st.tier, st.first, st.last] for st in s.chain]}]}
    o = s.tier_of("o")
    groups = [{"name": "o", "samples": s.b_o, "stages": [[o, 1, None]]}]
    for role in "sl":
        if s.samples(role):
            cut = s.cut(role)
            groups.append({"name": role, "samples": s.samples(role),
                           "stages": [[s.tier_of(role), 1, cut], [o, cut + 1, None]]})
    return {"units": None, "groups": groups}


class Board:
    def __init__(self, job: str) -> None:
        self.job = job
        self.accounts: dict[str, Account] = {}
        self.events: deque[dict[str, Any]] = deque(maxlen=EVENTS)
        self.steps = Curve()          # loss and step time per finished step
        self.schedule: Optional[dict[str, Any]] = None
        self.plan: Optional[dict[str, Any]] = None
        self.versions = 0
        self.last_step: Optional[int] = None
        self.ignored = 0              # messages the board could not read (counted, never raised)

    def _event(self, t: float, kind: str, text: str) -> None:
        self.events.append({"t": t, "kind": kind, "text": text})

    def _account(self, name: str) -> Optional[Account]:
        if name not in self.accounts:
            if len(self.accounts) >= ACCOUNTS:
                return None
            self.accounts[name] = Account(name)
        return self.accounts[name]

    def offer(self, account: str, kind: str, payload: Any, t: float) -> None:
        """One message the observer received: a status, telemetry, or a schedule (``account`` ``""``)."""
        if not isinstance(payload, dict):
            self.ignored += 1
            return
        try:
            {"status": self._status, "telemetry": self._telemetry, "schedule": self._schedule}[kind](account, payload, t)
        except (KeyError, TypeError, ValueError, PlanError):
            self.ignored += 1

    def _status(self, name: str, p: dict[str, Any], t: float) -> None:
        a = self._account(name)
        if a is None:
            return
        state = str(p.get("state", "unknown"))
        if isinstance(p.get("role"), str):
            a.role = p["role"]
        if state != a.state:
            if state == "online":
                self._event(t, "join", f"{name} online" + (f" (was {a.state})" if a.state != "unknown" else ""))
            elif a.state != "unknown" or state != "stopped":
                why = p.get("reason") or p.get("error")
                self._event(t, "leave", f"{name} {state}" + (f": {why}" if why else ""))
            a.state, a.since = state, t

    def _telemetry(self, name: str, p: dict[str, Any], t: float) -> None:
        a = self._account(name)
        if a is None:
            return
        a.telemetry_t = t
        role = str(p.get("role", a.role))
        a.role = f"worker_{role}" if role in ("o", "s", "l") else role  # a three-tier job's roles
        if isinstance(p.get("iteration"), int):
            a.iteration = p["iteration"]
        if isinstance(p.get("dropped"), dict):
            before = sum(a.dropped.values())
            a.dropped = {str(k): int(v) for k, v in p["dropped"].items()}
            if sum(a.dropped.values()) > before:
                self._event(t, "refusal", f"{name} refused {sum(a.dropped.values()) - before} message(s): "
                            + ", ".join(f"{k} {v}" for k, v in sorted(a.dropped.items())))
        if isinstance(p.get("links"), dict):
            a.links = {str(k): v for k, v in ((str(k), _num(v)) for k, v in p["links"].items()) if v is not None}
        energy = p.get("energy")
        if isinstance(energy, dict) and isinstance(energy.get("joules"), dict):
            a.joules = _num(sum(energy["joules"].values()))
        if "loss" in p and isinstance(p.get("iteration"), int):
            members = p.get("fleet")
            point = {"step": p["iteration"], "t": t, "loss": _num(p["loss"]), "seconds": _num(p.get("iteration_s")),
                     "predicted": _num(p.get("predicted_s", self._predicted(p.get("schedule_version")))),
                     "version": p.get("schedule_version"),
                     "devices": len(members) if isinstance(members, list) else None,
                     "accuracy": _num(p.get("accuracy"))}
            self.last_step = p["iteration"]
            self.steps.add(point)

    def _schedule(self, _: str, p: dict[str, Any], t: float) -> None:
        s = Schedule.from_json(p)
        if self.schedule is not None and s.version <= self.schedule.get("version", 0):
            return  # a retained copy again, or an older one
        old = self.schedule
        self.schedule, self.plan, self.versions = p, drawing(s), self.versions + 1
        why = str(p.get("reason") or "")
        lost = any(w in why for w in ("offline", "gone", "left"))  # the planners' reasons when a tier or device is lost
        kind = "failover" if lost else "replan"
        was = f" (was v{old.get('version')})" if old else ""
        self._event(t, kind, f"plan v{s.version} from step {s.effective_iteration}: {s.policy}"
                    + (f", {why}" if why else "") + was)

    def _predicted(self, version: Any) -> Any:
        """The step time the schedule of ``version`` predicted (a three-tier job's telemetry does not say)."""
        s = self.schedule
        return s.get("iteration_s") if s is not None and s.get("version") == version else None

    def snapshot(self) -> dict[str, Any]:
        accounts = sorted(self.accounts.values(), key=lambda a: (a.name not in SERVICES, a.name))
        return {"job": self.job, "step": self.last_step, "schedule": self.schedule, "plan": self.plan,
                "accounts": [a.to_json() for a in accounts], "steps": self.steps.points,
                "stride": self.steps.stride, "events": list(self.events), "ignored": self.ignored}
