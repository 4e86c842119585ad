"""The fleet's coordinator, next to the broker on the edge server: membership, plan, clock, owner.

- **Membership.** The devices of the fleet file and those that publish their own profile
  (:mod:`hiertrain.edge.roster`) whose retained status says online (their Last Will says when they go).
- **Plan.** Whenever the members change, the fleet planner (:func:`hiertrain.planner.fleet.solve`)
  plans them anew (or every ``[[device]] path`` of the file pins one), as a new plan version.
- **Clock.** A round is one attempt at one SGD step; the coordinator starts it by sending every
  member the weights of its units 1..m (the cloud those of units kappa+1..U) with the round: who
  trains which samples (their offsets in each device's data are kept here) along which path.
- **Owner.** The edge owns every parameter and the optimizer: it runs its part of the round's plan
  with the interpreter every service runs (:func:`hiertrain.interpreter.step`): each member's units
  m+1..k as its rows arrive, the loss of members whose k = U, a cut's rows on to the cloud in one
  message, the gradients back; then it steps on the sum of every gradient.
- **Leaving.** A member that goes offline (or is silent for ``timeout_s``) before it has sent
  everything makes the coordinator give the round up: no step is applied, the device is planned out,
  and the same step is **redone** by the members left, on the same samples. A step is therefore
  always one SGD step over all the samples of the devices it names, and the step log says which.
- **Joining.** A device that comes online (or publishes its profile) is planned in at the next round.
- **The cloud** is planned like a member: lost (or silent) mid-round, the round is redone without
  it (every path then ends at the edge, k = U, whatever a pin said); back, it is planned in again.
- **Resuming** (``--resume``, a standby's too) continues after the newest checkpoint (:mod:`.state`).
- **Periodic sync** (``[fleet] sync = {every = K}``, :mod:`hiertrain.train.periodic`): the devices
  keep their own copies of units 1..m; a round sends a fresh copy only where a window starts, a device
  joins or its m changes, and the round that ends a window takes every member's copy and averages.
  Checkpoints are written at the ends of windows only (where the average is the whole model).
- **A site of a hierarchical job** (``[hierarchy] site``, :mod:`hiertrain.edge.uplink`): every K2
  steps its whole model goes up to the cloud's averager over the bridged brokers, and the average
  comes back (or, after ``wait_s``, the site trains on with its own).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from contextlib import ExitStack
from dataclasses import replace
from typing import Any, Optional, Sequence

from hiertrain.net import topics
from hiertrain import interpreter
from hiertrain.errors import ConfigError, MissingMessage, ProtocolError, TierLost
from hiertrain.exchanges import Exchange, exchanges
from hiertrain.net.wire import Message
from hiertrain.train.fleetroles import Member, Round
from hiertrain.train import periodic
from hiertrain.train.part import Params
from hiertrain.fleetservice import POLL_S, FleetService
from hiertrain.service import transport_figures
from hiertrain.train.evaluate import scorer
from hiertrain.train.models import init_params
from hiertrain.train.optim import Optimizer
from hiertrain.planner import fleet as F
from hiertrain.planner import fleetenergy as FE
from hiertrain.planner import fleetfile as FF
from hiertrain.planner import fleetpolicies as FP
from hiertrain.schedule import Schedule
from hiertrain.tierconfig import TierConfig
from hiertrain.edge.publisher import PlanPublisher, fleet_schedule, next_version
from hiertrain.edge import state
from hiertrain.edge.roster import Roster
from hiertrain.edge.uplink import Uplink

log = logging.getLogger("hiertrain.edge")


class Redo(Exception):
    """The round is given up: ``who`` went, fell silent or broke the protocol (the message says which)."""

    def __init__(self, who: str, message: str) -> None:
        super().__init__(message)
        self.who = who


class Coordinator(FleetService):
    def __init__(self, cfg: TierConfig, *, resume: bool = False) -> None:
        super().__init__(cfg, account="edge", peers=None)
        self.run_id = uuid.uuid4().hex[:8]
        self.transport.mailbox.follow(self.run_id)  # replies to an earlier coordinator's rounds are refused
        assert cfg.fleet_file is not None
        file = FF.read(cfg.fleet_file, units=self.units)
        if file.fleet.units != self.units:
            raise ConfigError(f"{cfg.fleet_file}: its profile has {file.fleet.units} units, the model "
                              f"{cfg.model} {self.units}")
        self.roster = Roster(file, batch=cfg.batch, where=cfg.fleet_file)
        self.roster.check(wait_for=cfg.fleet_devices, joins=cfg.fleet_planner is not None, config=cfg.path)
        self.params: Params = init_params(self.spec, cfg.seed)
        self.scorer = scorer(cfg, self.spec)  # [eval] every: held-out accuracy in the telemetry
        self.optimizer = Optimizer(cfg.optimizer, self.spec.param_shapes(), momenta=self.spec.momentum)
        self.offsets: dict[str, int] = {}  # every device's place in its data
        self.cloud_excluded = False  # the cloud given up on, until it goes offline and comes back
        self._involved: set[str] = set()
        self.planned: tuple[tuple[str, ...], bool, int] = ((), False, -1)  # devices, cloud, roster revision
        self.paths: dict[str, F.Path] = {}
        self.version = 0
        self.reason = ""  # why the current plan was made
        self.plan: Optional[F.FleetPlan] = None
        self.planned_fleet: Optional[F.Fleet] = None  # the fleet self.plan was made for
        self.publisher: Optional[PlanPublisher] = None
        if resume and cfg.checkpoint_dir is None:
            raise ConfigError(f"{cfg.path}: --resume needs a [checkpoint] dir to resume from")
        self.resume = resume  # from the newest checkpoint, its own or a collector's, once the fleet is here
        self.sync = cfg.fleet_sync
        self.every = self.sync.every  # K of periodic sync (0: exact); with ``up_to``, the planner's at each plan
        self.window = periodic.Window()
        self.holding: dict[str, int] = {}  # periodic: the devices whose copy of units 1..m is current, and m
        self._fresh: frozenset[str] = frozenset()
        self._checkpoint_due = False
        self.uplink = Uplink(self.transport, cfg.job, cfg.hierarchy, cfg.iterations) if cfg.hierarchy else None
        if not resume:
            state.fresh(cfg.checkpoint_dir)

    # ------------------------------------------------------------ membership and plan

    def members(self) -> list[str]:
        if self.publisher is not None:
            for name, payload in self.publisher.profiles():
                self.roster.on_profile(name, payload)
            if self.roster.refused:
                self.transport.status_extra["refused_profiles"] = dict(self.roster.refused)
        online = self.transport.online()
        self.cloud_excluded &= "cloud" in online
        return self.roster.members(online)

    def replan(self, names: list[str], cloud: bool, step: int = 0) -> None:
        """Plan ``names`` (with the cloud, or without it when it is gone) as a new plan version, in
        effect from ``step``, and publish it on the schedule topic."""
        self.reason = self._why(names, cloud)
        sub = self.roster.fleet_of(names)
        if not cloud:
            sub = F.without_cloud(sub)
        pins = self.roster.pins_for(names)
        if pins is None and self.roster.file.pins:
            print(f"edge: {self.cfg.fleet_file} pins no path for {', '.join(n for n in names if n not in self.roster.file.pins)}: "
                  f"the planner plans every device", flush=True)
        if not cloud:
            why = "it is offline or was given up on" if self.roster.cloud_known else "its timings are unknown"
            print(f"edge: the fleet planner plans without the cloud: {why}", flush=True)
        if self.sync.periodic:
            sub = replace(sub, sync_every=self.sync.every or self.sync.up_to)
        plan = FP.choose(sub, pins=pins, policy=self.cfg.fleet_policy, cloud=cloud)
        if self.sync.up_to:  # the planner's K: as often as time allows
            self.every = F.every_within(sub, plan.paths, self.sync.up_to)
            sub = replace(sub, sync_every=self.every)
            plan = FP.choose(sub, pins=pins, policy=self.cfg.fleet_policy, cloud=cloud)
        self.version = next_version(self.publisher, self.version)
        self.plan, self.planned_fleet = plan, sub
        planned = set(self.planned[0]) | ({"cloud"} if self.planned[1] else set())
        for name in set(names) | ({"cloud"} if cloud else set()) - planned:  # (re)joined: its past statuses are past
            self.transport.mailbox.forget(name)
        self.planned = (tuple(names), cloud, self.roster.revision)
        self.paths = dict(zip(names, plan.paths))
        lines = F.describe(sub, plan)
        sync = f", devices averaged every {self.every} steps" if self.every else ""
        sync += f", paced to {plan.parts['pace_s']:.4f} s for average-watts budgets" if plan.parts.get("pace_s") else ""
        print(f"edge: plan v{self.version} ({plan.policy}, predicted {plan.iteration_s:.4f} s/step{sync}) for "
              f"{', '.join(names)}:\n  " + "\n  ".join(lines), flush=True)
        if self.publisher is not None:
            self.publisher.publish(self.schedule(step))

    def schedule(self, step: int) -> Schedule:
        """The current plan as the schedule topic carries it: the plan model, versioned."""
        assert self.plan is not None
        return fleet_schedule(self.plan, [(n, self.samples(n), self.paths[n]) for n in self.planned[0]],
                              units=self.units, version=self.version, step=step, cloud=self.planned[1],
                              reason=self.reason, every=self.every)

    def _why(self, names: list[str], cloud: bool) -> str:
        """Why the fleet is (re)planned, for the schedule topic: who joined or left, the cloud, a profile."""
        before, had_cloud, _ = self.planned
        if not before:
            return "first plan"
        joined, left = sorted(set(names) - set(before)), sorted(set(before) - set(names))
        why = ([f"{', '.join(joined)} joined"] if joined else []) + ([f"{', '.join(left)} left"] if left else []) + \
            (["the cloud is back"] if cloud and not had_cloud else ["the cloud is gone"] if had_cloud and not cloud else [])
        return "; ".join(why) or "a device's profile changed"

    def samples(self, name: str) -> int:
        return self.roster.devices[name].samples

    def _wait_for_fleet(self, *, cloud: bool = True) -> None:
        """Until enough devices are online and (``cloud``) the cloud with its timings, saying every
        ``timeout_s`` what it still waits for (an edge service outlives devices that are late). A
        cloud online whose timings never came is planned without, saying so."""
        n, say_at = self.cfg.fleet_devices, time.monotonic() + self.cfg.timeout_s
        while True:
            have, online = self.members(), self.transport.online()
            if len(have) >= n and (not cloud or self.cloud_usable()):
                return
            if time.monotonic() > say_at:
                say_at += self.cfg.timeout_s
                if self.roster.retry(online):  # given up on in a round but still online (it hung): again
                    continue
                if len(have) >= n and "cloud" in online:
                    print(f"edge: the cloud is online but its timings are unknown ({self.cfg.fleet_file}'s profile "
                          f"has none and it published none: set its [profile] file): planned without it", flush=True)
                    return
                print(f"edge: waiting for {n} devices ({len(have)} ready{': ' if have else ''}{', '.join(have)})"
                      f"{' and the cloud' if cloud and 'cloud' not in online else ''}", flush=True)
            time.sleep(0.1)

    def cloud_usable(self) -> bool:
        return "cloud" in self.transport.online() and not self.cloud_excluded and self.roster.cloud_known

    # ------------------------------------------------------------ the run

    def run(self) -> int:
        with ExitStack() as stack:
            if self.cfg.fleet_planner is not None:
                self.publisher = stack.enter_context(PlanPublisher(self.cfg.fleet_planner, job=self.cfg.job))
            return self._run()

    def _run(self) -> int:
        with self.connected():
            joins = "and any that publishes its profile" if self.publisher is not None else "(no [fleet] planner: " \
                "plans are not on the schedule topic and devices that publish their profile cannot join)"
            print(f"edge: fleet coordinator for the {len(self.roster.described)} devices in {self.cfg.fleet_file} "
                  f"{joins}; waiting for {self.cfg.fleet_devices} and the cloud", flush=True)
            self._wait_for_fleet()
            step, rnd_no = self._resume() if self.resume else 0, 0
            logf = open(self.cfg.fleet_log, "a" if step else "w") if self.cfg.fleet_log else None
            try:
                while step < self.cfg.iterations:
                    names = self.members()
                    if not names:
                        self._wait_for_fleet(cloud=False)
                        continue
                    cloud = self.cloud_usable()
                    if (tuple(names), cloud, self.roster.revision) != self.planned:
                        self.replan(names, cloud, step)
                    rnd = Round(rnd_no, step, self.version, self.units, tuple(
                        Member(n, self.samples(n), self.offsets.get(n, 0), self.paths[n].m, self.paths[n].k)
                        for n in names), self.every,
                        bool(self.every) and (self.window.due(self.every, step, self.cfg.iterations)
                                              or self._average_due(step)))
                    rnd_no += 1
                    t0 = time.perf_counter()
                    try:
                        loss = self.round(rnd)
                    except Redo as redo:
                        self._give_up(rnd, redo)
                        continue
                    hold = self.plan.parts.get("pace_s", 0.0) - (time.perf_counter() - t0)
                    if hold > 0:  # devices' average-watts budgets: the step is paced to keep them
                        time.sleep(hold)
                    seconds = time.perf_counter() - t0
                    for mb in rnd.members:
                        self.offsets[mb.name] = mb.offset + mb.n
                    if self.uplink is not None:
                        self.uplink.trained += rnd.batch
                    average = self._average(rnd.step) if self._average_due(rnd.step) else None
                    self._record(rnd, loss, seconds, logf, average)
                    step += 1
                    self._checkpoint_due |= bool(self.cfg.checkpoint_dir) and (
                        step == self.cfg.iterations or bool(self.cfg.checkpoint_every) and step % self.cfg.checkpoint_every == 0)
                    if self._checkpoint_due and self.window.steps == 0:  # (periodic: at a window's end)
                        self._checkpoint(step - 1)
                        self._checkpoint_due = False
            finally:
                if logf:
                    logf.close()
                for who in sorted((self.transport.online() & (set(self.roster.devices) | {"cloud"}))):
                    self.send("weights", who, rnd_no, 0, {}, stop=True)
                self.transport.flush()
            print(f"edge: {step} steps done", flush=True)
            return 0

    def _give_up(self, rnd: Round, redo: Redo) -> None:
        who = redo.who
        if who == "cloud":
            self.cloud_excluded = True
        else:
            self.roster.excluded.add(who)
            self.holding.pop(who, None)
        self.transport.mailbox.forget(who)
        why = self.transport.errors.pop(who, None)
        print(f"edge: step {rnd.step} given up in round {rnd.round}: {redo}{f' ({why})' if why else ''}; "
              f"redone without it", flush=True)

    def _average_due(self, step: int) -> bool:
        return self.uplink is not None and self.uplink.due(step)

    def _average(self, step: int) -> dict[str, Any]:
        """A hierarchical job's round after ``step`` (:class:`hiertrain.edge.uplink.Uplink`): the site's
        whole model up, the cloud's average taken in if it came."""
        assert self.uplink is not None
        average, said = self.uplink.round(step, periodic.state_of(self.params, self.optimizer, self.params))
        if average is not None:
            self.params = periodic.adopt(self.optimizer, average)
        return said

    def _record(self, rnd: Round, loss: float, seconds: float, logf: Any, average: Optional[dict[str, Any]] = None
                ) -> None:
        assert self.plan is not None
        row = {"step": rnd.step, "round": rnd.round, "version": rnd.version, "loss": loss, "seconds": seconds,
               "policy": self.plan.policy, "predicted_s": self.plan.iteration_s,
               "members": [[mb.name, mb.offset, mb.n, mb.m, mb.k] for mb in rnd.members],
               **({"every": rnd.every, "upload": rnd.upload, "fresh": sorted(self._fresh)} if rnd.every else {}),
               **({"average": average} if average else {})}
        if logf:
            logf.write(json.dumps(row) + "\n")
            logf.flush()
        whole = self.window.steps == 0 and (self.uplink is None or bool(average and "sites" in average))
        accuracy = self.scorer(rnd.step, self.params, whole=whole) if self.scorer else None  # (the model, averaged)
        self.transport.publish_json(topics.telemetry(self.cfg.job, "edge"), {
            "iteration": rnd.step, "loss": loss, "iteration_s": seconds, "role": "coordinator",
            "schedule_version": rnd.version, "policy": self.plan.policy, "predicted_s": self.plan.iteration_s,
            "fleet": row["members"], "energy": self._joules(seconds), **transport_figures(self.transport, "edge"),
            **({"accuracy": accuracy} if accuracy is not None else {})})

    def _joules(self, seconds: float) -> dict[str, Any]:
        """Every machine's joules in a step of ``seconds`` under the plan, modeled (the devices' power
        models; the edge's and the cloud's a server's): the devices measure none of their own here."""
        joules = FE.fleet_joules(self.planned_fleet, replace(self.plan, iteration_s=seconds))
        return {"joules": {k: round(v, 6) for k, v in joules.items()}, "source": "model"}

    def _checkpoint(self, step: int) -> None:
        state.save(self.cfg.checkpoint_dir, state.snapshot(step, self.params, self.optimizer, self.version, self.offsets),
                   keep=self.cfg.checkpoint_keep, transport=self.transport, keeper=self.keeper)

    def _resume(self) -> int:
        """``--resume``: continue after the newest checkpoint (:func:`hiertrain.edge.state.resumed`); none:
        from step 0."""
        found = state.resumed(self.cfg, self.spec, transport=self.transport, keeper=self.keeper)
        if found is None:
            return 0
        ck, self.optimizer, offsets, version = found
        self.params = dict(ck.params)
        self.offsets.update(offsets)
        self.version = max(self.version, version)
        print(f"edge: resuming after the checkpoint of step {ck.iteration} (run {self.run_id})", flush=True)
        return ck.iteration + 1

    # ------------------------------------------------------------ one round

    def take(self, kind: str, sender: str, rnd: int, layer: int) -> Any:  # type: ignore[override]
        """The coordinator's wait: a member gone (its Last Will, or it stopped) or silent for
        ``timeout_s`` means the round is given up."""
        deadline = time.monotonic() + self.cfg.timeout_s
        while True:
            try:
                return self.transport.take(kind, sender, rnd, layer, timeout=POLL_S)
            except TierLost as lost:
                self._lost(lost)
            except MissingMessage:
                self._check_alive(rnd, deadline, kind, sender)

    def round(self, rnd: Round) -> float:
        """One attempt at step ``rnd.step``: every member (and the cloud) gets its weights with the round,
        then the edge runs its part of the round's plan (:func:`hiertrain.interpreter.step`: each member's
        units m+1..k as its rows arrive, the loss of those with k = U, a cut's rows on to the cloud, the
        gradients back) and steps. A member or the cloud that sends what the plan does not say, goes, or
        falls silent makes it a :class:`Redo` without them."""
        P, part, U, r = self.params, self.part, self.units, rnd.round
        plan = rnd.plan()
        self._involved = {mb.name for mb in rnd.members} | ({"cloud"} if rnd.kappa < U else set())
        self.transport.advance(r)  # what is left of earlier rounds is dropped, and so is anything far ahead
        meta = rnd.to_meta()
        self._fresh = frozenset(mb.name for mb in rnd.members if rnd.every and mb.m and (
            self.window.steps == 0 or self.holding.get(mb.name) != mb.m))
        for mb in rnd.members:
            if not rnd.every:
                self.send("weights", mb.name, r, mb.m, part.weights(P, 1, mb.m), **meta)
            elif mb.name in self._fresh:  # the edge's copy, and the optimizer to continue it with
                self.send("weights", mb.name, r, mb.m, periodic.state_of(P, self.optimizer, self.spec.param_shapes(1, mb.m)),
                          **meta, sync_opt=periodic.opt_meta(self.cfg.optimizer, self.optimizer.step_count))
            else:
                self.send("weights", mb.name, r, mb.m, {}, **meta)
        if rnd.kappa < U:
            self.send("weights", "cloud", r, U, part.weights(P, rnd.kappa + 1, U), **meta)

        def samples_of(names: Any) -> str:
            return ", ".join(f"{mb.name}'s samples {mb.offset}..{mb.offset + mb.n - 1}" for mb in map(rnd.member, names))

        try:
            done = interpreter.step(plan, "edge", exchanges(plan, "edge"), part, P, _EdgeIo(self, r), at=f"step {rnd.step}",
                                    lr=self.cfg.optimizer.lr, describe=samples_of)
            uploads = {mb.name: self._upload(rnd, mb) for mb in rnd.members if rnd.upload and mb.m}
        except ProtocolError as exc:
            if not exc.sender:
                raise
            raise Redo(exc.sender, str(exc)) from None
        if not rnd.every:
            self.params = self.optimizer.step(P, done.grads)
        else:
            self._step_shared(rnd, done.grads, uploads)
        return 0.0 if done.loss is None else done.loss

    def _upload(self, rnd: Round, mb: Member) -> Params:
        """A member's copy at the end of a window (periodic sync), whole."""
        msg = self.take("weights", mb.name, rnd.round, mb.m)
        periodic.check_copy(self.spec, mb.name, mb.m, msg.tensors, self.cfg.optimizer.kind)
        return dict(msg.tensors)

    def _step_shared(self, rnd: Round, grads: Params, uploads: dict[str, Params]) -> None:
        """Periodic sync, the round done: the edge's copy steps on the mean over the rows it trained of
        each unit, and at a window's end every copy is averaged into it."""
        rows = periodic.rows_per_unit(rnd.members, self.units)[periodic.SHARED]
        mine, frozen = periodic.local_grads(self.spec, grads, rows, rnd.batch)
        self.params = self.optimizer.step(self.params, mine, frozen)
        self.window.add(rnd.members, self.units, self._fresh)
        self.holding = {mb.name: mb.m for mb in rnd.members if mb.m}
        if rnd.upload:
            shared = periodic.state_of(self.params, self.optimizer, self.params)
            self.params = periodic.adopt(self.optimizer, self.window.average(self.spec, shared, uploads))

    def _lost(self, lost: TierLost) -> None:
        if lost.tier in self._involved:
            raise Redo(lost.tier, f"{lost.tier} went {lost.state}") from lost
        self.transport.mailbox.forget(lost.tier)  # not in this round: planned out at the next

    def _check_alive(self, rnd: int, deadline: float, what: str, sender: str) -> None:
        gone = sorted(self._involved - self.transport.online())
        if gone:
            raise Redo(gone[0], f"{gone[0]} went offline")
        if time.monotonic() > deadline:
            raise Redo(sender, f"{sender} sent no {what} in round {rnd} for {self.cfg.timeout_s:g} s")


class _EdgeIo:
    """The edge's exchanges in round ``r``: waits that give the round up when a member goes or falls silent."""

    def __init__(self, edge: Coordinator, r: int) -> None:
        self.edge, self.r = edge, r

    def take(self, x: Exchange) -> Message:
        return self.edge.take(x.kind, x.peer, self.r, x.layer)

    def first(self, xs: Sequence[Exchange]) -> Exchange:
        """The first of ``xs`` to arrive: the edge works on a fast device's rows while a slow one still computes."""
        keys = [x.key(self.r) for x in xs]
        deadline = time.monotonic() + self.edge.cfg.timeout_s
        while True:
            try:
                key = self.edge.transport.mailbox.wait_any(keys, POLL_S)
            except TierLost as lost:
                self.edge._lost(lost)
                continue
            if key is not None:
                return xs[keys.index(key)]
            self.edge._check_alive(self.r, deadline, xs[0].kind, xs[0].peer)

    def send(self, x: Exchange, tensors: Params, **meta: Any) -> None:
        self.edge.send(x.kind, x.peer, self.r, x.layer, tensors, **meta)
