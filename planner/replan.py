"""When to re-plan: the planner's state machine, free of MQTT.

It merges the tiers' profiles, follows the measured link rates and which tiers are alive, and
decides when a new schedule is due:

- the first time every tier's profile and both link rates are known;
- when a link's smoothed rate moves more than ``hysteresis`` (relative) away from the rate the
  current schedule was planned with; noise inside the band never re-plans (no flapping); a
  measurement more than twice the band away is a step change and replaces the estimate at once;
- when a tier goes offline (it is planned around: no samples, no compute) or comes back;
- when the device reports another energy budget (``budget_j`` in its telemetry, joules per step, or
  ``budget_w``, watts on average: a battery running low): the plan is then the fastest within it
  (:mod:`hiertrain.planner.energy`; under watts, paced: its ``pace_s`` the least seconds of a step), or
  the least-energy one if none is, and a plan over the budget is always replaced.

A new plan is published only when it pays: it must place something differently, beat the current
schedule at today's rates by ``min_gain`` (the rates are estimates, and a split of a sample or two
gains less than their noise), and a new owner of the model must win back the move of its weights
within ``horizon`` iterations. A plan that must leave a lost tier is always published.

Each new schedule gets the next version and an effective iteration ``lead`` iterations past
the newest iteration any tier reported (the first schedule applies at once); the device stamps
every iteration with the version it runs, so all tiers switch at the same iteration boundary.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Optional

from hiertrain import TIERS
from hiertrain.errors import PlanError
from hiertrain.profile import Profile
from hiertrain.plan import handover
from hiertrain.schedule import Schedule
from hiertrain.planner import energy as E
from hiertrain.planner.baselines import plan
from hiertrain.planner.costmodel import TCP_EFFICIENCY, Bandwidth, iteration_time, replica_every

log = logging.getLogger("hiertrain.planner")
LINKS = ("device_edge", "edge_cloud")
# what each tier may report: the links it is on (device_cloud: device <-> cloud through the edge)
LINKS_OF = {"device": ("device_edge", "device_cloud"), "edge": ("device_edge", "edge_cloud"),
            "cloud": ("edge_cloud", "device_cloud")}
RATE_BAND = (1e-3, 1e6)   # Mbit/s a link can plausibly carry: 1 kbit/s .. 1 Tbit/s
ITERATION_WINDOW = 1000   # how far past the newest known iteration a report may be
MAX_VERSION = 2 ** 31     # schedule versions a tier's telemetry may report


def placement(s: Schedule) -> dict[str, Any]:
    """What a schedule decides, without its version, timing and prediction (and the groups that only
    restate its placement)."""
    return {k: v for k, v in s.to_json().items() if k not in ("version", "effective_iteration", "iteration_s",
                                                                "solve_s", "replica_every", "groups", "objective",
                                                                "joules", "budget_j", "budget_w")}


@dataclass
class PlannerState:
    batch: int
    policy: str = "hiertrain"
    cost_model: str = "paper"
    hysteresis: float = 0.2
    window: int = 5            # measurements per link the estimate is the median of
    horizon: int = 100         # iterations over which moving the model to another tier must pay
    min_gain: float = 0.1      # a new placement must beat the current one by this much (relative), at today's rates
    lead: int = 2
    profile: Optional[Profile] = None
    rates: dict[str, float] = field(default_factory=dict)
    offline: set[str] = field(default_factory=set)
    seen: set[str] = field(default_factory=set)  # tiers this planner has seen online
    iteration: int = 0
    current: Optional[Schedule] = None
    planned_rates: dict[str, float] = field(default_factory=dict)
    planned_offline: frozenset[str] = frozenset()
    version: int = 0
    planner: Callable[..., Schedule] = plan
    far: dict[str, int] = field(default_factory=dict)  # iterations reported beyond the window, by tier
    run: Optional[str] = None  # the device's current run
    samples: dict[str, list[float]] = field(default_factory=dict)  # recent measurements per link
    reprofiled: set[str] = field(default_factory=set)  # tiers whose new profile is not planned with yet
    budget_j: Optional[float] = None  # the device's energy budget per step, as it last reported it
    budget_w: Optional[float] = None  # ... and in average watts
    planned_budget: tuple[Optional[float], Optional[float]] = (None, None)  # (budget_j, budget_w) planned with

    # ---------------------------------------------------------------- inputs

    def on_profile(self, tier: str, profile: Profile) -> None:
        """A tier's own profile (its entry under ``tiers``); merged into the planning profile."""
        if tier not in profile.tiers:
            raise PlanError(f"wrong profile: the {tier} published timings for {', '.join(sorted(profile.tiers))}, "
                            f"not for itself")
        before = self.profile.tiers.get(tier) if self.profile is not None else None
        self.profile = profile if self.profile is None else self.profile.merged(tier, profile)
        if tier == "device" and self.profile.sample_bytes != profile.sample_bytes:
            # the device holds the data: its samples' size on the wire (uint8 images) is the one
            self.profile = replace(self.profile, sample_bytes=profile.sample_bytes)
            self.reprofiled.add(tier)
        if before is not None and before != self.profile.tiers[tier] and self.current is not None:
            self.reprofiled.add(tier)  # re-plan with the new timings

    def on_rate(self, link: str, mbps: float) -> None:
        """A measured rate. ``device_cloud`` (a transfer through the edge) measures the slower link:
        it is applied to whichever link is currently believed slower (edge-cloud on a tie, the WAN
        side being the one that usually varies)."""
        if link == "device_cloud":
            if not all(k in self.rates for k in LINKS):
                return  # cannot be attributed yet
            link = "device_edge" if self.rates["device_edge"] < self.rates["edge_cloud"] else "edge_cloud"
        if link not in LINKS:
            raise PlanError(f"unknown link {link!r}; expected one of {', '.join(LINKS)}")
        if not mbps > 0:
            raise PlanError(f"link rate must be positive, got {mbps!r}")
        old = self.rates.get(link)
        window = self.samples.setdefault(link, [])
        if old is None:
            self.rates[link], window[:] = mbps, [mbps]
            return
        far = abs(mbps / old - 1) > 2 * self.hysteresis
        if far and window and abs(window[-1] / old - 1) > 2 * self.hysteresis and (window[-1] > old) == (mbps > old):
            # a step change (a link dropped or recovered), confirmed by two measurements in a row: follow it
            self.rates[link], window[:] = (window[-1] + mbps) / 2, [window[-1], mbps]
            return
        window.append(mbps)
        del window[:-self.window]
        if not far:  # the median of the recent measurements: one outlier never moves it
            self.rates[link] = float(sorted(window)[len(window) // 2])

    def on_telemetry(self, account: str, payload: Any) -> None:
        """``{"iteration": i, "links": {"device_edge": Mbit/s, ...}}`` from a tier's telemetry.

        Validated before anything is used, the whole report refused (:class:`PlanError`, naming
        why) if any part fails: a tier reports only the links it is on, rates finite and within
        :data:`RATE_BAND`, the iteration a non-negative integer. An iteration more than
        :data:`ITERATION_WINDOW` past the newest one known (which sets when new schedules take
        effect) counts only once a second tier reports one as far (a resumed job): one account
        alone cannot push every schedule into the far future. Tiers measure TCP payload; plans use line rates (what ``tc`` or
        a contract states), so the measured rates are divided by the payload efficiency of a
        full-size frame."""
        if account not in LINKS_OF:
            raise PlanError(f"unauthorized: telemetry from {account!r}, which is not a tier")
        if not isinstance(payload, dict):
            raise PlanError("malformed: telemetry must be a JSON object")
        it = payload.get("iteration")
        if it is not None and (type(it) is not int or it < 0):
            raise PlanError(f"malformed: iteration {it!r} from {account} is not a non-negative integer")
        links = payload.get("links", {})
        if not isinstance(links, dict):
            raise PlanError("malformed: telemetry 'links' must be an object")
        rates = {}
        for link, mbps in links.items():
            if link not in LINKS_OF[account]:
                raise PlanError(f"unauthorized: {account} reported link {link!r}, which it is not on")
            if type(mbps) not in (int, float) or not RATE_BAND[0] <= mbps <= RATE_BAND[1]:
                raise PlanError(f"implausible rate: {link} = {mbps!r} Mbit/s from {account} "
                                f"(accepted {RATE_BAND[0]:g}..{RATE_BAND[1]:g})")
            rates[link] = float(mbps) / TCP_EFFICIENCY
        for link, mbps in rates.items():
            self.on_rate(link, mbps)
        if it is not None:
            self._on_iteration(account, it)
        for key, unit in (("budget_j", "joules"), ("budget_w", "watts")):
            budget = payload.get(key)
            if budget is None:
                continue
            if account != "device":
                raise PlanError(f"unauthorized: {account} reported an energy budget; only the device has one")
            if type(budget) not in (int, float) or not 0 < budget < math.inf:
                raise PlanError(f"malformed: {key} = {budget!r} from the device is not a positive number of {unit}")
            setattr(self, key, float(budget))
        version = payload.get("schedule_version")
        if type(version) is int and 0 <= version <= MAX_VERSION:
            self.version = max(self.version, version)  # a planner taking over (a standby) numbers on from there

    def _on_iteration(self, account: str, it: int) -> None:
        if it <= self.iteration + ITERATION_WINDOW:
            self.iteration = max(self.iteration, it)
            return
        self.far[account] = it
        others = [v for a, v in self.far.items() if a != account and abs(v - it) <= ITERATION_WINDOW]
        if not others:
            raise PlanError(f"unconfirmed iteration: {account} reports {it}, more than {ITERATION_WINDOW} past "
                            f"{self.iteration}, and no other tier does (its link rates were used)")
        self.iteration = min(it, *others)
        self.far.clear()

    def on_status(self, account: str, state: Any) -> None:
        if account in TIERS:
            if state == "online":
                self.seen.add(account)
                self.offline.discard(account)
            elif state in ("offline", "stopped", "failed"):
                self.offline.add(account)

    def on_lost(self, lost: Any) -> None:
        """The tiers the device failed over from (its status). A planner that never saw one of them
        online (a standby planner, next to the standby broker the survivors moved to) plans without it."""
        if isinstance(lost, list):
            self.offline.update(t for t in lost if t in TIERS and t != "device" and t not in self.seen)

    def on_run(self, run: Any, start: Any) -> None:
        """The device announced its run. A new run restarts the iteration count at its first
        iteration, so that later schedules take effect ``lead`` iterations into *this* run (not
        into the previous run's iteration 301). The device itself treats schedules retained from
        before its run as in effect from its start."""
        if not isinstance(run, str) or type(start) is not int or start < 0 or run == self.run:
            return
        self.run = run
        self.iteration, self.far = start, {}
        log.info("run %s of the device starts at iteration %d", run, start)

    # -------------------------------------------------------------- decision

    def waiting_for(self) -> Optional[str]:
        """What keeps the first schedule from being planned, in words for the operator, or None."""
        missing = [t for t in TIERS if self.profile is None or t not in self.profile.tiers]
        if missing:
            return (f"the profiles of the {', '.join(missing)} (set [planner] profile, or give those tiers a "
                    f"[profile] file to publish)")
        rates = [link for link in LINKS if link not in self.rates]
        if rates:
            return (f"the {' and '.join(rates)} rate (set {', '.join('bw_' + r for r in rates)} in [planner], or "
                    f"wait for a tier to measure a transfer of 64 KiB or more)")
        if "device" in self.offline:
            return "the device to come online"
        return None

    def due(self) -> Optional[str]:
        """Why a new schedule is due now, or ``None``."""
        if self.profile is None or any(t not in self.profile.tiers for t in TIERS):
            return None
        if any(link not in self.rates for link in LINKS):
            return None
        if self.current is None:
            return "first schedule"
        if frozenset(self.offline) != self.planned_offline:
            return f"tiers offline changed to {sorted(self.offline) or 'none'}"
        if self.reprofiled:
            return f"new profile of the {', '.join(sorted(self.reprofiled))}"
        if (self.budget_j, self.budget_w) != self.planned_budget:
            said = [f"{self.budget_j:g} J per step"] if self.budget_j else []
            said += [f"{self.budget_w:g} W on average"] if self.budget_w else []
            return f"the device's energy budget is now {' and '.join(said)}" if said else \
                "the device's energy budget was lifted"
        for link in LINKS:
            old, new = self.planned_rates[link], self.rates[link]
            if abs(new / old - 1) > self.hysteresis:
                return f"{link} moved from {old:.3g} to {new:.3g} Mbit/s"
        return None

    def _keep_current(self, profile: Profile, bw: Bandwidth, new: Schedule) -> tuple[Optional[str], bool]:
        """(Why the current schedule should stay although a new plan was made, or None; whether the
        rates are to be judged again): the same placement (republishing it would change nothing, also
        when an idle tier comes or goes), a gain below ``min_gain`` (judged again as the rates drift
        on), or a new owner of the model whose one-off move (the weights over the link between the
        two owners) would not pay back over ``horizon`` iterations (unless the work is on a lost tier)."""
        assert self.current is not None
        if placement(new) == placement(self.current):
            return "the new plan places everything where it is", False
        if self.current.working & self.offline:  # the work must leave a lost tier, whatever moving costs
            return None, False
        if (self.budget_j, self.budget_w) != self.planned_budget:
            return None, False  # planned for other budgets: the plan within today's replaces it
        if self.budget_j is not None and E.schedule_joules(profile, bw, self.current, cost_model=self.cost_model
                                                           )["device"] > self.budget_j * (1 + 1e-9):
            return None, False  # the current plan spends more than the device may
        old_s = iteration_time(profile, bw, self.current, cost_model=self.cost_model)
        new_s = iteration_time(profile, bw, new, cost_model=self.cost_model)
        if new_s > old_s * (1 - self.min_gain):  # the rates it was planned from are estimates: a small gain is noise
            return (f"the new plan would gain {1 - new_s / old_s:.1%} per iteration ({old_s:.3g} -> {new_s:.3g} s), "
                    f"less than min_gain = {self.min_gain:g}"), True
        n = len(profile.layers)
        moves = handover(self.current.plan(units=n, batch=self.batch), new.plan(units=n, batch=self.batch))
        if not moves:
            return None, False
        moved = sorted(u for units in moves.values() for u in units)
        a, b = next(pair for pair, units in moves.items() if moved[0] in units)
        rate = {frozenset(("device", "edge")): bw.device_edge, frozenset(("edge", "cloud")): bw.edge_cloud,
                frozenset(("device", "cloud")): min(bw.device_edge, bw.edge_cloud)}[frozenset((a, b))]
        move_s = 8e-6 * sum(profile.layers[u - 1].param_bytes for u in moved) / rate
        if (old_s - new_s) * self.horizon < move_s:
            return (f"moving units {moved[0]}..{moved[-1]} from the {a} to the {b} would take {move_s:.3g} s, more "
                    f"than {self.horizon} iterations gain ({old_s:.3g} -> {new_s:.3g} s each)"), False
        return None, False

    def _budgeted(self, profile: Profile, bw: Bandwidth) -> Schedule:
        """The fastest schedule within the device's budgets, or (none is) the one that spends least."""
        goal = E.Goal("budget", budget_j={"device": self.budget_j} if self.budget_j is not None else {},
                      budget_w={"device": self.budget_w} if self.budget_w is not None else {})
        try:
            found = E.plan_three_tier(profile, bw, self.batch, goal, cost_model=self.cost_model)
        except PlanError as exc:
            log.warning("%s; planning the schedule that spends least", exc)
            found = E.plan_three_tier(profile, bw, self.batch, E.Goal("energy"), cost_model=self.cost_model)
        budgets = {k: v for k, v in (("budget_j", self.budget_j), ("budget_w", self.budget_w)) if v is not None}
        return replace(found.schedule, extra={**found.schedule.extra, **budgets,
                                              "joules": {t: round(j, 6) for t, j in found.joules.items()}})

    def on_schedule(self, payload: Any) -> Optional[Schedule]:
        """A schedule seen on the topic. If it is not ours and not older than ours (another or an
        earlier planner instance), take over its version and return ours re-versioned above it."""
        version = payload.get("version") if isinstance(payload, dict) else None
        if not isinstance(version, int) or isinstance(version, bool):
            return None
        mine = self.current is not None and payload == self.current.to_json()
        self.version = max(self.version, version)
        if mine or self.current is None or version < self.current.version:
            return None
        self.version += 1
        self.current = self.current.versioned(self.version, self.iteration + self.lead)
        return self.current

    def decide(self) -> Optional[Schedule]:
        """A new versioned schedule if one is due, else ``None``."""
        why = self.due()
        if why is None:
            return None
        assert self.profile is not None
        profile = self.profile
        if self.offline:
            tiers = {t: (replace(v, can_train=False) if t in self.offline else v) for t, v in profile.tiers.items()}
            profile = Profile(profile.model, profile.sample_bytes, profile.layers, tiers, profile.extra)
        if "device" in self.offline:
            log.warning("the device (the data source) is offline; keeping schedule version %d", self.version)
            self.planned_offline = frozenset(self.offline)
            return None
        bw = Bandwidth(self.rates["device_edge"], self.rates["edge_cloud"])
        schedule = self._budgeted(profile, bw) if self.budget_j is not None or self.budget_w is not None else \
            self.planner(profile, bw, self.batch, policy=self.policy, cost_model=self.cost_model)
        schedule = replace(schedule, replica_every=replica_every(profile, bw, schedule))
        keep, again = self._keep_current(profile, bw, schedule) if self.current is not None else (None, False)
        self.reprofiled.clear()  # what is planned with from now on, whether the plan is published or not
        if not again:  # (a plan held back for its small gain: the rates drifting on are judged again)
            self.planned_rates = dict(self.rates)
        self.planned_offline = frozenset(self.offline)
        self.planned_budget = (self.budget_j, self.budget_w)
        if keep:
            log.info("not re-planning (%s): %s", why, keep)
            return None
        self.version += 1
        # the first schedule applies at once; later ones leave the tiers `lead` iterations to get it
        schedule = schedule.versioned(self.version, self.iteration + (self.lead if self.current else 0))
        schedule = schedule.with_groups(units=profile.n_units, batch=self.batch)  # the plan model, for every reader
        schedule = replace(schedule, extra={**schedule.extra, "reason": why})  # for whoever watches the topic
        self.current = schedule
        log.info("schedule version %d (%s): %s", self.version, why, schedule.to_json())
        return schedule
