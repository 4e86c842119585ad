"""``hiertrain schedule watch``: print each schedule the planner publishes, newest versions only."""

from __future__ import annotations

import json
import logging
import queue
import sys
from typing import Optional, TextIO

from hiertrain.net import topics
from hiertrain.config import ServiceConfig
from hiertrain.plan import paths
from hiertrain.schedule import Schedule, ScheduleFeed
from hiertrain.net.transport import Transport

log = logging.getLogger("hiertrain.watch")


HEADER = f"{'version':>7} {'from':>6}  {'policy':<10} {'o':<6} {'s':<14} {'l':<14} {'s/iteration':>11}"


def row(s: Schedule) -> str:
    """One table row: who plays which role on how many samples, the chain's stages, or a fleet's
    members as device:m,k/samples (the device trains 1..m, the edge m+1..k, the cloud the rest)."""
    if s.groups is not None and s.is_fleet:
        roles = "fleet " + " ".join(f"{name}:{m},{k}/{g.samples}" for g, (name, (m, k))
                                    in zip(s.groups.groups, paths(s.groups).items()))
    elif s.chain is not None:
        where = " -> ".join(f"{st.tier}[{st.first}..{st.last}]" for st in s.chain)
        roles = f"chain {where}"
    else:
        worker = {r: (f"{s.tier_of(r)}:{s.cut(r)}/{s.samples(r)}" if s.samples(r) else "-") for r in "sl"}
        roles = f"{s.tier_of('o') + '/' + str(s.b_o):<6} {worker['s']:<14} {worker['l']:<14}"
    t = f"{s.iteration_s:.4f}" if s.iteration_s == s.iteration_s else "?"
    return f"{s.version:>7} {s.effective_iteration:>6}  {s.policy:<10} {roles} {t:>11}"


def watch(cfg: ServiceConfig, *, count: Optional[int] = None, timeout: Optional[float] = None,
          out: TextIO = sys.stdout, as_json: bool = False) -> int:
    """Print schedules as a table (o as tier/samples, s and l as tier:cut/samples), or as JSON lines;
    0 after ``count`` of them, 1 if ``timeout`` passes in silence."""
    transport = Transport(cfg.endpoint, account=cfg.endpoint.username, job=cfg.job, observer=True)
    transport.subscribe(topics.schedule(cfg.job))
    feed = ScheduleFeed()
    seen = 0
    with transport:
        while count is None or seen < count:
            try:
                event = transport.events.get(timeout=timeout)
            except queue.Empty:
                print(f"hiertrain: error: no schedule on {topics.schedule(cfg.job)} within {timeout:g} s",
                      file=sys.stderr)
                return 1
            if not isinstance(event.topic, topics.ScheduleTopic):
                continue
            schedule = feed.offer(event.payload)
            if schedule is not None:
                if as_json:
                    print(json.dumps(event.payload, sort_keys=True), file=out, flush=True)
                else:
                    if not seen:
                        print(HEADER, file=out)
                    print(row(schedule), file=out, flush=True)
                seen += 1
    return 0
