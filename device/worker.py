"""A fleet device: the data source and the worker for units 1..m of its own samples.

It connects with its own account (``hiertrain broker add-device NAME``) and waits for rounds from
the edge's coordinator. In each round it is a member of, it takes its ``n`` samples at the offset
the coordinator gives (the coordinator keeps every device's place in its data, so a redone step
trains the same samples), trains its units 1..m and sends the activations at its cut (or its raw
samples, m = 0, losslessly compressed with ``[data] compress = true``) with its labels to the edge;
it then takes the gradient at its cut and sends its parameter gradients. With m = U it computes its
own loss.

In periodic sync (:mod:`hiertrain.train.periodic`) it keeps its own copy of units 1..m: the edge
sends it a fresh copy (weights, optimizer moments and the optimizer) only when a window starts, it
joins or its m changes; it steps the copy itself on the gradient of the mean loss over its own rows,
and uploads it when a round ends the window.

With a ``[profile] file`` (and ``[fleet] samples``, ``rate_mbps``, ``private``) it publishes its
profile, retained, and so joins a fleet whose file does not describe it (:mod:`hiertrain.edge.roster`),
with its power model and energy budget (``[energy]``); a budget that changes is published again.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from hiertrain.errors import ProtocolError
from hiertrain.power import CLASSES, KEYS
from hiertrain.fleetservice import FleetService, run_step
from hiertrain.net.compress import sample_tensors
from hiertrain.net.wire import Message
from hiertrain.train import periodic
from hiertrain.train.fleetroles import Member, Round
from hiertrain.tierconfig import TierConfig

class DeviceWorker(FleetService):
    def __init__(self, cfg: TierConfig) -> None:
        super().__init__(cfg, account=cfg.endpoint.username, peers=frozenset({"edge"}))
        self.budgets: dict[str, float] = {}  # the energy budgets it last published (budget_j, budget_w)
        self.copy: Optional[periodic.Replica] = None  # periodic sync: its own copy of units 1..m
        self.data = cfg.training_data(self.spec)
        self.transport.status_extra.update(fleet=True, samples=len(self.data))

    def run(self) -> int:
        return self.serve(f"fleet device with {len(self.data)} samples")

    def published_profile(self) -> Optional[dict[str, Any]]:
        """Its timings and what it brings ([fleet] samples, rate_mbps, private; [energy] its power model
        and budget), to join."""
        if self.cfg.profile is None or self.cfg.fleet_join is None:
            return None
        self.budgets = self.energy.budgets_now()
        p = self.energy.power
        power = {"class": p.name} if CLASSES.get(p.name) == p else {k: getattr(p, k) for k in KEYS}
        tiers = {t: ({**v, "power": power} if t == "device" else v) for t, v in self.cfg.profile["tiers"].items()}
        said = {**self.cfg.fleet_join, **self.budgets}
        budget = "".join(f", a budget of {v:g} {'J per step' if k == 'budget_j' else 'W on average'}"
                         for k, v in self.budgets.items())
        print(f"{self.account}: publishes its profile to join ({said['samples']} samples per step{budget})", flush=True)
        return {**self.cfg.profile, "tiers": tiers, "fleet": said}

    def after_round(self) -> None:
        """A budget that changed (its battery fell below [energy] low_pct, or came back) is published
        with the profile: the edge re-plans the fleet from the next step."""
        if self.cfg.profile is not None and self.cfg.fleet_join is not None and \
                self.energy.budgets_now() != self.budgets:
            self.announce()

    def work(self, rnd: Round, msg: Message) -> None:
        """Its part of the round's plan: its raw samples up (m = 0), else :func:`hiertrain.interpreter.step`
        on its own rows (units 1..m, the activations at m up with its labels, their gradient back and the
        parameter gradients; with m = U its own loss). In periodic sync, on its own copy (:meth:`_local`)."""
        mb = next((m for m in rnd.members if m.name == self.account), None)
        if mb is None:
            raise ProtocolError(f"the edge sent weights of round {rnd.round}, whose members do not include "
                                f"{self.account}")
        x, y = self.data.take_raw((mb.offset + np.arange(mb.n)) % len(self.data))
        if mb.m == 0:  # the data source's samples (the clock's to send, as a three-tier device's)
            tensors, codec = sample_tensors(x, self.cfg.compress_samples)
            self.send("samples", "edge", rnd.round, 0, {**tensors, "y": y}, **codec)
            return
        if rnd.every:
            self._local(rnd, mb, msg, x, y)
            return
        run_step(self, rnd, dict(msg.tensors), local={self.account: x}, labels=lambda g: y)

    def _local(self, rnd: Round, mb: Member, msg: Message, x: np.ndarray, y: np.ndarray) -> None:
        """Periodic sync: a fresh copy if the edge sent one (else its own, its pending step kept or, the
        step redone, rolled back), the round's step on it, and the copy up when the round ends a window."""
        if msg.tensors:
            config, steps = periodic.opt_from(msg.meta.get("sync_opt"))
            periodic.check_copy(self.spec, "the edge", mb.m, msg.tensors, config.kind)
            self.copy = periodic.Replica(self.spec, config, msg.tensors, steps)
        elif self.copy is None or set(self.copy.params) != set(self.spec.param_shapes(1, mb.m)):
            raise ProtocolError(f"the edge sent no copy of units 1..{mb.m} in round {rnd.round} and "
                                f"{self.account} holds none")
        self.copy.begin(rnd.step)
        done = run_step(self, rnd, self.copy.params, local={self.account: x}, labels=lambda g: y)
        self.copy.step(rnd.step, done.grads, rnd.batch / mb.n)
        if rnd.upload:
            self.send("weights", "edge", rnd.round, mb.m, self.copy.state())
