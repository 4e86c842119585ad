"""The fleet's coordinator, next to the broker on the edge server: membership, plan, clock, owner.

- **Membership.** The devices of the fleet file and those that publish their own profile
  (:mod:`hiertrain.edge.roster`) whose retained status says online (their Last Will says when they go).
- **Plan.** Whenever the members change, the fleet planner (:func:`hiertrain.planner.fleet.solve`)
  plans them anew (or every ``[[device]] path`` of the file pins one), as a new plan version.
- **Clock.** A round is one attempt at one SGD step; the coordinator starts it by sending every
  member the weights of its units 1..m (the cloud those of units kappa+1..U) with the round: who
  trains which samples (their offsets in each device's data are kept here) along which path.
- **Owner.** The edge owns every parameter and the optimizer: it trains each member's units
  m+1..k, the loss of members whose k = U, sums every gradient and steps
  (:mod:`hiertrain.train.fleetroles`).
- **Leaving.** A member that goes offline (or is silent for ``timeout_s``) before it has sent
  everything makes the coordinator give the round up: no step is applied, the device is planned out,
  and the same step is **redone** by the members left, on the same samples. A step is therefore
  always one SGD step over all the samples of the devices it names, and the step log says which.
- **Joining.** A device that comes online (or publishes its profile) is planned in at the next round.
- **The cloud** is planned like a member: lost (or silent) mid-round, the round is redone without
  it (every path then ends at the edge, k = U, whatever a pin said); back, it is planned in again.
- **Resuming** (``--resume``, a standby's too) continues after the newest checkpoint (:mod:`.state`).
"""

from __future__ import annotations

import json
import logging
import math
import time
import uuid
from contextlib import ExitStack
from dataclasses import replace
from typing import Any, Optional

import numpy as np

from hiertrain.net import topics
from hiertrain.errors import ConfigError, Diverged, MissingMessage, SegmentError, TierLost
from hiertrain.train.fleetroles import Member, Round
from hiertrain.train.part import Params, add_into, rows
from hiertrain.fleetservice import POLL_S, FleetService
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

log = logging.getLogger("hiertrain.edge")


