"""``hiertrain planner run --config F``: the planner as a long-running MQTT service.

Config (TOML)::

    job = "demo"
    [broker]
    credentials = "broker/credentials/planner.json"
    [planner]
    batch = 64
    policy = "hiertrain"          # or a baseline
    cost_model = "paper"          # or "calibrated" (needs a calibration block in the profile)
    hysteresis = 0.2              # relative change of a link rate that triggers a re-plan
    min_gain = 0.1                # ... and what a new placement must gain over the current one to be published
    lead = 2                      # iterations between publication and effect
    profile = "profile.json"      # optional: timings for all tiers until the tiers publish theirs
    bw_device_edge = 5.0          # optional initial link rates (Mbit/s) until telemetry arrives
    bw_edge_cloud = 1.5

It listens to the tiers' profiles, telemetry and status, and publishes each new schedule,
retained and versioned, on ``hiertrain/<job>/schedule``.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import threading
import time
from collections import Counter
from typing import Any, Optional

from hiertrain.net import topics
from hiertrain.config import Kind, ServiceConfig
from hiertrain.errors import ConfigError, HiertrainError
from hiertrain.profile import Profile
from hiertrain.schedule import Schedule
from hiertrain.net.inbound import tally
from hiertrain.net.transport import Transport
from hiertrain.planner.replan import LINKS, PlannerState

log = logging.getLogger("hiertrain.planner")


PLANNER_KEYS: dict[str, Kind] = {"batch": int, "policy": str, "cost_model": str, "hysteresis": float, "lead": int,
                                 "min_gain": float, "horizon": int, "profile": str, **{f"bw_{link}": float for link in LINKS}}


def state_from_config(cfg: ServiceConfig) -> PlannerState:
    sec = cfg.only_tables(["planner"]).table("planner", PLANNER_KEYS)
    if "batch" not in sec:
        raise ConfigError(f"{cfg.path}: [planner] needs batch = B (the job's batch size)")
    state = PlannerState(batch=sec["batch"], policy=sec.get("policy", "hiertrain"),
                         cost_model=sec.get("cost_model", "paper"), hysteresis=sec.get("hysteresis", 0.2),
                         lead=sec.get("lead", 2), min_gain=sec.get("min_gain", 0.1), horizon=sec.get("horizon", 100))
    if not 0 <= state.min_gain < 1:
        raise ConfigError(f"{cfg.path}: [planner] min_gain = {state.min_gain:g} must be in [0, 1)")
    if "profile" in sec:
        state.profile = Profile.load(cfg.resolve(str(sec["profile"])))
    for link in LINKS:
        if f"bw_{link}" in sec:
            state.on_rate(link, sec[f"bw_{link}"])
    return state


def handle(state: PlannerState, event: Any) -> Optional[Schedule]:
    """Feed one event to the state; return a schedule to publish, if any."""
    topic, payload = event.topic, event.payload
    if isinstance(topic, topics.ScheduleTopic):
        return state.on_schedule(payload)
    if topic.kind == "profile":
        state.on_profile(topic.account, Profile.from_json(payload, where=f"profile from {topic.account}"))
    elif topic.kind == "telemetry":
        state.on_telemetry(topic.account, payload)
    elif topic.kind == "status":
        payload = payload if isinstance(payload, dict) else {}
        state.on_status(topic.account, payload.get("state"))
        if topic.account == "device" and payload.get("state") == "online":
            state.on_lost(payload.get("lost"))
            state.on_run(payload.get("run"), payload.get("start_iteration"))
    return state.decide()


def _wait_for_lease(cfg: ServiceConfig, stop: threading.Event) -> None:
    """One planner per job: while the planner account's retained status says another planner is
    online, say so and wait (its Last Will, or its clean stop, ends the wait)."""
    watch = Transport(cfg.endpoint, account="planner", job=cfg.job, observer=True)
    watch.subscribe(topics.status(cfg.job, "planner"))
    holder: Optional[dict[str, Any]] = None
    with watch:
        deadline, said = time.monotonic() + 1.0, False  # the retained status, if any, comes at once
        while not stop.is_set():
            try:
                event = watch.events.get(timeout=0.2)
                if isinstance(event.payload, dict):
                    holder = event.payload if event.payload.get("state") == "online" else None
            except queue.Empty:
                pass
            if holder is None and (said or time.monotonic() > deadline):
                return
            if holder is not None and not said and time.monotonic() > deadline:
                print(f"planner for job {cfg.job}: another planner (pid {holder.get('pid', '?')}) holds the job; "
                      f"waiting until it goes offline", flush=True)
                said = True


def run(cfg: ServiceConfig, *, stop: Optional[threading.Event] = None) -> int:
    state = state_from_config(cfg)
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
    _wait_for_lease(cfg, stop)
    # a client id of its own: a second planner must not take over this one's connection
    transport = Transport(cfg.endpoint, account="planner", job=cfg.job, persistent=False,
                          client_id=f"hiertrain-{cfg.job}-planner-{os.getpid()}")
    for f in (topics.schedule(cfg.job), *(topics.all_of_kind(cfg.job, k) for k in ("profile", "telemetry", "status"))):
        transport.subscribe(f)
    dropped: Counter[str] = Counter()
    announced = [0.0]

    def refuse(topic: Any, why: str) -> None:
        """Count a refused message by reason; log the 1st, 10th, 100th, ... of each reason; the
        counts ride on the planner's retained status."""
        kind, n, say = tally(dropped, why)
        if say:
            log.warning("ignored a message on %s: %s (%d so far for %s)", topic, why, n, kind)
        transport.status_extra["dropped"] = dict(dropped)
        if time.monotonic() - announced[0] >= 1.0:
            announced[0] = time.monotonic()
            transport.publish_status("online")

    said, said_at = None, 0.0
    with transport:
        log.info("planner for job %s: batch %d, policy %s", cfg.job, state.batch, state.policy)
        while not stop.is_set():
            try:
                event = transport.events.get(timeout=0.2)
            except queue.Empty:
                event = None
                waiting = state.waiting_for() if state.current is None else None
                if waiting and (waiting != said or time.monotonic() - said_at > 30):
                    print(f"planner for job {cfg.job}: no schedule yet, waiting for {waiting}", flush=True)
                    said, said_at = waiting, time.monotonic()
            try:  # no message, however made, stops the planner
                schedule = state.decide() if event is None else handle(state, event)
            except HiertrainError as exc:
                refuse(event.topic if event else "(decision)", str(exc))
                continue
            except Exception as exc:
                refuse(event.topic if event else "(decision)", f"unexpected {type(exc).__name__}: {exc}")
                continue
            if schedule is not None:
                transport.publish_json(topics.schedule(cfg.job), schedule.to_json(), retain=True)
                print(f"schedule version {schedule.version} from iteration {schedule.effective_iteration}: "
                      f"{json.dumps(schedule.to_json())}", flush=True)
    return 0
