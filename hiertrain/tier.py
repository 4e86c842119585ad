"""A tier service of the three-tier job: runs HierTrain iterations over MQTT in whatever role each
schedule gives it.

Its pieces, one concept each: the run as the topics describe it (:mod:`hiertrain.runview`); who
drives the iterations (:mod:`hiertrain.clock`: the device, with the data, in
:mod:`hiertrain.device.clock`; the others follow its samples messages); the units this tier owns
and their handover (:mod:`hiertrain.holding`); checkpoints, replicas and resuming
(:mod:`hiertrain.statekeeper`); carrying on without a lost tier (:mod:`hiertrain.failover`).

Every role runs the one interpreter (:func:`hiertrain.interpreter.step`, which a fleet's services
run too) on the plan model's sample groups (:mod:`hiertrain.plan`) and this tier's exchanges in them
(:func:`hiertrain.exchanges.exchanges`): the clock's samples are the rows of the groups it starts,
the clock's labels those of the losses it computes. An owner (worker_o; a chain's stage, of its own
units) then steps its optimizer with the gradients the interpreter summed and sends the next
iteration's replicas their weights; checkpoints every K iterations. HierTrain's o, s and l (paper
IV-B) and the stages of a layer chain (JointDNN, JointDNN+, JALAD) are such plans.

Every wait has a timeout that names the tier, iteration and message; the service then stops
with status ``failed`` and its last checkpoint intact.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Optional, Sequence

import numpy as np

from hiertrain.clock import Clock, Follower
from hiertrain.device.clock import DeviceClock
from hiertrain.meters import EnergyConfig
from hiertrain.errors import Diverged, HiertrainError, PlanError, ProtocolError, TierLost
from hiertrain import interpreter
from hiertrain.exchanges import Exchange, exchanges
from hiertrain.interpreter import Io, Stats
from hiertrain.plan import Group, Plan
from hiertrain.failover import Failover
from hiertrain.holding import Holding
from hiertrain.net import topics
from hiertrain.net.wire import Message
from hiertrain.runview import RunView
from hiertrain.schedule import Schedule
from hiertrain.service import check_finite, open_service, transport_figures
from hiertrain.statekeeper import StateKeeper
from hiertrain.tierconfig import TierConfig
from hiertrain.train import models
from hiertrain.train.evaluate import scorer
from hiertrain.train.part import Part

log = logging.getLogger("hiertrain.tier")

IDLE_TELEMETRY_EVERY = 2  # the device paces idle tiers by their reports, allowing them window / 2 of lag


class TierService:
    def __init__(self, cfg: TierConfig, *, resume: bool = False) -> None:
        self.cfg, self.tier, self.resume = cfg, cfg.tier, resume
        self.spec = models.get(cfg.model)
        self.transport, self.supply, self.runtime = open_service(cfg, self.spec, account=cfg.tier)
        self.view = RunView(self.transport, tier=cfg.tier, n_units=self.spec.n_units, batch=cfg.batch,
                            timeout_s=cfg.timeout_s)
        self.holding = Holding(self.spec, cfg.tier, batch=cfg.batch, optimizer=cfg.optimizer, seed=cfg.seed)
        self.state = StateKeeper(cfg, self.view, self.holding)
        self.scorer = scorer(cfg, self.spec)  # [eval] every: the model's owner scores its weights
        self.energy = cfg.energy or EnergyConfig()
        self.meter = self.energy.meter()  # joules per step in telemetry
        self.clock: Clock = DeviceClock(cfg, self.spec, self.view, self.state, send=self._send, resume=resume) \
            if cfg.tier == "device" else Follower(self.view, timeout_s=cfg.timeout_s)
        self.failover = Failover(self.view, self.clock, self.state, reset=self._reset)
        self.part = Part(self.spec, self.runtime)  # what this tier computes of a sample group
        self.history: dict[int, Schedule] = {}  # iteration -> schedule it ran
        self._weights_sent = -1
        self._plans: dict[tuple[int, str], tuple[Plan, tuple[Exchange, ...]]] = {}  # schedule -> its plan, our exchanges
        self._shown_version: tuple[int, str] = (-1, "")  # progress lines
        self._shown_at = 0.0

    def _reset(self) -> None:
        """A failover abandons the attempt: nothing computed in it is kept (the state keeper has the state)."""
        self.holding.clear()
        self.history.clear()
        self._weights_sent = -1

    # ------------------------------------------------------------------ plumbing

    def _send(self, kind: str, dest: str, iteration: int, layer: int, tensors: dict[str, np.ndarray],
              version: int, *, bulk: bool = False, **meta: Any) -> None:
        check_finite(self.tier, f"at iteration {iteration}", kind, dest, tensors, self.cfg.optimizer.lr)
        self.transport.send(Message(kind, self.cfg.job, self.tier, dest, iteration, layer, tensors, version,
                                    {"run": self.view.run_id, **meta}), bulk=bulk)

    def _take(self, kind: str, sender: str, iteration: int, layer: int, stats: Optional[Stats] = None) -> Message:
        t0 = time.perf_counter()
        msg = self.transport.take(kind, sender, iteration, layer, timeout=self.cfg.timeout_s)
        if stats is not None:
            stats.wait_s += time.perf_counter() - t0
        return msg

    # --------------------------------------------------------------- ownership

    def _acquire(self, i: int, sched: Schedule, prev: Schedule, stats: Stats) -> None:
        """Hold exactly the units ``sched`` gives us: at the run's first iteration from the initial
        weights or the state it resumes from, later from their previous owners."""
        owned = self.holding.owned(sched, self.tier)
        if owned == self.holding.units:
            return  # nothing moves (most iterations)
        first = i == self.view.run_start()
        missing = owned - self.holding.units
        if not first and i == self.view.first and missing:
            raise PlanError(f"{self.tier}: joined run {self.view.run_id} at iteration {i} as the owner of units "
                            f"{sorted(missing)}, but who held them before is not known here; restart this tier")

        def take(tier: str) -> tuple[dict[str, np.ndarray], Optional[int]]:
            msg = self._take("weights", tier, i, 0, stats)
            step = msg.meta.get("optimizer_step")
            return msg.tensors, None if step is None else int(step)

        start = (lambda: self.state.resume_state(i, failed_over=self.failover.count > 0)) if first else None
        self.holding.acquire(sched, prev, start=start, take=take)

    def _end(self, i: int, sched: Schedule) -> None:
        """After our update in iteration ``i``: pass on what the next iteration needs from us (the
        units we lose under its schedule to their next owners; as o, s's and l's weights)."""
        nxt = self.clock.schedule_of(i + 1)
        if nxt is None:
            return
        for tier, (tensors, step) in self.holding.hand_over(sched, nxt).items():
            self._send("weights", tier, i + 1, 0, tensors, nxt.version, optimizer_step=step)
        if nxt.chain is None and nxt.tier_of("o") == self.tier and \
                self.holding.owned(sched, self.tier) == self.holding.owned(nxt, self.tier):
            self._send_weights(i + 1, nxt)  # pipelined: s and l get them while the device prepares i + 1

    # ------------------------------------------------------------------- a step

    def iteration(self, i: int) -> Optional[dict[str, Any]]:
        """Run iteration ``i``; ``None`` when the device said stop."""
        stats = Stats()
        t_start = time.perf_counter()
        self.transport.advance(i)
        begun = self.clock.begin(i, lambda *key: self._take(*key, stats))
        if begun is None:
            return None
        sched, mine, labels = begun
        self.history[i] = sched
        prev = self.history.get(i - 1, sched) if i > self.view.first else sched
        self._acquire(i, sched, prev, stats)
        out: dict[str, Any] = {"iteration": i, "schedule_version": sched.version}
        out["role"] = self._role(sched)
        out.update(self._step(i, sched, mine, labels, stats))
        if self.holding.units:
            self._end(i, sched)
        if "loss" in out:
            if not math.isfinite(out["loss"]):  # fail now, naming the cause, not later on a dropped message
                raise Diverged(f"{self.tier}: training diverged at iteration {i} (loss {out['loss']}); "
                                f"lower the learning rate (now {self.cfg.optimizer.lr})")
            self.view.done = max(self.view.done, i)
        out["iteration_s"] = time.perf_counter() - t_start
        out["wait_s"] = stats.wait_s
        out["phases"] = stats.phases
        out["cpu_s"], out["compute_cpu_s"] = stats.cpu_s(), stats.compute_cpu_s
        out["energy"] = self.meter.step(out["iteration_s"], sum(stats.phases.values()), self.transport.sent_bytes,
                                        self.transport.received_bytes)  # this step's joules, and their source
        if self.clock.reports_always or stats.phases or "loss" in out or i % IDLE_TELEMETRY_EVERY == 0 \
                or (sched.version, sched.policy) != self._shown_version:
            self._telemetry(out)
        self._progress(i, sched, out)
        return out

    def _progress(self, i: int, sched: Schedule, out: dict[str, Any]) -> None:
        """What a person watching the service wants: a line whenever this tier starts a schedule,
        and from whoever computes the loss a line per iteration (at most one a second, and the last)."""
        if (sched.version, sched.policy) != self._shown_version:
            self._shown_version = (sched.version, sched.policy)
            print(f"{self.tier}: schedule v{sched.version} from iteration {i}: {out.get('role', 'idle')} "
                  f"({sched.describe()})", flush=True)
        now = time.monotonic()
        last = i == self.clock.end_at - 1  # the run's final loss is always shown
        if "loss" in out and (now - self._shown_at >= 1.0 or out["iteration_s"] >= 1.0 or last):
            self._shown_at = now
            print(f"{self.tier}: iteration {i} loss {out['loss']:.4f} {out['iteration_s'] * 1e3:.0f} ms "
                  f"(schedule v{sched.version}, run {self.view.run_id})", flush=True)

    # ------------------------------------------------------- the interpreter

    def _io(self, i: int, sched: Schedule, stats: Stats) -> Io:
        """This tier's exchanges in iteration ``i`` over MQTT (every wait counted in ``stats``)."""
        tier = self

        class _Io:
            def take(self, x: Exchange) -> Message:
                return tier._take(x.kind, x.peer, i, x.layer, stats)

            def first(self, xs: Sequence[Exchange]) -> Exchange:
                t0 = time.perf_counter()
                keys = [x.key(i) for x in xs]
                key = tier.transport.mailbox.wait_any(keys, tier.cfg.timeout_s)
                stats.wait_s += time.perf_counter() - t0
                return xs[0] if key is None else xs[keys.index(key)]

            def send(self, x: Exchange, tensors: dict[str, np.ndarray], **meta: Any) -> None:
                tier._send(x.kind, x.peer, i, x.layer, tensors, sched.version, **meta)

        return _Io()

    def _role(self, sched: Schedule) -> str:
        """What a person reads this tier does under ``sched``: o, s or l, a chain's stage k of n, or idle."""
        if sched.chain is None:
            return sched.role_of(self.tier)
        k = next((n for n, st in enumerate(sched.chain) if st.tier == self.tier), None)
        return "idle" if k is None else f"stage {k + 1} of {len(sched.chain)}"

    def _step(self, i: int, sched: Schedule, mine: Optional[np.ndarray], labels: Any, stats: Stats) -> dict[str, Any]:
        """This tier's part of step ``i``, whatever the plan makes it (worker_o, s or l, a chain's stage):
        :func:`hiertrain.interpreter.step` on its exchanges, the clock's samples as the rows of the groups
        it starts; as an owner, the update, checkpoint and replicas after."""
        (plan, xs), held = self._plan(sched), self.holding
        owner = bool(plan.owned(self.tier))
        if owner and self._weights_sent != i:  # first iteration, or we just became o: s and l wait for their weights
            self._send_weights(i, sched)
        starts = {g.name: mine for g in plan.groups if (st := g.stage_of(self.tier)) is not None and st.first == 1}
        done = interpreter.step(plan, self.tier, xs, self.part, held.params, self._io(i, sched, stats), local=starts,
                                labels=lambda g: self._labels(plan, g, labels, i, sched), stats=stats,
                                at=f"iteration {i}", lr=self.cfg.optimizer.lr)
        out: dict[str, Any] = {} if done.loss is None else {"loss": done.loss}
        if owner:
            t0 = stats.mark()
            held.params = held.optimizer.step(held.params, done.grads)
            if len(plan.owned(self.tier)) == self.spec.n_units:  # the model's owner
                self.state.completed = i
                accuracy = self.scorer(i, held.params) if self.scorer else None
                if accuracy is not None:
                    out["accuracy"] = accuracy
            stats.timed("update", t0)
            self.state.checkpoint(i, sched)  # after the gradients went back: off the critical path
            self.state.replicate(i, sched)
        return out

    def _labels(self, plan: Plan, g: Group, labels: Any, i: int, sched: Schedule) -> np.ndarray:
        """Group ``g``'s labels, from the batch's the clock has."""
        y = labels() if callable(labels) else labels
        if len(y) != plan.batch:
            raise ProtocolError(f"{self.tier}: got {len(y)} labels in iteration {i}, schedule v{sched.version} "
                                f"says {plan.batch}")
        start = plan.start_of(g.name)
        return y[start:start + g.samples]

    def _send_weights(self, i: int, sched: Schedule) -> None:
        """o: s's and l's weights of iteration ``i`` (units 1..their cut)."""
        plan, xs = self._plan(sched)
        interpreter.send_weights(plan, xs, self.part, self.holding.params,
                                 lambda x, tensors: self._send(x.kind, x.peer, i, x.layer, tensors, sched.version))
        self._weights_sent = i

    def _plan(self, sched: Schedule) -> tuple[Plan, tuple[Exchange, ...]]:
        """``sched`` in the plan model and this tier's exchanges under it (a schedule version never
        changes: computed once, not every iteration)."""
        key = (sched.version, sched.policy)  # (a fallback shares its planner version's number)
        if key not in self._plans:
            plan = sched.plan(units=self.spec.n_units, batch=self.cfg.batch)
            self._plans[key] = plan, exchanges(plan, self.tier)
        return self._plans[key]

    def _telemetry(self, out: dict[str, Any]) -> None:
        payload = {**out, "run": self.view.run_id, **transport_figures(self.transport, self.tier)}
        if self.tier == "device":
            payload.update(self.energy.budgets_now())  # budget_j, budget_w: the planner keeps to them
        self.transport.publish_json(topics.telemetry(self.cfg.job, self.tier), payload)

    # ---------------------------------------------------------------------- run

    def run(self) -> int:
        self.state.open(resume=self.resume)
        with self.transport, self.supply.serving(self.spec, self.runtime.root):
            if self.cfg.profile is not None:  # the device's data says what a sample weighs on the wire
                self.transport.publish_json(topics.profile(self.cfg.job, self.tier),
                                            {**self.cfg.profile, **self.clock.profile()}, retain=True)
            self.state.keeper.start()
            try:
                i = self.view.first = self.clock.start(failed_over=False)
                self.clock.end_at = i + self.cfg.iterations
                log.info("%s: starting at iteration %d", self.tier, i)
                while True:
                    try:
                        while self.iteration(i) is not None:
                            i += 1
                        break
                    except TierLost as exc:
                        i = self.view.first = self.failover.until_resumed(exc, i)
                self.state.linger()
                self.transport.flush(self.cfg.timeout_s)
                return 0
            except HiertrainError as exc:
                log.error("%s: %s", self.tier, exc)
                self.transport.status_extra["error"] = str(exc)  # the status on the way out says why
                raise
            finally:
                self.state.keeper.stop()


def run_tier(tier: str, config: str, *, resume: bool = False, profile: Optional[dict[str, Any]] = None) -> int:
    """``hiertrain <tier> run --config F``."""
    from dataclasses import replace

    from hiertrain import tierconfig

    cfg = tierconfig.load(tier, config)
    return TierService(replace(cfg, profile=profile or cfg.profile), resume=resume).run()
