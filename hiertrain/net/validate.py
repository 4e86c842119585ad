"""What a tier accepts: every tensor message is checked against the model before it is filed.

A message that fails is dropped with the reason (logged and counted by the transport), so a
later valid message with the same key can still be delivered: wrong shapes, wrong dtypes,
non-finite values, unknown parameters and out-of-range labels never reach the compute.
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np

from hiertrain.train.models import ModelSpec
from hiertrain.net.compress import SAMPLE_CODEC, unpack_samples
from hiertrain.net.wire import Message

Validator = Callable[[Message], Optional[str]]
ARTIFACT_FILES = ("forward.onnx", "backward.onnx", "fused.onnx", "step.onnx", "meta.json")


def non_finite(name: str, a: np.ndarray) -> Optional[str]:
    """Why ``a`` may not travel (NaN or inf in a float tensor), or ``None``."""
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        return f"non-finite: {name} holds NaN or inf"
    return None


def _batch_of(name: str, a: np.ndarray, shape: tuple[int, ...], dtype: str) -> Optional[str]:
    if a.dtype != np.dtype(dtype) or a.ndim != len(shape) + 1 or tuple(a.shape[1:]) != tuple(shape):
        return f"wrong shape: {name} is {a.dtype}{list(a.shape)}, expected {dtype}[n, {', '.join(map(str, shape))}]"
    return non_finite(name, a)


def max_message_bytes(spec: ModelSpec, batch: int) -> int:
    """The largest message a tier of this job can legitimately receive: a full state handover
    (weights and two AdamW moments) or a batch of samples or activations, plus room for headers
    and segment artifacts. Frames declaring more are refused before anything is buffered."""
    state = 3 * sum(spec.param_bytes())
    batch_bytes = batch * max([spec.sample_bytes(), *spec.output_bytes()])
    return int(max(state, batch_bytes)) + (16 << 20)


def _labels(y: Optional[np.ndarray], classes: int) -> Optional[str]:
    if y is None or y.dtype != np.int64 or y.ndim != 1:
        return "wrong shape: labels must be one int64 vector 'y'"
    if len(y) and (y.min() < 0 or y.max() >= classes):
        return f"wrong labels: out of range 0..{classes - 1}"
    return None


def validator(spec: ModelSpec, batch: int = 0) -> Validator:
    """Why a message may not reach the compute, as "kind: detail" (the transport counts refusals by
    kind, so a kind never holds what a sender chooses), or ``None``.
    ``batch``: the job's; compressed samples are accepted (and decoded, in place, to ``x``) only
    when it is given, and never inflate past it."""
    params = spec.param_shapes()

    def check(msg: Message) -> Optional[str]:
        t = msg.tensors
        if msg.kind == "segreq":
            return "malformed: a segment request carries no tensors" if t else None
        if msg.kind == "segment":
            for name, a in t.items():
                if name not in ARTIFACT_FILES or a.dtype != np.uint8 or a.ndim != 1:
                    return f"malformed: unexpected artifact file {name!r} ({a.dtype}{list(a.shape)})"
            return None
        if msg.kind == "act" and "q" in t:  # 8-bit compressed activations (JALAD)
            lo, scale = msg.meta.get("lo"), msg.meta.get("scale")
            if set(t) != {"q"} or not all(isinstance(v, float) and np.isfinite(v) for v in (lo, scale)):
                return "malformed compressed activations: need q and finite lo, scale"
            return _batch_of("q", t["q"], spec.shape_at(msg.layer), "uint8")
        if msg.kind in ("samples", "act") and "y" in t:  # labels ride with the rows towards the loss
            why = _labels(t["y"], spec.classes)
            if why or (batch and len(t["y"]) > batch):
                return why or f"wrong labels: {len(t['y'])} labels for a batch of {batch}"
        if msg.kind == "samples":  # uint8 as stored, maybe compressed
            if "z" in t and isinstance(t, dict):  # decoded here, once, into x
                z = t.pop("z")
                if set(t) - {"y"} or not batch or z.dtype != np.uint8 or z.ndim != 1 \
                        or msg.meta.get("codec") != SAMPLE_CODEC:
                    return "malformed compressed samples: need one uint8 vector z and codec " + SAMPLE_CODEC
                try:
                    t["x"] = unpack_samples(z, spec.shape_at(0), batch)
                except ValueError as exc:
                    return f"malformed: {exc}"
            if set(t) - {"x", "y"}:
                return f"malformed: unexpected tensors {sorted(set(t) - {'x', 'y'})}"
            if "x" not in t:
                return None
            return _batch_of("x", t["x"], spec.shape_at(0), "uint8" if t["x"].dtype == np.uint8 else "float32")
        if msg.kind in ("act", "grad"):
            extra = set(t) - ({"x", "y"} if msg.kind == "act" else {"x"})
            if extra:
                return f"malformed: unexpected tensors {sorted(extra)}"
            if "x" not in t:
                return "malformed: missing tensor 'x'"
            return _batch_of("x", t["x"], spec.shape_at(msg.layer), "float32")
        if msg.kind == "checkpoint" and msg.layer != 0:
            return "malformed: a checkpoint is the whole model's state (layer 0)"
        # wgrad / weights / checkpoint: named parameters (and, for a full state, optimizer moments)
        if msg.layer > spec.n_units:
            return f"malformed: layer {msg.layer} beyond the model's {spec.n_units} units"
        allowed = params if msg.layer == 0 else spec.param_shapes(1, msg.layer)
        for name, a in t.items():
            base = name.split(":", 1)[1] if msg.kind in ("weights", "checkpoint") and name[:2] in ("m:", "v:") \
                else name
            if base not in allowed:
                return f"unknown parameter: {name!r} for units 1..{msg.layer or spec.n_units}"
            if a.dtype != np.float32 or tuple(a.shape) != tuple(allowed[base]):
                return f"wrong shape: {name} is {a.dtype}{list(a.shape)}, expected float32{list(allowed[base])}"
            bad = non_finite(name, a)
            if bad:
                return bad
        return None

    return check
