"""The cloud in a fleet: units k+1..U of every member whose path reaches it, one cut at a time.

Its exchanges in each round are those of the round's plan (:func:`hiertrain.exchanges.exchanges`):
the weights of units kappa+1..U from the edge, then for each cut k (ascending) the rows the edge sends
for all members cut there (concatenated in member order, raw samples for k = 0) with their labels.
It computes the loss over those rows (weighted by their share of the round's samples), sends the
gradient at k back to the edge, and finally its parameter gradients with its share of the loss.
"""

from __future__ import annotations

from typing import Any, Optional

from hiertrain.errors import ProtocolError
from hiertrain.exchanges import exchanges, select
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
        """Its exchanges in the round's plan (:func:`hiertrain.exchanges.exchanges`), cut by cut."""
        r, xs = rnd.round, exchanges(rnd.plan(), self.account)
        back = select(xs, "send", "grad")
        grads: Params = {}
        loss = 0.0
        for x in sorted((x for x in xs if x.op == "take" and x.kind in ("samples", "act")), key=lambda x: x.layer):
            t = self.take(x.kind, x.peer, r, x.layer).tensors
            rows = sum(rnd.member(g).n for g in x.groups)
            if any(k not in t or len(t[k]) != rows for k in ("x", "y")):
                raise ProtocolError(f"the edge sent cut {x.layer}'s rows of round {r} without {rows} rows and as many "
                                    f"labels (for {', '.join(x.groups)})")
            w = rnd.weight(rows)
            part_loss, gk, g = self.part.loss(params, x.layer + 1, t["x"], t["y"], w)
            loss += w * part_loss
            add_into(grads, g)
            if x.groups[0] in back:
                self.send("grad", x.peer, r, x.layer, {"x": gk})
        wgrad = next(x for x in xs if x.op == "send" and x.kind == "wgrad")
        self.send("wgrad", wgrad.peer, r, wgrad.layer, grads, loss=loss)
