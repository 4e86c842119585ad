"""The cloud's averager of a hierarchical job: the edge sites' models in, their average out.

It connects to the cloud's broker as the cloud (whose ACL reads ``hiertrain/<job>/sync/up/+`` and
writes ``hiertrain/<job>/sync/down``); each site's broker bridges those topics to it
(:mod:`hiertrain.broker.mosquitto`). For each round (:mod:`hiertrain.train.hierarchy`) it waits for
every site of ``[hierarchy] sites`` until ``wait_s`` after the round's first model came, averages the
models it has weighted by the samples each site trained, and publishes the average with the sites in
it. A site missing is named (its WAN link is down, or it is gone); its model of a closed round, if it
comes later, is refused with a logged reason, and the site is in the next round. A model that is not
of the job's model (tensors, shapes, non-finite values) or of a site not in the list is refused the
same way. It ends after the run's last round.
"""

from __future__ import annotations

import json
import logging
import queue
import time
from typing import Any, Optional

from hiertrain.errors import ProtocolError
from hiertrain.net import topics
from hiertrain.net.transport import Transport
from hiertrain.net.validate import max_message_bytes, validator
from hiertrain.net.wire import Message
from hiertrain.tierconfig import TierConfig
from hiertrain.train import hierarchy as H
from hiertrain.train import models

log = logging.getLogger("hiertrain.cloud")
POLL_S = 0.2


class Averager:
    def __init__(self, cfg: TierConfig) -> None:
        assert cfg.hierarchy is not None
        self.cfg, self.h = cfg, cfg.hierarchy
        self.spec = models.get(cfg.model)
        self.transport = Transport(cfg.endpoint, account="cloud", job=cfg.job, chunk_bytes=cfg.chunk_bytes,
                                   validator=validator(self.spec, cfg.batch),
                                   max_message_bytes=2 * max_message_bytes(self.spec, cfg.batch),
                                   expire_s=max(60.0, 2 * cfg.timeout_s), peers=frozenset())
        self.transport.subscribe(topics.sync_up(cfg.job, "+"))
        self.rounds = H.rounds(cfg.iterations, self.h.every)
        self.pending: dict[int, dict[str, Message]] = {}
        self.first_at: dict[int, float] = {}

    def run(self) -> int:
        h = self.h
        logf = open(h.log, "w") if h.log else None
        try:
            with self.transport:
                print(f"cloud: averaging {', '.join(h.sites)} every {h.every} steps, {self.rounds} rounds "
                      f"(waiting up to {h.wait_s:g} s for a site)", flush=True)
                n = 1
                while n <= self.rounds:
                    self._take(n)
                    have = self.pending.get(n, {})
                    if have and (len(have) == len(h.sites) or time.monotonic() - self.first_at[n] > h.wait_s):
                        row = self._close(n, have)
                        if logf:
                            logf.write(json.dumps(row) + "\n")
                            logf.flush()
                        n += 1
                self.transport.flush()
            print(f"cloud: {self.rounds} rounds averaged", flush=True)
            return 0
        finally:
            if logf:
                logf.close()

    def _take(self, n: int) -> None:
        """The next site model, filed under its round; one of a closed round or of a stranger is refused."""
        try:
            msg = self.transport.inbound.sync.get(timeout=POLL_S)
        except queue.Empty:
            return
        site = str(msg.meta.get("site", ""))
        try:
            if site not in self.h.sites:
                raise ProtocolError(f"a model of site {site!r}, which is not one of {', '.join(self.h.sites)}")
            H.check_samples(site, msg.meta.get("samples"))
            if msg.iteration < n:
                raise ProtocolError(f"{site}'s model of round {msg.iteration} came after that round was averaged; "
                                    f"{site} is in round {n}")
        except ProtocolError as exc:
            self.transport.inbound.drop(f"refused: {exc}", topics.sync_up(self.cfg.job, site or "unknown"))
            return
        self.pending.setdefault(msg.iteration, {})[site] = msg
        self.first_at.setdefault(msg.iteration, time.monotonic())

    def _close(self, n: int, have: dict[str, Message]) -> dict[str, Any]:
        """Round ``n``'s average of the models it has, published; the sites missing named."""
        models_in: dict[str, tuple[Any, float]] = {}
        for site, msg in sorted(have.items()):
            models_in[site] = (msg.tensors, float(msg.meta["samples"]))
        first = sorted(models_in)[0]
        for site in sorted(models_in)[1:]:  # a model unlike the others' is left out, named
            if set(models_in[site][0]) != set(models_in[first][0]):
                log.warning("cloud: round %d: %s's model has other tensors than %s's: left out", n, site, first)
                del models_in[site]
        sites, missing = sorted(models_in), [s for s in self.h.sites if s not in models_in]
        average = H.average(models_in)
        self.transport.send(Message("weights", self.cfg.job, "cloud", "edge", n, 0, average, 0,
                                    {"sites": sites, "missing": missing}), topic=topics.sync_down(self.cfg.job))
        gone = f"; {', '.join(missing)} missing (no model in {self.h.wait_s:g} s)" if missing else ""
        print(f"cloud: round {n}: averaged {', '.join(sites)}{gone}", flush=True)
        self.pending.pop(n, None)
        return {"round": n, "sites": sites, "missing": missing,
                "samples": {s: models_in[s][1] for s in sites}}


def run(cfg: TierConfig) -> int:
    return Averager(cfg).run()