class Redo(Exception):
    def __init__(self, who: str, why: str) -> None:
        super().__init__(f"{who} {why}")
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
        self.optimizer = Optimizer(cfg.optimizer, self.spec.param_shapes(), momenta=self.spec.momentum)
        self.offsets: dict[str, int] = {}  # every device's place in its data
        self.cloud_excluded = False  # the cloud given up on, until it goes offline and comes back
        self._involved: set[str] = set()
        self.planned: tuple[tuple[str, ...], bool, int] = ((), False, -1)  # devices, cloud, roster revision
        self.paths: dict[str, F.Path] = {}
        self.version = 0
        self.plan: Optional[F.FleetPlan] = None
        self.planned_fleet: Optional[F.Fleet] = None  # the fleet self.plan was made for
        self.publisher: Optional[PlanPublisher] = None
        if resume and cfg.checkpoint_dir is None:
            raise ConfigError(f"{cfg.path}: --resume needs a [checkpoint] dir to resume from")
        self.resume = resume  # from the newest checkpoint, its own or a collector's, once the fleet is here
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
        plan = FP.choose(sub, pins=pins, policy=self.cfg.fleet_policy, cloud=cloud)
        self.version = next_version(self.publisher, self.version)
        self.plan, self.planned_fleet = plan, sub
        planned = set(self.planned[0]) | ({"cloud"} if self.planned[1] else set())
        for name in set(names) | ({"cloud"} if cloud else set()) - planned:  # (re)joined: its past statuses are past
            self.transport.mailbox.forget(name)
        self.planned = (tuple(names), cloud, self.roster.revision)
        self.paths = dict(zip(names, plan.paths))
        lines = F.describe(sub, plan)
        print(f"edge: plan v{self.version} ({plan.policy}, predicted {plan.iteration_s:.4f} s/step) for "
              f"{', '.join(names)}:\n  " + "\n  ".join(lines), flush=True)
        if self.publisher is not None:
            self.publisher.publish(self.schedule(step))

    def schedule(self, step: int) -> Schedule:
        """The current plan as the schedule topic carries it: the plan model, versioned."""
        assert self.plan is not None
        return fleet_schedule(self.plan, [(n, self.samples(n), self.paths[n]) for n in self.planned[0]],
                              units=self.units, version=self.version, step=step, cloud=self.planned[1])

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
                        for n in names))
                    rnd_no += 1
                    t0 = time.perf_counter()
                    try:
                        loss = self.round(rnd)
                    except Redo as redo:
                        self._give_up(rnd, redo)
                        continue
                    seconds = time.perf_counter() - t0
                    for mb in rnd.members:
                        self.offsets[mb.name] = mb.offset + mb.n
                    self._record(rnd, loss, seconds, logf)
                    step += 1
                    if self.cfg.checkpoint_dir and (step == self.cfg.iterations or self.cfg.checkpoint_every
                                                    and step % self.cfg.checkpoint_every == 0):
                        self._checkpoint(step - 1)
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
        self.transport.mailbox.forget(who)
        why = self.transport.errors.pop(who, None)
        print(f"edge: step {rnd.step} given up in round {rnd.round}: {redo}{f' ({why})' if why else ''}; "
              f"redone without it", flush=True)

    def _record(self, rnd: Round, loss: float, seconds: float, logf: Any) -> None:
        assert self.plan is not None
        row = {"step": rnd.step, "round": rnd.round, "version": rnd.version, "loss": loss, "seconds": seconds,
               "policy": self.plan.policy, "predicted_s": self.plan.iteration_s,
               "members": [[mb.name, mb.offset, mb.n, mb.m, mb.k] for mb in rnd.members]}
        if logf:
            logf.write(json.dumps(row) + "\n")
            logf.flush()
        self.transport.publish_json(topics.telemetry(self.cfg.job, "edge"), {
            "iteration": rnd.step, "loss": loss, "iteration_s": seconds, "role": "coordinator",
            "schedule_version": rnd.version, "policy": self.plan.policy, "predicted_s": self.plan.iteration_s,
            "fleet": row["members"], "energy": self._joules(seconds)})

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
        P, part, U, r = self.params, self.part, self.units, rnd.round
        cloud = rnd.kappa < U
        self._involved = {mb.name for mb in rnd.members} | ({"cloud"} if cloud else set())
        self.transport.advance(r)  # what is left of earlier rounds is dropped, and so is anything far ahead
        meta = rnd.to_meta()
        for mb in rnd.members:
            self.send("weights", mb.name, r, mb.m, part.weights(P, 1, mb.m), **meta)
        if cloud:
            self.send("weights", "cloud", r, U, part.weights(P, rnd.kappa + 1, U), **meta)
        grads: Params = {}
        loss = 0.0
        groups = dict(rnd.cloud_groups())
        left = {k: len(g) for k, g in groups.items()}
        at_cut: dict[str, tuple[np.ndarray, Any]] = {}
        labels: dict[str, np.ndarray] = {}
        for mb in self.arrivals(rnd):                          # forward, each member as its input arrives
            x, y = self.rows_of(mb, "samples" if mb.m == 0 else "act", r)
            labels[mb.name] = y
            if mb.k == U:
                w = rnd.weight(mb.n)
                try:
                    part_loss, gm, g = part.loss(P, mb.m + 1, x, y, w)
                except SegmentError as exc:
                    raise SegmentError(f"edge: step {rnd.step}, training {mb.name}'s samples "
                                       f"{mb.offset}..{mb.offset + mb.n - 1}: {exc}") from None
                self._finite(rnd, part_loss, f"the loss of {mb.name}'s samples {mb.offset}..{mb.offset + mb.n - 1}")
                loss += w * part_loss
                add_into(grads, g)
                if mb.m:
                    self.send("grad", mb.name, r, mb.m, {"x": gm})
                continue
            at_cut[mb.name] = part.forward(P, mb.m + 1, mb.k, x)
            left[mb.k] -= 1
            if not left[mb.k]:                                 # the cut's last member: on to the cloud
                self._to_cloud(r, mb.k, [at_cut[o.name][0] for o in groups[mb.k]],
                               rows([labels[o.name] for o in groups[mb.k]]))
        for k, group in groups.items():                        # the cloud's gradients, back down
            gk = self.take("grad", "cloud", r, k).tensors["x"] if k > 0 else None
            start = 0
            for mb in group:
                _, stash = at_cut[mb.name]
                if gk is not None:  # (k = 0: the cloud trained all of it)
                    gm, g = part.backward(P, mb.m + 1, mb.k, stash, gk[start:start + mb.n])
                    add_into(grads, g)
                    if mb.m:
                        self.send("grad", mb.name, r, mb.m, {"x": gm})
                start += mb.n
        if cloud:
            msg = self.take("wgrad", "cloud", r, U)
            add_into(grads, msg.tensors)
            part_loss = float(msg.meta.get("loss", math.nan))
            self._finite(rnd, part_loss, "the cloud's loss of " + ", ".join(
                f"{mb.name}'s samples" for _, group in groups.items() for mb in group))
            loss += part_loss
        for mb in rnd.members:                                 # the devices' parameter gradients
            if mb.m:
                msg = self.take("wgrad", mb.name, r, mb.m)
                add_into(grads, msg.tensors)
                if mb.m == U:
                    part_loss = float(msg.meta.get("loss", math.nan))
                    self._finite(rnd, part_loss, f"the loss {mb.name} computed on its samples "
                                                 f"{mb.offset}..{mb.offset + mb.n - 1}")
                    loss += part_loss
        self.params = self.optimizer.step(P, grads)
        return loss

    def _finite(self, rnd: Round, loss: float, what: str) -> None:
        """A loss that is not finite ends the run, naming whose samples gave it (the devices' own
        sends are checked where they leave)."""
        if not math.isfinite(loss):
            raise Diverged(f"edge: training diverged in step {rnd.step}: {what} is {loss}; lower the learning "
                           f"rate (now {self.cfg.optimizer.lr}) or check that device's data")

    def arrivals(self, rnd: Round) -> Any:
        """The members whose input the edge continues (m < U), each as soon as its activations (or
        samples) are here: the edge works on a fast device's while a slow one still computes."""
        waiting = {("samples" if mb.m == 0 else "act", rnd.round, mb.m, mb.name): mb for mb in rnd.members
                   if mb.m < self.units}
        deadline = time.monotonic() + self.cfg.timeout_s
        while waiting:
            try:
                key = self.transport.mailbox.wait_any(list(waiting), POLL_S)
            except TierLost as lost:
                self._lost(lost)
                continue
            if key is not None:
                yield waiting.pop(key)
                deadline = time.monotonic() + self.cfg.timeout_s
                continue
            self._check_alive(rnd.round, deadline, "activations", next(iter(waiting))[3])

    def _lost(self, lost: TierLost) -> None:
        if lost.tier in self._involved:
            raise Redo(lost.tier, f"went {lost.state}") from lost
        self.transport.mailbox.forget(lost.tier)  # not in this round: planned out at the next

    def _check_alive(self, rnd: int, deadline: float, what: str, sender: str) -> None:
        gone = sorted(self._involved - self.transport.online())
        if gone:
            raise Redo(gone[0], "went offline")
        if time.monotonic() > deadline:
            raise Redo(sender, f"sent no {what} in round {rnd} for {self.cfg.timeout_s:g} s")

    def rows_of(self, mb: Member, kind: str, r: int) -> tuple[np.ndarray, np.ndarray]:
        """A member's input rows and labels (they travel together), each one per sample it trains in
        this round: a member that sends another count is faulty (or hostile), and the round is redone
        without it."""
        t = self.take(kind, mb.name, r, mb.m).tensors
        for name, what in (("x", kind), ("y", "labels")):
            n = len(t[name]) if name in t else 0
            if n != mb.n:
                raise Redo(mb.name, f"sent {n} rows of {what} for its {mb.n} samples")
        return t["x"], t["y"]

    def _to_cloud(self, r: int, k: int, parts: list[np.ndarray], labels: np.ndarray) -> None:
        if k == 0:  # raw samples: as stored if they all are, else as the model's input
            from hiertrain.train.data import normalize

            same = len({p.dtype for p in parts}) == 1
            self.send("samples", "cloud", r, 0, {"x": rows(parts if same else [normalize(p) for p in parts]),
                                                 "y": labels})
        else:
            self.send("act", "cloud", r, k, {"x": rows(parts), "y": labels})
