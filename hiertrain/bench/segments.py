"""Segment runtime benchmarks: artifact build times, the recompute penalty, ORT vs PyTorch.

- *build*: cold build of every unit range of LeNet-5 (and AlexNet's) into an empty cache.
- *recompute*: a worker that must send its activations before the gradient arrives either
  runs the fused forward+backward graph after a separate forward (what ORT's TrainStep forces:
  the forward twice) or our split forward then backward with a stash. Ratios are to one fused
  run (one forward, one backward): the goal is split <= 1.05.
- *lowering*: the backward of the same segments lowered to standard ONNX ops (what plain
  onnxruntime runs) against onnxruntime-training's kernels: the goal is <= 1.05.
- *step*: one LeNet-5 and one AlexNet-small training step at batch 64 (forward, backward, SGD),
  hiertrain's single-tier path against PyTorch on the same CPU: the goal is <= 1.0.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from hiertrain.bench import sized
from hiertrain.train import models, segments
from hiertrain.train.runtime import Runtime, Segment
from hiertrain.train.optim import OptimizerConfig

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


def build_times(names: tuple[str, ...] = ("lenet5", "alexnet")) -> dict[str, Any]:
    out = {}
    for name in names:
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


def recompute(repeat: int, cases: list[tuple[str, int, int, int]] = CASES) -> list[dict[str, Any]]:
    rows = []
    rt = Runtime()
    for name, a, b, batch in cases:
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


def lowering_cost(repeat: int, cases: list[tuple[str, int, int, int]] = CASES) -> list[dict[str, Any]]:
    """The lowered backward (standard ONNX ops, any onnxruntime) against the training kernels'."""
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for name, a, b, batch in cases:
            spec = models.get(name)
            params = models.init_params(spec)
            rng = np.random.default_rng(0)
            x = rng.random((batch, *spec.shape_at(a - 1)), dtype=np.float32)
            gy = rng.standard_normal((batch, *spec.shape_at(b))).astype(np.float32)
            segs = {k: Segment(segments.build(spec, a, b, kind="body", input_grad=a > 1, root=Path(d),
                                                       lowered=k == "lowered")) for k in ("kernels", "lowered")}
            stash = {k: seg.forward(params, x)[1] for k, seg in segs.items()}
            t = _interleaved({k: (lambda k=k: segs[k].backward(params, stash[k], gy)) for k in segs}, repeat)
            rows.append({"model": name, "units": f"{a}..{b}", "batch": batch,
                         **{f"backward_{k}_ms": round(v * 1e3, 3) for k, v in t.items()},
                         "ratio": round(t["lowered"] / t["kernels"], 3)})
    return rows


_TORCH_STEP = """
import json, statistics, sys, time
import numpy as np, torch
from hiertrain.bench.segments import _torch_model
name, batch, repeat, classes = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
shape = (3, 32, 32) if name == "lenet5" else (3, 64, 64)
torch.manual_seed(0)
net = _torch_model(name)
opt = torch.optim.SGD(net.parameters(), lr=0.01)
rng = np.random.default_rng(0)
x = torch.tensor(rng.random((batch, *shape), dtype=np.float32))
y = torch.tensor(rng.integers(0, classes, batch).astype(np.int64))
def step():
    opt.zero_grad()
    torch.nn.functional.cross_entropy(net(x), y).backward()
    opt.step()
step()
times = []
for _ in range(repeat):
    t = time.perf_counter(); step(); times.append(time.perf_counter() - t)
print(json.dumps({"s": statistics.median(times), "torch": torch.__version__, "threads": torch.get_num_threads()}))
"""


def _torch_model(name: str):
    import torch.nn as nn

    if name == "lenet5":
        return nn.Sequential(
            nn.Conv2d(3, 6, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(400, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10))
    c = [16, 48, 96, 64, 64, 256]  # alexnet-small: AlexNet at width 0.25
    return nn.Sequential(
        nn.Conv2d(3, c[0], 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(c[0], c[1], 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2), nn.Conv2d(c[1], c[2], 3, padding=1), nn.ReLU(), nn.Conv2d(c[2], c[3], 3, padding=1), nn.ReLU(),
        nn.Conv2d(c[3], c[4], 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(c[4] * 64, c[5]), nn.ReLU(), nn.Linear(c[5], c[5]), nn.ReLU(), nn.Linear(c[5], 200))


def step_vs_pytorch(repeat: int, name: str = "lenet5", batch: int = 64) -> dict[str, Any]:
    """One training step (forward, backward, SGD) of the whole model: hiertrain's worker_o path
    (:class:`~hiertrain.train.reference.SingleProcess`) against PyTorch on the same CPU. PyTorch runs in a
    process of its own: its OpenMP threads keep spinning after a step and would slow ORT's next one."""
    import json
    import subprocess
    import sys

    from hiertrain.train.reference import SingleProcess

    spec = models.get(name)
    model = SingleProcess(spec, optimizer=OptimizerConfig("sgd", lr=0.01), runtime=Runtime())
    rng = np.random.default_rng(0)
    x = rng.random((batch, *spec.input_shape), dtype=np.float32)
    y = rng.integers(0, spec.classes, batch).astype(np.int64)
    ort_s = _interleaved({"ort": lambda: model.step(x, y)}, repeat)["ort"]
    out: dict[str, Any] = {"model": name, "batch": batch, "ort_ms": round(ort_s * 1e3, 3)}
    proc = subprocess.run([sys.executable, "-c", _TORCH_STEP, name, str(batch), str(repeat), str(spec.classes)],
                          capture_output=True, text=True)
    if proc.returncode == 0:
        torch_run = json.loads(proc.stdout)
        out.update(pytorch_ms=round(torch_run["s"] * 1e3, 3), ratio=round(ort_s / torch_run["s"], 3),
                   torch=torch_run["torch"], torch_threads=torch_run["threads"])
    else:
        out["pytorch"] = f"not measured: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}"
    return out


def bench(args: argparse.Namespace) -> dict[str, Any]:
    cases = sized(args, CASES, CASES[:1])  # quick: LeNet-5 only
    rec = recompute(args.repeat, cases)
    return {
        "bench": "segments",
        "build": build_times(sized(args, ("lenet5", "alexnet"), ("lenet5",))),
        "recompute": rec,
        "split_ratio_max": max(r["split_ratio"] for r in rec),
        "goal_split_ratio": 1.05,
        "lowering": (low := lowering_cost(sized(args, max(args.repeat, 9), 1), cases)),
        "lowering_ratio_max": max(r["ratio"] for r in low),
        "goal_lowering_ratio": 1.05,
        "step": (steps := [step_vs_pytorch(sized(args, max(args.repeat, 20), 2), m, 64)
                           for m in sized(args, ("lenet5", "alexnet-small"), ("lenet5",))]),
        "step_ratio_max": max(r.get("ratio", 0) for r in steps),
        "goal_step_ratio": 1.0,
        "meets_goal": max(r["split_ratio"] for r in rec) <= 1.05 and max(r["ratio"] for r in low) <= 1.05
        and max(r.get("ratio", 0) for r in steps) <= 1.0,
    }
