"""Failover: when a tier other than the device is lost mid-run, the survivors carry on without it.

The design (:class:`Failover` is the tier service's collaborator; the state it keeps and sends is
:mod:`hiertrain.statekeeper`'s):

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

from typing import Callable

from hiertrain import TIERS
from hiertrain.clock import Clock
from hiertrain.errors import TierLost
from hiertrain.net.mailbox import NEW_RUN, RESTARTED
from hiertrain.runview import RunView
from hiertrain.statekeeper import StateKeeper


class Failover:
    """Carries a tier service on without a lost tier. It works through the service's run view,
    clock and state keeper, and ``reset()``: the service drops what it computed with (the units it
    held, the iterations it ran) when an attempt is abandoned."""

    def __init__(self, view: RunView, clock: Clock, state: StateKeeper, *, reset: Callable[[], None]) -> None:
        self.view, self.clock, self.state, self.reset = view, clock, state, reset
        self.transport, self.tier = view.transport, view.tier
        self.count = 0  # how often this process carried on without a lost tier

    def can(self, exc: TierLost) -> bool:
        if exc.tier == "device":  # no data without the device: the run ends (and --resume continues it)
            return exc.state == NEW_RUN  # unless it only started a run this tier had not followed
        return exc.tier in TIERS

    def until_resumed(self, exc: TierLost, at: int) -> int:
        """Fail over (again, if another tier is lost meanwhile); return where training resumes."""
        while True:
            if not self.can(exc):
                raise exc
            try:
                return self._fail_over(exc, at)
            except TierLost as again:
                exc = again

    def _fail_over(self, exc: TierLost, at: int) -> int:
        """Abandon the current attempt of the run without ``exc.tier``; return where training resumes."""
        self.count += 1
        abandoned = self.view.run_id
        then = {RESTARTED: "what it held is lost; abandoning this attempt", NEW_RUN: "following it"}
        print(f"{self.tier}: the {exc.tier} is {exc.state} (iteration {at}); "
              f"{then.get(exc.state, 'carrying on without it')} (failover {self.count})", flush=True)
        state = self.state.vouched()
        self.state.restored = state
        if state is not None:
            self.state.keeper.hold(state)  # for whichever tier owns the model in the new run
        self.transport.renew_mailbox(retire=abandoned)
        self.reset()
        self.state.completed = -1
        self.view.abandon()
        extra = self.transport.status_extra
        extra.pop("checkpoint_iteration", None)
        if state is not None:
            extra["checkpoint_iteration"] = state.iteration
        extra["abandoned"] = abandoned
        if self.tier == "device" and exc.state not in (RESTARTED, NEW_RUN):  # gone, not back: for a planner
            extra["lost"] = sorted({*extra.get("lost", ()), exc.tier})  # that never saw it (a standby's)
        self.transport.publish_status("online")
        self.clock.abandon(exc.tier, at)
        start = self.clock.start(failed_over=True)
        print(f"{self.tier}: resuming at iteration {start} in run {self.view.run_id}", flush=True)
        return start
