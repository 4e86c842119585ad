"""The cloud in a fleet: units k+1..U of every member whose path reaches it, one cut at a time.

It runs its part of each round's plan (:func:`hiertrain.interpreter.step`): with the weights of
units kappa+1..U the round came with, for each cut k the rows the edge sends for all members cut
there (one message, in member order, raw samples for k = 0) with their labels, as one batch: the
loss over them (weighted by their share of the round's samples), the gradient at k back to the edge,
and finally its parameter gradients with its share of the loss.
"""

from __future__ import annotations

from typing import Any, Optional

from hiertrain.fleetservice import FleetService, run_step
from hiertrain.train.fleetroles import Round
from hiertrain.net.wire import Message
from hiertrain.tierconfig import TierConfig


class CloudWorker(FleetService):
    def __init__(self, cfg: TierConfig) -> None:
        super().__init__(cfg, account="cloud", peers=frozenset({"edge"}))

    def run(self) -> int:
        return self.serve("fleet worker")

    def published_profile(self) -> Optional[dict[str, Any]]:
        """Its timings (its ``[profile] file``), for a coordinator whose fleet file has none."""
        return self.cfg.profile

    def work(self, rnd: Round, msg: Message) -> None:
        """Its part of the round's plan (:func:`hiertrain.interpreter.step`), with the weights the round came with."""
        run_step(self, rnd, dict(msg.tensors))
