"""The fleet's plans on the schedule topic: what ``hiertrain schedule watch`` and every subscriber see.

A fleet's coordinator is its planner, so it publishes each plan version it makes, retained, in the
plan model (:mod:`hiertrain.plan`), under the **planner's** account: only the planner may publish
schedules (the broker's ACL says so). Its status holds the job's planner lease too, so a planner
service started by mistake for this job waits instead of publishing three-tier schedules over it.
Versions continue above the newest one retained, so a restarted coordinator never goes back.

The planner's account is also the one that reads the devices' profiles (a tier never sees another's):
the publisher hands the coordinator each profile a device publishes to join (:mod:`hiertrain.edge.roster`).
"""

from __future__ import annotations

import queue
import time
from typing import Any, Optional

from hiertrain.net import topics
from hiertrain.net.transport import Endpoint, Transport
from hiertrain.plan import for_fleet
from hiertrain.schedule import Schedule

def fleet_schedule(plan: Any, members: list[tuple[str, int, Any]], *, units: int, version: int, step: int,
                   cloud: bool, reason: str = "", every: int = 0) -> Schedule:
    """A fleet plan (``members``: each device's name, samples and path) as the schedule topic
    carries it: one sample group per device, the edge owning every unit, in effect from ``step``;
    ``every``: periodic sync's K (the devices keep their copies), 0 for exact mode; ``pace_s``: the
    least seconds of a step its devices' average-watts budgets allow (the coordinator holds it that long)."""
    groups = for_fleet([(n, samples, p.m, p.k) for n, samples, p in members], units=units, keep=every > 0)
    return Schedule(mapping={}, m_s=0, m_l=0, b_o=0, b_s=0, b_l=0, policy=plan.policy, cost_model="fleet",
                    iteration_s=plan.iteration_s, version=version, effective_iteration=step, groups=groups,
                    extra={"cloud": cloud, **({"reason": reason} if reason else {}), **({"sync_every": every} if every else {}),
                           **({"pace_s": plan.parts["pace_s"]} if plan.parts.get("pace_s") else {})})


RETAINED_WAIT_S = 1.0  # a retained schedule arrives at once after the subscription, or there is none


class PlanPublisher:
    def __init__(self, endpoint: Endpoint, *, job: str) -> None:
        self.job = job
        self.transport = Transport(endpoint, account="planner", job=job)
        self.transport.subscribe(topics.schedule(job))
        self.transport.subscribe(topics.all_of_kind(job, "profile"))
        self.transport.status_extra["role"] = "fleet coordinator"  # in the lease a planner service waits on
        self.newest = 0  # the newest version on the topic (a previous run's, or ours)

    def __enter__(self) -> "PlanPublisher":
        self.transport.start()
        deadline = time.monotonic() + RETAINED_WAIT_S
        self._profiles: list[tuple[str, Any]] = []
        while (left := deadline - time.monotonic()) > 0:
            try:
                self._take(self.transport.events.get(timeout=left))
            except queue.Empty:
                break
        return self

    def _take(self, event: Any) -> None:
        if isinstance(event.topic, topics.ScheduleTopic):
            version = event.payload.get("version") if isinstance(event.payload, dict) else None
            if type(version) is int:
                self.newest = max(self.newest, version)
        elif isinstance(event.topic, topics.AccountTopic) and event.topic.kind == "profile":
            self._profiles.append((event.topic.account, event.payload))

    def profiles(self) -> list[tuple[str, Any]]:
        """The profiles published since the last call (retained ones first): (account, payload)."""
        while True:
            try:
                self._take(self.transport.events.get_nowait())
            except queue.Empty:
                break
        out, self._profiles = self._profiles, []
        return out

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        self.transport.stop(state="failed" if exc_type else "stopped")

    def publish(self, schedule: Schedule) -> None:
        self.newest = max(self.newest, schedule.version)
        self.transport.publish_json(topics.schedule(self.job), schedule.to_json(), retain=True)


def next_version(publisher: Optional[PlanPublisher], current: int) -> int:
    """The version a new plan takes: above ours, and above anything already on the topic."""
    return max(current, publisher.newest if publisher is not None else 0) + 1
