"""What a tier service knows of the run it takes part in, from the job's non-tensor topics.

The schedules the planner published (by version, and which of them were retained from before this
run began), what each tier's status says of the runs (which one it follows, which one it
abandoned in a failover, where the device's runs start) and how far each tier got (its telemetry).
Who is online is the transport's to know (:meth:`hiertrain.net.transport.Transport.online`).
"""

from __future__ import annotations

import logging
import queue
import time
import uuid
from typing import Any, Optional

from hiertrain.errors import MissingMessage, PlanError
from hiertrain.net import topics
from hiertrain.net.transport import Transport
from hiertrain.schedule import Schedule, ScheduleFeed

log = logging.getLogger("hiertrain.tier")


class RunView:
    def __init__(self, transport: Transport, *, tier: str, n_units: int, batch: int, timeout_s: float) -> None:
        self.transport, self.tier, self.n_units, self.batch, self.timeout_s = transport, tier, n_units, batch, timeout_s
        transport.subscribe(topics.schedule(transport.job))
        transport.subscribe(topics.all_of_kind(transport.job, "status"))  # runs followed and abandoned
        self.feed = ScheduleFeed()
        self.schedules: dict[int, Schedule] = {}  # version -> schedule
        self.before_run: set[int] = set()  # schedule versions retained from before this run started
        self.run_id = uuid.uuid4().hex[:8]  # the device's run: its own, or the one the others follow
        self.first = 0                      # the run's first iteration here
        self.run_starts: dict[str, int] = {}  # the device's run -> its first iteration (its status)
        self.abandoned: dict[str, Any] = {}  # tier -> the run its status says it abandoned (a failover)
        self.followed: dict[str, Any] = {}   # tier -> the run its status says it follows
        self.reached: dict[str, int] = {}    # tier -> the newest iteration it finished in this run (telemetry)
        self.done = -1  # newest iteration whose loss worker_o (or a chain's last stage) reported

    def pump(self, wait: float = 0.0) -> None:
        """Handle every schedule, status and telemetry event that arrived (waiting up to ``wait``
        for the first one)."""
        timeout: Optional[float] = wait
        while True:
            try:
                event = self.transport.events.get(timeout=timeout) if timeout else self.transport.events.get_nowait()
            except queue.Empty:
                return
            timeout = None  # drain what is there, then return
            if isinstance(event.topic, topics.ScheduleTopic):
                self._schedule(self.feed.offer(event.payload), retained=event.retained)
            elif event.topic.kind == "telemetry" and isinstance(event.payload, dict):
                it = event.payload.get("iteration")
                if isinstance(it, int) and event.payload.get("run") == self.run_id:  # not an abandoned run's
                    self.reached[event.topic.account] = max(self.reached.get(event.topic.account, it), it)
                    if "loss" in event.payload:
                        self.done = max(self.done, it)
            elif event.topic.kind == "status" and isinstance(event.payload, dict):
                self.abandoned[event.topic.account] = event.payload.get("abandoned")
                run, start = event.payload.get("run"), event.payload.get("start_iteration")
                self.followed[event.topic.account] = run
                if event.topic.account == "device" and isinstance(run, str) and type(start) is int:
                    self.run_starts[run] = start

    def _schedule(self, sched: Optional[Schedule], *, retained: bool) -> None:
        if sched is None:
            return
        if retained:
            self.before_run.add(sched.version)
        try:
            self.schedules[sched.version] = sched.check(n_units=self.n_units, batch=self.batch)
        except PlanError as exc:
            log.warning("%s: ignored schedule version %d: %s", self.tier, sched.version, exc)
            return
        log.info("%s: schedule version %d from iteration %d", self.tier, sched.version, sched.effective_iteration)

    def version(self, version: int, iteration: int) -> Schedule:
        """Schedule ``version`` (the stamp of the device's samples for ``iteration``), waiting for it."""
        deadline = time.monotonic() + self.timeout_s
        while version not in self.schedules:
            self.transport.mailbox.check_lost(f"schedule version {version}")
            if time.monotonic() > deadline:
                raise MissingMessage(kind="schedule", sender="planner", iteration=iteration, layer=version,
                                     timeout=self.timeout_s)
            self.pump(0.1)
        return self.schedules[version]

    def effective(self, sched: Schedule) -> int:
        """When a schedule takes effect in this run: one retained from before the run (a previous
        run's, effective at its iteration 301, say) is in effect from the start of this one."""
        return min(sched.effective_iteration, self.first) if sched.version in self.before_run else \
            sched.effective_iteration

    def in_effect(self, iteration: int) -> Schedule:
        """The newest schedule in effect at ``iteration`` (waiting for the first)."""
        self.pump()
        deadline = time.monotonic() + self.timeout_s
        while True:
            ready = [s for s in self.schedules.values() if self.effective(s) <= iteration]
            if ready:
                return max(ready, key=lambda s: s.version)
            if time.monotonic() > deadline:
                raise MissingMessage(kind="schedule", sender="planner", iteration=iteration, layer=0,
                                     timeout=self.timeout_s)
            self.pump(0.1)

    def newest(self) -> Optional[Schedule]:
        return max(self.schedules.values(), key=lambda s: s.version) if self.schedules else None

    def run_start(self) -> int:
        """The first iteration of the device's current run (a tier that joined later starts after it)."""
        self.pump()
        return self.run_starts.get(self.run_id, self.first)

    def abandon(self) -> None:
        """A failover: the progress of the abandoned attempt means nothing in the next."""
        self.reached.clear()
        self.done = -1
