"""``hiertrain schedule watch``: print each schedule the planner publishes, newest versions only."""

from __future__ import annotations

import json
import logging
import queue
import sys
from typing import Optional, TextIO

from hiertrain import topics
from hiertrain.config import ServiceConfig
from hiertrain.schedule import ScheduleFeed
from hiertrain.transport import Transport

log = logging.getLogger("hiertrain.watch")


def watch(cfg: ServiceConfig, *, count: Optional[int] = None, timeout: Optional[float] = None,
          out: TextIO = sys.stdout) -> int:
    """Print schedules as JSON lines; 0 after ``count`` of them, 1 if ``timeout`` passes in silence."""
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
                print(json.dumps(event.payload, sort_keys=True), file=out, flush=True)
                seen += 1
    return 0
