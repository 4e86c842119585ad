"""Failover: when a tier other than the device is lost mid-run, the survivors carry on without it.

The design, in the tier services (:class:`hiertrain.tier.TierService` mixes this in):

- **State replicas.** The planner puts K (``replica_every``, :func:`hiertrain.planner.costmodel.replica_every`)
  in every schedule: a worker_o other than the device sends the device a replica of its state
  (weights, optimizer moments and step) after every K-th iteration, off the critical path; in a
  layer chain every stage sends the replica of its own units. The device keeps the newest whole
  state in memory (:class:`hiertrain.train.collect.Keeper`).
- **Detection.** A tier's Last Will (or its ``failed`` status) ends every wait on it at once
  (:class:`hiertrain.errors.TierLost`); the planner sees the same status and plans around it.
- **Carrying on.** Every survivor abandons the run's current attempt: it keeps the newest state it
  can vouch for (worker_o its live state after its last update, the device its newest replica,
  anyone its newest checkpoint on disk), announces it in its status with the run it abandoned, and
  empties its mailbox, refusing from then on anything of the abandoned run still in flight. The
  device waits for a schedule that needs no lost tier and for every survivor's announcement, then
  starts a new run at the iteration after the newest announced state, exactly as ``--resume``
  does: the new owner of the model takes that state (fetching it from whoever announced it), and
  the iterations after it are redone with the same samples, so the result equals an
  uninterrupted run. At most K iterations are redone when worker_o was lost, none otherwise.
- **Rejoining.** A lost tier that comes back follows the device's current run from the next
  samples it gets, idle until the planner gives it work again (which it does once the tier's
  status says online).

Not covered: the loss of the device (the data source: the run ends, ``--resume`` continues), and
chain schedules (their stages are not replicated: the run ends as before).
"""

from __future__ import annotations

import time
import uuid
from typing import TYPE_CHECKING, Optional

from hiertrain import TIERS
from hiertrain.train import checkpoint
from hiertrain.errors import MissingMessage, TierLost
from hiertrain.net.mailbox import NEW_RUN, RESTARTED

if TYPE_CHECKING:
    from hiertrain.schedule import Schedule


class Failover:
    """The failover half of a tier service (mixed into :class:`hiertrain.tier.TierService`)."""

    def _replicate(self, i: int, sched: "Schedule") -> None:
        """After our update of ``i``, every K-th iteration: worker_o sends the device a replica of
        its state; in a chain every stage sends the state of its units (the device's own part goes
        straight to its keeper), and the device holds the iteration once the parts cover the model."""
        k = sched.replica_every
        if not k or (i + 1) % k:
            return
        if self.tier == "device" and sched.chain is None:
            return  # worker_o on the device: its live state is what a failover resumes from
        if self.tier != "device" and "device" not in self.online:
            return
        opt = self.optimizer
        ck = checkpoint.Checkpoint(i, dict(self.params), dict(opt.moments) if opt else {},
                                   opt.step_count if opt else 0, sched.to_json())
        if self.tier == "device":
            self.keeper.hold_part(ck)
        else:
            self.keeper.push(ck, "device", sched.version, op="replica")

    def _can_fail_over(self, exc: TierLost) -> bool:
        if exc.tier == "device":  # no data without the device: the run ends (and --resume continues it)
            return exc.state == NEW_RUN  # unless it only started a run this tier had not followed
        return exc.tier in TIERS

    def _vouched_state(self) -> Optional[checkpoint.Checkpoint]:
        """The newest state this tier can hand on: its live state as the model's owner, else (the
        device) the newest replica it got, else its newest checkpoint on disk."""
        if self.optimizer is not None and self._completed >= 0 and self._holds_whole_model():
            opt = self.optimizer
            return checkpoint.Checkpoint(self._completed, dict(self.params), dict(opt.moments), opt.step_count, None)
        if self.keeper.held is not None:
            return self.keeper.held
        if self.cfg.checkpoint_dir:
            return checkpoint.load(self.cfg.checkpoint_dir, list(self.spec.param_shapes()))
        return None

    def _fail_over_until_resumed(self, exc: TierLost, at: int) -> int:
        """Fail over (again, if another tier is lost meanwhile); return where training resumes."""
        while True:
            if not self._can_fail_over(exc):
                raise exc
            try:
                return self._fail_over(exc, at)
            except TierLost as again:
                exc = again

    def _fail_over(self, exc: TierLost, at: int) -> int:
        """Abandon the current attempt of the run without ``exc.tier``; return where training resumes."""
        self.failovers += 1
        abandoned = self.run_id
        then = {RESTARTED: "what it held is lost; abandoning this attempt", NEW_RUN: "following it"}
        print(f"{self.tier}: the {exc.tier} is {exc.state} (iteration {at}); "
              f"{then.get(exc.state, 'carrying on without it')} (failover {self.failovers})", flush=True)
        state = self._vouched_state()
        self._restored, self.resume = state, True
        if state is not None:
            self.keeper.hold(state)  # for whichever tier owns the model in the new run
        self.transport.renew_mailbox(retire=abandoned)
        self.units, self.params, self.optimizer = frozenset(), {}, None
        self.owner = self.slice = self.stage = None
        self.history.clear()
        self.sent_go.clear()
        self._local.clear()
        self.reached.clear()
        self.done, self._weights_sent, self._completed = -1, -1, -1
        extra = self.transport.status_extra
        extra.pop("checkpoint_iteration", None)
        if state is not None:
            extra["checkpoint_iteration"] = state.iteration
        extra["abandoned"] = abandoned
        if self.tier == "device" and exc.state not in (RESTARTED, NEW_RUN):  # gone, not back: for a planner
            extra["lost"] = sorted({*extra.get("lost", ()), exc.tier})       # that never saw it (a standby's)
        self.transport.publish_status("online")
        if self.tier == "device":
            self.run_id = uuid.uuid4().hex[:8]
            self._await_survivors(abandoned, exc.tier, at)
        start = self._start_iteration()
        print(f"{self.tier}: resuming at iteration {start} in run {self.run_id}", flush=True)
        return start

    def _await_survivors(self, abandoned: str, lost: str, at: int) -> None:
        """The device: wait for a schedule that gives no work to a tier that is not online, and
        for the status of every online tier that followed the abandoned run to say it abandoned it
        (so that its announced state is the one to resume from). A tier back as a new process holds
        nothing of that run: it is not waited for (if it followed the attempt by mistake, the new
        run's first message tells it, :data:`~hiertrain.net.mailbox.NEW_RUN`)."""
        deadline = time.monotonic() + self.cfg.timeout_s
        while True:
            self._pump_schedules(0.05)
            alive = (self.online & set(TIERS)) | {"device"}
            newest = max(self.schedules.values(), key=lambda s: s.version) if self.schedules else None
            plan_ok = newest is not None and newest.working <= alive
            waiting = sorted(t for t in alive - {"device"}
                             if self.followed.get(t) == abandoned and self.abandoned.get(t) != abandoned)
            if plan_ok and not waiting:
                break
            if time.monotonic() > deadline:
                what = "a schedule without the lost tier" if not plan_ok else f"the {waiting[0]} to fail over"
                raise MissingMessage(kind=what, sender="planner" if not plan_ok else waiting[0], iteration=at,
                                     layer=0, timeout=self.cfg.timeout_s)
        self._before_run = set(self.schedules)  # the newest schedule applies from the new run's start
