"""The edge device (e.g. a Raspberry Pi): it holds the data and drives the iterations.

It trains too when its ONNX Runtime has training enabled; otherwise it is a data source only, and
says so in the profile it publishes (``can_train: false``) so the planner gives it no compute.
"""

from __future__ import annotations

import logging

from hiertrain import models, tierconfig
from hiertrain.profile import FORMAT

log = logging.getLogger("hiertrain.device")


def can_train() -> bool:
    """Whether this ONNX Runtime has the training build (there is no aarch64 wheel of it)."""
    try:
        from onnxruntime.capi._pybind_state import GradientGraphBuilder  # noqa: F401
    except ImportError:
        return False
    return True


def data_only_profile(model: str) -> dict:
    spec = models.get(model)
    return {"format": FORMAT, "model": spec.name, "sample_bytes": spec.sample_bytes(),
            "layers": [{"name": u.name, "output_bytes": o, "param_bytes": p}
                       for u, o, p in zip(spec.units, spec.output_bytes(), spec.param_bytes())],
            "tiers": {"device": {"can_train": False}}}


def run(config: str, *, resume: bool = False) -> int:
    from hiertrain.tier import run_tier

    if can_train():
        print("device: onnxruntime-training found; this device trains as the planner decides", flush=True)
        return run_tier("device", config, resume=resume)
    print("device: no onnxruntime training build; running as a data source (can_train: false)", flush=True)
    return run_tier("device", config, resume=resume, profile=data_only_profile(tierconfig.load("device", config).model))
