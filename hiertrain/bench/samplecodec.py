"""Does lossless compression of samples pay on the device-edge link? (``hiertrain bench samplecodec``)

Compressing a batch costs the device CPU and the receiver CPU, and saves link time. For each codec
and data set this measures the size ratio and the seconds per sample to compress and decompress
on this machine, then scales them to the emulated tiers (CPU time over the tier's quota: the Pi-3
device, the edge) and gives the break-even rate: compression saves time only on links slower
than it. Data sets: the synthetic set the demo and testbed train on (smooth templates plus
strong noise) and 32x32 crops of a photograph that ships with matplotlib (a stand-in for
CIFAR-like natural images; the real CIFAR-10 is not on this machine).
"""

from __future__ import annotations

import argparse
import time
import zlib
from typing import Any, Callable

import numpy as np

from hiertrain.lab.emulation import REFERENCE_QUOTAS
from hiertrain.net.compress import pack_samples, unpack_samples
from hiertrain.train.data import synthetic

PI3_DEVICE, EDGE = REFERENCE_QUOTAS["device"], REFERENCE_QUOTAS["edge"]


def _zlib(level: int) -> tuple[Callable[[np.ndarray], bytes], Callable[[bytes, tuple[int, ...]], np.ndarray]]:
    return (lambda x: zlib.compress(x.tobytes(), level),
            lambda b, s: np.frombuffer(zlib.decompress(b), np.uint8).reshape(s))


CODECS = {"zlib-1": _zlib(1), "zlib-6": _zlib(6),  # "up+zlib-1": what `[data] compress = true` sends
          "up+zlib-1": (lambda x: pack_samples(x).tobytes(),
                        lambda b, s: unpack_samples(np.frombuffer(b, np.uint8), s[1:], s[0]))}


def photo_crops(n: int) -> np.ndarray:
    """n 3x32x32 uint8 crops of matplotlib's sample photograph, downscaled 4x first (CIFAR-like detail)."""
    import matplotlib
    from PIL import Image

    path = f"{matplotlib.get_data_path()}/sample_data/grace_hopper.jpg"
    img = np.asarray(Image.open(path).convert("RGB").reduce(4)).transpose(2, 0, 1)
    rng = np.random.default_rng(0)
    ys, xs = rng.integers(0, img.shape[1] - 32, n), rng.integers(0, img.shape[2] - 32, n)
    return np.stack([img[:, y:y + 32, x:x + 32] for y, x in zip(ys, xs)])


def measure(x: np.ndarray, codec: str, repeat: int) -> dict[str, Any]:
    enc, dec = CODECS[codec]
    blob = enc(x)
    if not np.array_equal(dec(blob, x.shape), x):
        raise RuntimeError(f"{codec} is not lossless")
    t0 = time.perf_counter()
    for _ in range(repeat):
        blob = enc(x)
    t_enc = (time.perf_counter() - t0) / repeat / len(x)
    t0 = time.perf_counter()
    for _ in range(repeat):
        dec(blob, x.shape)
    t_dec = (time.perf_counter() - t0) / repeat / len(x)
    saved_bits = 8 * (x.nbytes - len(blob)) / len(x)
    cost = t_enc / PI3_DEVICE + t_dec / EDGE  # seconds per sample, emulated device and edge
    return {"ratio": round(len(blob) / x.nbytes, 3), "compress_us_per_sample": round(1e6 * t_enc, 2),
            "decompress_us_per_sample": round(1e6 * t_dec, 2),
            "emulated_cost_ms_per_sample": round(1e3 * cost, 3),
            "break_even_mbps": round(saved_bits / cost / 1e6, 3) if saved_bits > 0 else 0.0}


def bench(args: argparse.Namespace) -> dict[str, Any]:
    batch = 32
    sets = {"synthetic": synthetic(n=batch).images, "photo-crops": photo_crops(batch)}
    rows = {name: {codec: measure(x, codec, args.repeat * 20) for codec in CODECS} for name, x in sets.items()}
    return {"bench": "samplecodec", "batch": batch, "sample_bytes": 3072,
            "emulated_quotas": {"device": PI3_DEVICE, "edge": EDGE}, "rows": rows,
            "reading": "compression pays on a link slower than break_even_mbps (device-edge: 5 Mbit/s in the paper)"}
