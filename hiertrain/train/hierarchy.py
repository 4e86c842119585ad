"""Hierarchical jobs (HierFAVG-style): several edge sites, each a fleet, averaged by the cloud every K2 steps.

Each edge server runs its own broker, coordinator and fleet (exact or periodic sync). Its broker is
bridged to the cloud's (``hiertrain broker bridge``), carrying only the job's sync topics. Every K2
steps (and after the run's last), the site's coordinator publishes its whole model (weights and
optimizer moments) on ``hiertrain/<job>/sync/up/<site>`` with the samples it trained since it last did,
and waits up to ``wait_s`` for the cloud's average on ``hiertrain/<job>/sync/down``; the cloud's
averager (``cloud/averager.py``) waits for every site up to its own ``wait_s`` after the first model
of a round came, and averages those it has, weighted by their samples.

- **Rounds** are numbered from the steps (:func:`round_after`), so a resumed site and the averager agree.
- **A site whose WAN link drops** gets no average in ``wait_s``: it trains on with its own model and
  tries again at the next round. Its model of the missed round, if the bridge delivers it late, is
  refused by the averager (the round is closed) and the site joins the next average.
- **A site that is gone** is left out of each round after ``wait_s``, and named.
- In periodic sync a round's step also ends a window (the site's model is then whole).

The functions here are pure; the in-process reference (:func:`hiertrain.lab.replay.replay_hierarchy`)
and the services use the same ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

import numpy as np

from hiertrain.errors import ProtocolError

DEFAULT_WAIT_S = 60.0


@dataclass(frozen=True)
class Hierarchy:
    """``[hierarchy]``: an edge's ``site`` and ``every`` (K2); the averager's ``sites``; both a ``wait_s``."""

    site: str = ""
    every: int = 0
    sites: tuple[str, ...] = ()
    wait_s: float = DEFAULT_WAIT_S
    log: Optional[str] = None  # the averager's: one JSON line per round (who was in it)


def due(step: int, every: int, iterations: int) -> bool:
    """Whether the site's model goes up after ``step``: every ``every`` steps, and after the last."""
    return (step + 1) % every == 0 or step + 1 == iterations


def round_after(step: int, every: int) -> int:
    """The round a site's model after ``step`` belongs to (1, 2, ...)."""
    return -(-(step + 1) // every)


def rounds(iterations: int, every: int) -> int:
    return round_after(iterations - 1, every)


def average(models: Mapping[str, tuple[Mapping[str, np.ndarray], float]]) -> dict[str, np.ndarray]:
    """The sites' models (``site -> (state, samples)``), averaged weighted by their samples, in site order."""
    if not models:
        raise ValueError("no model to average")
    names = sorted(models)
    first = models[names[0]][0]
    for site in names[1:]:
        if set(models[site][0]) != set(first):
            raise ProtocolError(f"{site}'s model has other tensors than {names[0]}'s", sender=site)
    total = float(sum(models[s][1] for s in names))
    out = {}
    for key, t in first.items():
        acc = sum(np.asarray(models[s][0][key], np.float64) * (models[s][1] / total) for s in names)
        out[key] = np.asarray(acc, dtype=t.dtype)
    return out


def check_samples(site: str, samples: object) -> float:
    if isinstance(samples, bool) or not isinstance(samples, (int, float)) or not 0 < samples < 1e15:
        raise ProtocolError(f"{site}'s model says it trained {samples!r} samples", sender=site)
    return float(samples)
