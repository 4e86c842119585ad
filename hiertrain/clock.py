"""Who drives a three-tier job's iterations, and how the others follow.

The tier with the data drives the clock (:class:`hiertrain.device.clock.DeviceClock`): it stamps
every iteration with the schedule it runs and sends each other tier its share of the batch. Every
other tier follows (:class:`Follower`): it runs the iterations the device's samples messages
name, in the device's run. A tier service talks to its clock through this interface only:

- ``start(failed_over)``: the run's first iteration here (the device: a new run, after the newest
  state when resuming; a follower: the first iteration the device sends, in its run);
- ``begin(i, stats)``: iteration ``i``'s schedule, this tier's samples and its labels (or a
  function that gives them), or ``None`` when the device ends the run;
- ``schedule_of(i)``: the schedule iteration ``i`` will run, once known (``None``: the run ends);
- ``abandon(lost, at)``: a failover abandons the attempt (the device starts a new run, once
  every survivor has abandoned the old one);
- ``profile()``: what the clock adds to the tier's published profile; ``reports_always``:
  whether every iteration's telemetry is worth a message.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Protocol

import numpy as np

from hiertrain import TIERS
from hiertrain.errors import PlanError, ProtocolError
from hiertrain.runview import RunView
from hiertrain.schedule import Schedule
from hiertrain.train.data import normalize
from hiertrain.net.wire import Message


class Begun(NamedTuple):
    sched: Schedule
    x: Optional[np.ndarray]      # this tier's samples (normalised), None if it has none
    labels: Any                  # the batch's labels, or a function that gives them (or raises)


class Clock(Protocol):
    end_at: int
    reports_always: bool

    def start(self, *, failed_over: bool) -> int: ...
    def begin(self, i: int, take: Callable[..., Message]) -> Optional[Begun]: ...
    def schedule_of(self, i: int) -> Optional[Schedule]: ...
    def abandon(self, lost: str, at: int) -> None: ...
    def profile(self) -> dict[str, Any]: ...


class Follower:
    """The edge's and the cloud's clock: the device's samples messages."""

    reports_always = False  # an idle edge or cloud reports less often: each report costs the device a message

    def __init__(self, view: RunView, *, timeout_s: float) -> None:
        self.view, self.transport, self.timeout_s = view, view.transport, timeout_s
        self.end_at = 0

    def start(self, *, failed_over: bool) -> int:
        """Start at the first iteration the device sends, in its run."""
        mailbox = self.transport.mailbox
        first = mailbox.first("samples", "device", 10 * self.timeout_s)
        run = mailbox.peek("samples", "device", first, 0, self.timeout_s).meta.get("run")
        if isinstance(run, str):
            self.view.run_id = run
            mailbox.follow(run)
            self.transport.status_extra["run"] = run  # the device waits for us only if we took part
            self.transport.publish_status("online")
        return first

    def begin(self, i: int, take: Callable[..., Message]) -> Optional[Begun]:
        go = take("samples", "device", i, 0)
        if go.meta.get("stop"):
            return None
        sched = self._schedule(go, i)
        x = normalize(go.tensors["x"]) if "x" in go.tensors else None
        return Begun(sched, x, lambda: self._labels(go))

    def _labels(self, go: Message) -> np.ndarray:
        if "y" not in go.tensors:
            raise PlanError(f"{self.view.tier}: the device sent iteration {go.iteration}'s samples without labels, "
                            f"though schedule v{go.schedule_version} has this tier compute the loss")
        return go.tensors["y"]

    def schedule_of(self, i: int) -> Optional[Schedule]:
        go = self.transport.mailbox.peek("samples", "device", i, 0, timeout=self.timeout_s)
        return None if go.meta.get("stop") else self._schedule(go, i)

    def _schedule(self, go: Message, i: int) -> Schedule:
        """The schedule the device stamped iteration ``i`` with: a planner's version, or its fallback
        without the tiers the samples name (:meth:`hiertrain.schedule.Schedule.without`, the same here
        as on the device)."""
        sched = self.view.version(go.schedule_version, i)
        without = go.meta.get("without")
        if without is None:
            return sched
        if not isinstance(without, list) or not set(without) <= set(TIERS) - {"device"}:
            raise ProtocolError(f"{self.view.tier}: the device's samples of iteration {i} name {without!r} as lost tiers")
        return sched.without(frozenset(without))

    def abandon(self, lost: str, at: int) -> None:
        pass  # the device starts the next run; we follow it from its first samples

    def profile(self) -> dict[str, Any]:
        return {}
