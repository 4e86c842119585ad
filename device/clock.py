"""The device drives a three-tier job: its data, the iterations' stamps, the run, and their pace.

For every iteration i it picks the newest schedule in effect at i and sends each other tier a
``samples`` message for i (its share of the batch, possibly none) stamped with that schedule's
version: the stamp is how all tiers agree which schedule an iteration runs, so a switch never
happens mid-iteration and no iteration is lost or repeated. It sends iteration i+1's samples while
i runs (the only input of an iteration that does not depend on the previous one), as bulk behind
the running iteration's activations and gradients; the labels ride in the samples message to
worker_o (or a chain's last stage). It waits for iteration i-1's loss before it starts i + 1, and
for no tier to lag more than half its mailbox window. The interface is :class:`hiertrain.clock.Clock`.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Callable, Optional

import numpy as np

from hiertrain import TIERS
from hiertrain.clock import Begun
from hiertrain.errors import MissingMessage, PlanError
from hiertrain.net import topics
from hiertrain.net.compress import pack_samples, sample_tensors
from hiertrain.runview import RunView
from hiertrain.schedule import Schedule
from hiertrain.statekeeper import StateKeeper
from hiertrain.tierconfig import TierConfig
from hiertrain.train.data import normalize
from hiertrain.train.models import ModelSpec

OTHERS = ("edge", "cloud")


class DeviceClock:
    reports_always = True  # the device's telemetry is the job's progress

    def __init__(self, cfg: TierConfig, spec: ModelSpec, view: RunView, state: StateKeeper, *,
                 send: Callable[..., None], resume: bool) -> None:
        self.cfg, self.view, self.state, self.send, self.resume = cfg, view, state, send, resume
        self.transport = view.transport
        self.dataset = cfg.training_data(spec)
        for tier in OTHERS:  # the others' progress (not its own: it would only come back)
            self.transport.subscribe(topics.telemetry(cfg.job, tier))
        self.sent: set[int] = set()
        self.local: dict[int, tuple[Schedule, np.ndarray, np.ndarray]] = {}  # iteration -> our part
        self.stamped: dict[int, Schedule] = {}  # iteration -> the schedule it runs (the last few)
        self.end_at = 0  # the run stops here (set once: a failover does not move it)
        self.without: frozenset[str] = frozenset()  # lost tiers no planner planned around: the fallback's
        self.released: Optional[float] = None  # when the last samples left (a paced schedule holds the next)

    # ------------------------------------------------------------------ the run

    def start(self, *, failed_over: bool) -> int:
        """A new run: at 0, or after the newest state anyone holds when resuming (or failing over)."""
        if not failed_over:
            self._wait_online()  # retained statuses (and checkpoints) arrive with it
        self.transport.mailbox.follow(self.view.run_id)
        start = self.state.newest_announced() + 1 if self.resume or failed_over else 0
        # pace the run by the tiers here now (one that joins later, from its first report on)
        self.view.reached = {t: start - 1 for t in self.transport.online() & set(TIERS) - {"device"}}
        # a new run: the planner restarts its iteration count there; tiers and logs name it, and the
        # tiers not here as it starts, which it never waits for (a follower then abandons it for none)
        self.transport.status_extra.update(run=self.view.run_id, start_iteration=start,
                                           run_without=sorted(set(OTHERS) - self.transport.online()))
        self.transport.publish_status("online")
        return start

    def _wait_online(self) -> None:
        """Start only once edge and cloud listen (an early message would be lost)."""
        deadline = time.monotonic() + 10 * self.cfg.timeout_s
        while not set(OTHERS) <= self.transport.online():
            if time.monotonic() > deadline:
                missing = sorted(set(OTHERS) - self.transport.online())
                raise MissingMessage(kind="status online", sender=missing[0], iteration=self.view.first, layer=0,
                                     timeout=10 * self.cfg.timeout_s)
            self.view.pump(0.1)

    def abandon(self, lost: str, at: int) -> None:
        """A failover: a new run, once every survivor has abandoned the old one."""
        abandoned = self.view.run_id
        self.sent.clear()
        self.local.clear()
        self.stamped.clear()
        self.view.run_id = uuid.uuid4().hex[:8]
        self._await_survivors(abandoned, lost, at)

    def _await_survivors(self, abandoned: str, lost: str, at: int) -> None:
        """Wait for a schedule that gives no work to a tier that is not online, and for the status
        of every online tier that followed the abandoned run to say it abandoned it (so that its
        announced state is the one to resume from). A tier back as a new process holds nothing of
        that run: it is not waited for (if it followed the attempt by mistake, the new run's first
        message tells it, :data:`~hiertrain.net.mailbox.NEW_RUN`)."""
        view = self.view
        deadline = time.monotonic() + self.cfg.timeout_s
        while True:
            view.pump(0.05)
            alive = (self.transport.online() & set(TIERS)) | {"device"}
            newest = view.newest()
            plan_ok = newest is not None and newest.working <= alive
            waiting = sorted(t for t in alive - {"device"}
                             if view.followed.get(t) == abandoned and view.abandoned.get(t) != abandoned)
            if plan_ok and not waiting:
                break
            if time.monotonic() > deadline and not waiting and newest is not None and self._fall_back(newest, alive):
                break
            if time.monotonic() > deadline:
                what = "a schedule without the lost tier" if not plan_ok else f"the {waiting[0]} to fail over"
                raise MissingMessage(kind=what, sender="planner" if not plan_ok else waiting[0], iteration=at,
                                     layer=0, timeout=self.cfg.timeout_s)
        view.before_run = set(view.schedules)  # the newest schedule applies from the new run's start

    def _fall_back(self, newest: Schedule, alive: set[str]) -> bool:
        """No planner planned around the lost tiers in ``timeout_s``: the run goes on under the schedule
        every survivor computes itself (:meth:`hiertrain.schedule.Schedule.without`), named in each samples
        message, until a planner's schedule needs none of them. Whether there is one."""
        lost = frozenset(newest.working - alive)
        try:
            fallback = newest.without(lost)
        except PlanError:
            return False
        self.without = lost
        print(f"device: no schedule without the {', '.join(sorted(lost))} came in {self.cfg.timeout_s:g} s (is the "
              f"planner running?): carrying on under one the survivors compute themselves: {fallback.describe()}",
              flush=True)
        return True

    def _schedule(self, iteration: int) -> tuple[Schedule, dict[str, Any]]:
        """The schedule ``iteration`` runs, and what its samples messages say of it: the planner's in effect,
        or its fallback without lost tiers it still needs."""
        sched = self.view.in_effect(iteration)
        if self.without & sched.working:
            return sched.without(self.without), {"without": sorted(self.without)}
        return sched, {}

    # --------------------------------------------------------------- iterations

    def begin(self, i: int, take: Any = None) -> Optional[Begun]:
        """Iteration ``i``'s part here, once the one before finished; ``None`` at the run's end."""
        if i >= self.end_at:
            self._send_samples(i, stop=True)
            self.transport.flush(self.cfg.timeout_s)
            return None
        self._send_samples(i)
        self._wait_done(i - 1)  # flow control: at most one iteration in flight ahead of o
        self._hold(i)
        self._send_samples(i + 1, stop=i + 1 >= self.end_at, ahead=True)  # prefetch: travels while i computes
        self.stamped = {k: s for k, s in self.stamped.items() if k >= i - 1}
        return Begun(*self.local.pop(i))

    def _hold(self, i: int) -> None:
        """A schedule paced for the device's average watts (its ``pace_s``): the samples of the next
        iteration leave no sooner than ``pace_s`` after the previous ones, so no step is shorter (held
        at most half of ``timeout_s``: the other tiers wait for those samples no longer than that)."""
        sched = self.stamped.get(i)
        pace = sched.extra.get("pace_s") if sched is not None else None
        if isinstance(pace, (int, float)) and self.released is not None:
            time.sleep(max(0.0, min(float(pace), self.cfg.timeout_s / 2) - (time.monotonic() - self.released)))
        self.released = time.monotonic()

    def schedule_of(self, i: int) -> Optional[Schedule]:
        return self.local[i][0] if i in self.local else None

    def _send_samples(self, iteration: int, *, stop: bool = False, ahead: bool = False) -> None:
        """Samples of ``iteration`` to every other tier, stamped with the version; the labels ride
        in the message to the tier that computes the loss (one message fewer a step). ``ahead``:
        sent while the iteration before runs, behind its activations and gradients (bulk)."""
        if iteration in self.sent:
            return
        self.sent.add(iteration)
        if stop:
            for tier in OTHERS:
                self.send("samples", tier, iteration, 0, {}, 0, stop=True)
            return
        sched, said = self._schedule(iteration)
        self.stamped[iteration] = sched
        x, y = self.dataset.batch_raw(iteration, self.cfg.batch, seed=self.cfg.seed)  # uint8 images travel as such
        if sched.chain is None:
            parts = dict(zip("osl", np.split(x, [sched.b_o, sched.b_o + sched.b_s])))
            share = {t: parts[sched.role_of(t)] for t in TIERS}
            labels_to = sched.tier_of("o")
        else:  # a chain: every sample goes to the first stage, the labels to the last
            share = {t: (x if t == sched.chain[0].tier else x[:0]) for t in TIERS}
            labels_to = sched.chain[-1].tier
        for tier in OTHERS:
            tensors, codec = sample_tensors(share[tier], self.cfg.compress_samples)
            if tier == labels_to:
                tensors["y"] = y
            self.send("samples", tier, iteration, 0, tensors, sched.version, bulk=ahead and bool(tensors), **codec,
                      **said)
        self.local[iteration] = (sched, normalize(share["device"]), y)

    def _wait_done(self, iteration: int) -> None:
        """Wait until ``iteration`` is finished (o's telemetry says so), so that an idle device does
        not race ahead stamping iterations with a schedule that is about to change; and until no
        tier lags more than half its mailbox window behind: nothing else paces an idle tier, and
        it refuses frames more than the window ahead of it."""
        view, mailbox = self.view, self.transport.mailbox
        lag = mailbox.window // 2
        deadline = time.monotonic() + 10 * self.cfg.timeout_s
        while iteration >= view.first:
            online = self.transport.online()
            behind = [t for t, it in view.reached.items() if t in online and it < iteration - lag]
            if view.done >= iteration and not behind:
                return
            mailbox.check_lost(f"the loss of iteration {iteration}" if view.done < iteration else
                               f"the {behind[0]} to finish iteration {iteration - lag}")
            if time.monotonic() > deadline:
                if view.done >= iteration:
                    raise MissingMessage(kind="telemetry", sender=behind[0], iteration=iteration - lag, layer=0,
                                         timeout=10 * self.cfg.timeout_s)
                sched = self.stamped.get(iteration)
                finisher = "o" if sched is None else sched.chain[-1].tier if sched.chain else sched.tier_of("o")
                raise MissingMessage(kind="telemetry (loss)", sender=finisher, iteration=iteration, layer=0,
                                     timeout=10 * self.cfg.timeout_s)
            view.pump(0.05)

    def profile(self) -> dict[str, Any]:
        """What a sample weighs on the wire: as stored, or compressed (measured on a few batches)."""
        if not (self.cfg.compress_samples and self.dataset.images.dtype == np.uint8):
            return {"sample_bytes": self.dataset.sample_bytes}
        x = np.concatenate([self.dataset.batch_raw(i, self.cfg.batch, seed=self.cfg.seed)[0] for i in range(4)])
        return {"sample_bytes": round(len(pack_samples(x)) / len(x), 1)}
