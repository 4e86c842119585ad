"""JALAD's 8-bit compression of cut activations: per-tensor affine quantisation to uint8."""

from __future__ import annotations

import numpy as np


def quantize(x: np.ndarray) -> tuple[np.ndarray, float, float]:
    """(codes, low, scale) with x ~ low + codes * scale."""
    lo, hi = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
    scale = (hi - lo) / 255.0 or 1.0
    codes = np.clip(np.rint((x - lo) / scale), 0, 255).astype(np.uint8)
    return codes, lo, scale


def dequantize(codes: np.ndarray, lo: float, scale: float) -> np.ndarray:
    return (codes.astype(np.float32) * np.float32(scale) + np.float32(lo)).astype(np.float32)
