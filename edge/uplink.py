"""An edge site's link to the cloud's averager in a hierarchical job (:mod:`hiertrain.train.hierarchy`).

After every K2-th step (and the run's last) the coordinator hands its whole model to :meth:`Uplink.round`:
it goes up on ``hiertrain/<job>/sync/up/<site>`` (bridged to the cloud's broker) with the samples the
site trained since the last round, and the cloud's average of the round is waited for up to
``wait_s``. An average of an earlier round (the bridge delivering late) is dropped with its reason;
one of a later round (this site was behind) is kept for when the site gets there.
"""

from __future__ import annotations

import queue
import time
from typing import Any, Optional

from hiertrain.net import topics
from hiertrain.net.transport import Transport
from hiertrain.net.wire import Message
from hiertrain.train import hierarchy as H
from hiertrain.train.part import Params

POLL_S = 0.2


class Uplink:
    def __init__(self, transport: Transport, job: str, hierarchy: H.Hierarchy, iterations: int) -> None:
        self.transport, self.job, self.h, self.iterations = transport, job, hierarchy, iterations
        self.trained = 0  # samples trained since the site's model last went up
        self._ahead: dict[int, Message] = {}
        transport.subscribe(topics.sync_down(job))

    def due(self, step: int) -> bool:
        return H.due(step, self.h.every, self.iterations)

    def round(self, step: int, state: Params) -> tuple[Optional[Params], dict[str, Any]]:
        """The site's model after ``step`` up, the cloud's average back: (the average, or None when none
        came in ``wait_s``; what the step log says of the round)."""
        h, n, t0 = self.h, H.round_after(step, self.h.every), time.monotonic()
        self.transport.send(Message("weights", self.job, "edge", "cloud", n, 0, state, 0,
                                    {"site": h.site, "samples": self.trained, "step": step}),
                            topic=topics.sync_up(self.job, h.site))
        self.trained = 0
        while (left := t0 + h.wait_s - time.monotonic()) > 0:
            try:
                got = self._ahead.pop(n, None) or self.transport.inbound.sync.get(timeout=min(left, POLL_S))
            except queue.Empty:
                continue
            if got.iteration > n:
                self._ahead[got.iteration] = got
                continue
            if got.iteration < n or set(got.tensors) != set(state):
                self.transport.inbound.drop(f"stale: the cloud's average of round {got.iteration} ({len(got.tensors)} "
                                            f"tensors) while waiting for round {n}'s", topics.sync_down(self.job))
                continue
            sites = [str(s) for s in got.meta.get("sites", [])]
            print(f"edge: round {n} (after step {step}): took the cloud's average of {', '.join(sites)}", flush=True)
            return dict(got.tensors), {"round": n, "sites": sites, "seconds": round(time.monotonic() - t0, 4)}
        print(f"edge: round {n} (after step {step}): no average from the cloud in {h.wait_s:g} s (its WAN link?): "
              f"{h.site} trains on with its own model", flush=True)
        return None, {"round": n, "missed": True, "seconds": round(time.monotonic() - t0, 4)}
