"""The cloud in a fleet: units k+1..U of every member whose path reaches it, one cut at a time.

Per round it takes the weights of units kappa+1..U from the edge, then for each cut k (ascending)
the activations the edge sends for all members cut there (concatenated in member order), with their
labels; it computes the loss over those rows (weighted by their share of
the round's samples), sends the gradient at k back to the edge, and finally its parameter gradients
with its share of the loss.
"""

from __future__ import annotations

from typing import Any, Optional

from hiertrain.errors import ProtocolError
from hiertrain.fleetservice import FleetService
from hiertrain.train.fleetroles import Round
from hiertrain.train.part import Params, add_into
from hiertrain.tierconfig import TierConfig


class CloudWorker(FleetService):
    def __init__(self, cfg: TierConfig) -> None:
        super().__init__(cfg, account="cloud", peers=frozenset({"edge"}))

    def run(self) -> int:
        return self.serve("fleet worker")

    def published_profile(self) -> Optional[dict[str, Any]]:
        """Its timings (its ``[profile] file``), for a coordinator whose fleet file has none."""
        return self.cfg.profile

    def work(self, rnd: Round, params: Params) -> None:
        r = rnd.round
        grads: Params = {}
        loss = 0.0
        for k, group in rnd.cloud_groups():
            t = self.take("samples" if k == 0 else "act", "edge", r, k).tensors
            if "x" not in t or "y" not in t or len(t["x"]) != len(t["y"]):
                raise ProtocolError(f"the edge sent cut {k}'s rows of round {r} without as many labels")
            x, y = t["x"], t["y"]
            w = rnd.weight(len(y))
            part_loss, gk, g = self.part.loss(params, k + 1, x, y, w)
            loss += w * part_loss
            add_into(grads, g)
            if k > 0:
                self.send("grad", "edge", r, k, {"x": gk})
        self.send("wgrad", "edge", r, self.units, grads, loss=loss)
