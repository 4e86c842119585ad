"""Segment runtime benchmarks: artifact build times, the recompute penalty, ORT vs PyTorch.

- *build*: cold build of every unit range of LeNet-5 (and AlexNet's) into an empty cache.
- *recompute*: a worker that must send its activations before the gradient arrives either
  runs the fused forward+backward graph after a separate forward (what ORT's TrainStep forces:
  the forward twice) or our split forward then backward with a stash. Ratios are to one fused
  run (one forward, one backward): the goal is split <= 1.05.
- *step*: one LeNet-5 training step at batch 64 (forward, backward, SGD) in ORT and in PyTorch.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from hiertrain import models, segments
from hiertrain.optim import Optimizer, OptimizerConfig

CASES = [("lenet5", 1, 5, 64), ("alexnet-small", 1, 5, 16), ("alexnet", 1, 5, 8), ("alexnet", 3, 7, 8),
         ("resnet34", 2, 9, 8), ("googlenet", 2, 6, 8), ("vgg16", 1, 8, 4)]


def _interleaved(fns: dict[str, Callable[[], Any]], repeat: int) -> dict[str, float]:
    """Median seconds of each function, measured round-robin so drift affects all alike."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeat):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def build_times() -> dict[str, Any]:
    out = {}
    for name in ("lenet5", "alexnet"):
        spec = models.get(name)
        with tempfile.TemporaryDirectory() as d:
            times = []
            for a in range(1, spec.n_units + 1):
                for b in range(a, spec.n_units + 1):
                    kind = "head" if b == spec.n_units else "body"
                    t = time.perf_counter()
                    segments.build(spec, a, b, kind=kind, input_grad=a > 1, root=Path(d))
                    times.append(time.perf_counter() - t)
        out[name] = {"ranges": len(times), "median_ms": round(1e3 * statistics.median(times), 2),
                     "max_ms": round(1e3 * max(times), 2)}
    return out


def recompute(repeat: int) -> list[dict[str, Any]]:
    rows = []
    rt = segments.Runtime()
    for name, a, b, batch in CASES:
        spec = models.get(name)
        params = models.init_params(spec)
        seg = rt.segment(spec, a, b)
        rng = np.random.default_rng(0)
        x = rng.random((batch, *spec.shape_at(a - 1)), dtype=np.float32)
        gy = rng.standard_normal((batch, *spec.shape_at(b))).astype(np.float32)
        t = _interleaved({
            "fused": lambda: seg.fused(params, x, gy),
            "forward_then_fused": lambda: (seg.forward(params, x), seg.fused(params, x, gy)),
            "split": lambda: seg.backward(params, seg.forward(params, x)[1], gy),
        }, repeat)
        rows.append({"model": name, "units": f"{a}..{b}", "batch": batch, **{f"{k}_ms": round(v * 1e3, 3) for k, v in t.items()},
                     "recompute_ratio": round(t["forward_then_fused"] / t["fused"], 3),
                     "split_ratio": round(t["split"] / t["fused"], 3)})
    return rows


def step_vs_pytorch(repeat: int, batch: int = 64) -> dict[str, Any]:
    spec = models.get("lenet5")
    rt = segments.Runtime()
    head = rt.head(spec, 1)
    params = models.init_params(spec)
    opt = Optimizer(OptimizerConfig("sgd", lr=0.01), spec.param_shapes())
    rng = np.random.default_rng(0)
    x = rng.random((batch, 3, 32, 32), dtype=np.float32)
    y = rng.integers(0, 10, batch).astype(np.int64)
    state = {"p": params}

    def ort_step() -> None:
        _, _, _, g = head.step(state["p"], x, y)
        state["p"] = opt.step(state["p"], g)

    fns: dict[str, Callable[[], Any]] = {"ort": ort_step}
    try:
        import torch

        torch.manual_seed(0)
        net = torch.nn.Sequential(
            torch.nn.Conv2d(3, 6, 5), torch.nn.ReLU(), torch.nn.MaxPool2d(2), torch.nn.Conv2d(6, 16, 5), torch.nn.ReLU(),
            torch.nn.MaxPool2d(2), torch.nn.Flatten(), torch.nn.Linear(400, 120), torch.nn.ReLU(),
            torch.nn.Linear(120, 84), torch.nn.ReLU(), torch.nn.Linear(84, 10))
        topt = torch.optim.SGD(net.parameters(), lr=0.01)
        tx, ty = torch.tensor(x), torch.tensor(y)

        def torch_step() -> None:
            topt.zero_grad()
            torch.nn.functional.cross_entropy(net(tx), ty).backward()
            topt.step()

        fns["pytorch"] = torch_step
        versions = {"torch": torch.__version__, "torch_threads": torch.get_num_threads()}
    except ImportError:
        versions = {"torch": None}
    t = _interleaved(fns, repeat)
    return {"model": "lenet5", "batch": batch, **{f"{k}_ms": round(v * 1e3, 3) for k, v in t.items()}, **versions}


def bench(args: argparse.Namespace) -> dict[str, Any]:
    rec = recompute(args.repeat)
    return {
        "bench": "segments",
        "build": build_times(),
        "recompute": rec,
        "split_ratio_max": max(r["split_ratio"] for r in rec),
        "goal_split_ratio": 1.05,
        "step": step_vs_pytorch(max(args.repeat, 20)),
    }
