"""Measure a ``hiertrain-profile/1`` for one tier on this machine, with ORT.

Each unit is timed alone as the runtime runs it: its forward graph and its backward graph
(:mod:`hiertrain.train.segments`) on a batch of B samples, the median of ``repeat`` runs after
``warmup`` runs, divided by B; its update is the ORT optimizer step over its parameters.
``threads`` limits ORT's intra-op threads; a CPU quota (:mod:`hiertrain.lab.cgroup`) emulates a
slower machine. The spread of the repeated runs is recorded beside the medians.
"""

from __future__ import annotations

import platform
import statistics
import time
from typing import Any, Callable, Optional

import numpy as np

from hiertrain.train import models
from hiertrain.train.optim import Optimizer, OptimizerConfig
from hiertrain.profile import FORMAT, Profile
from hiertrain.train.runtime import Runtime


ROUND_S = 0.02  # each timed round lasts at least this long (many CPU-quota periods)


def _median(fn: Callable[[], Any], *, repeat: int, warmup: int) -> tuple[float, float]:
    """(median seconds per call over ``repeat`` rounds, relative spread = (p75 - p25) / median).

    A round calls ``fn`` often enough to last ROUND_S, so that a CPU quota's throttling (which
    acts per period) is averaged in, as it is in a real iteration.
    """
    for _ in range(warmup):
        fn()
    t = time.perf_counter()
    fn()
    calls = max(1, min(1000, int(ROUND_S / max(time.perf_counter() - t, 1e-6)) + 1))
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t) / calls)
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    med = statistics.median(times)
    return med, (q[2] - q[0]) / med if med else 0.0


def measure(model: str, batch: int, *, tier: str = "edge", threads: int = 0, repeat: int = 7, warmup: int = 2,
            optimizer: str = "sgd", runtime: Optional[Runtime] = None, seed: int = 0,
            note: Optional[dict[str, Any]] = None, on_ready: Optional[Callable[[], Any]] = None,
            sample_dtype: Optional[str] = None) -> Profile:
    """Time every unit of ``model`` (see the module docstring). ``on_ready`` is called once every
    graph is built, right before the timed runs (the CLI joins its CPU-quota group there).
    ``sample_dtype``: how the data stores a sample, which is how it travels (default: uint8 for
    images, as the built-in sets store them, else float32); a device publishes its data's own."""
    from hiertrain.train import data

    spec = models.get(model)
    sample_bytes = float(np.dtype(sample_dtype or data.stored_dtype(spec.input_shape)).itemsize
                         * np.prod(spec.input_shape))
    if batch < 1 or repeat < 1 or warmup < 0:
        raise ValueError(f"batch and repeat must be >= 1, warmup >= 0 (got {batch}, {repeat}, {warmup})")
    rt = runtime or Runtime(threads=threads)
    params = models.init_params(spec, seed)
    rng = np.random.default_rng(seed)
    h = rng.random((batch, *spec.input_shape), dtype=np.float32)
    fwd, bwd, upd, spread_f, spread_b = [], [], [], [], []
    opts = {}
    for i in range(1, spec.n_units + 1):
        rt.segment(spec, i, i)
        if spec.param_shapes(i, i):
            opts[i] = Optimizer(OptimizerConfig(optimizer), spec.param_shapes(i, i), momenta=spec.momentum)
    if on_ready is not None:
        on_ready()
    for i in range(1, spec.n_units + 1):
        seg = rt.segment(spec, i, i)
        y, stash = seg.forward(params, h)
        gy = rng.standard_normal(y.shape).astype(np.float32)
        f, sf = _median(lambda: seg.forward(params, h), repeat=repeat, warmup=warmup)
        b, sb = _median(lambda: seg.backward(params, stash, gy), repeat=repeat, warmup=warmup)
        shapes = spec.param_shapes(i, i)
        if shapes:
            opt = opts[i]
            unit_params = {k: params[k] for k in shapes}
            grads = {k: np.ones(s, np.float32) for k, s in shapes.items()}
            u, _ = _median(lambda: opt.step(unit_params, grads), repeat=repeat, warmup=warmup)
        else:
            u = 0.0
        fwd.append(f / batch)
        bwd.append(b / batch)
        upd.append(u)
        spread_f.append(round(sf, 4))
        spread_b.append(round(sb, 4))
        h = y
    layers = [{"name": u.name, "output_bytes": ob, "param_bytes": pb}
              for u, ob, pb in zip(spec.units, spec.output_bytes(), spec.param_bytes())]
    entry = {"forward_s": fwd, "backward_s": bwd, "update_s": upd,
             "spread": {"forward": spread_f, "backward": spread_b},
             "measured": {"batch": batch, "threads": threads, "repeat": repeat, "optimizer": optimizer,
                          "host": platform.node(), "cpu": platform.processor() or platform.machine(), **(note or {})}}
    return Profile.from_json({"format": FORMAT, "model": spec.name, "sample_bytes": sample_bytes,
                              "layers": layers, "tiers": {tier: entry}})
