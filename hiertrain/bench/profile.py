"""``hiertrain bench profile``: how stable repeated profiles are on this machine.

Profiles LeNet-5 and AlexNet-small ``--repeat`` times (each one a full ``hiertrain profile``) and
reports, per model, the coefficient of variation (std / mean) of each unit's forward and backward
time across the repeats (median and worst unit) and of the whole model's time.
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

import numpy as np

from hiertrain.train import profiler
from hiertrain.train.runtime import Runtime


def bench(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"bench": "profile", "repeat": args.repeat, "models": {}}
    rt = Runtime()
    for model, batch in (("lenet5", 32), ("alexnet-small", 8)):
        runs = [profiler.measure(model, batch, tier="edge", runtime=rt).tiers["edge"] for _ in range(args.repeat)]
        per_unit = np.array([[*r.forward_s, *r.backward_s] for r in runs])
        cv = per_unit.std(axis=0) / per_unit.mean(axis=0)
        totals = per_unit.sum(axis=1)
        out["models"][model] = {"batch": batch, "units": len(runs[0].forward_s),
                                "unit_cv_median": round(float(statistics.median(cv)), 4),
                                "unit_cv_max": round(float(cv.max()), 4),
                                "total_cv": round(float(totals.std() / totals.mean()), 4),
                                "total_ms_per_sample": [round(1e3 * t, 4) for t in totals]}
    return out
