"""Codec throughput: encode + decode of one float32 tensor, standalone and as a chunked message."""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any, Callable

import numpy as np

from hiertrain.net import reassembly, wire

GOAL_GBPS = 1.0


def _rate(fn: Callable[[], Any], nbytes: int, *, count: int, repeat: int) -> float:
    fn()
    rates = []
    for _ in range(repeat):
        t = time.perf_counter()
        for _ in range(count):
            fn()
        rates.append(count * nbytes / (time.perf_counter() - t) / 1e9)
    return statistics.median(rates)


def bench(args: argparse.Namespace) -> dict[str, Any]:
    size = args.size_mb << 20
    a = np.random.default_rng(0).random(size // 4, dtype=np.float32)
    reassembler = reassembly.Reassembler()
    ids = iter(range(1 << 60))

    def message(chunk: int) -> Callable[[], Any]:
        def go() -> Any:
            msg = wire.Message("act", "bench", "device", "cloud", 0, 1, {"a": a})
            out = None
            for frame in wire.encode_message(msg, msg_id=f"m{next(ids)}", chunk_bytes=chunk):
                out = reassembler.feed(frame)
            assert out is not None and out.tensors["a"].shape == a.shape
            return out
        return go

    results = {
        "tensor_roundtrip_gbps": _rate(lambda: wire.decode_tensor(wire.encode_tensor(a)), size,
                                       count=args.count, repeat=args.repeat),
        "message_1frame_gbps": _rate(message(size + 4096), size, count=args.count, repeat=args.repeat),
        "message_256k_frames_gbps": _rate(message(256 << 10), size, count=args.count, repeat=args.repeat),
    }
    return {"bench": "wire", "tensor_bytes": size, "dtype": "float32", "goal_gbps": GOAL_GBPS,
            **{k: round(v, 2) for k, v in results.items()},
            "meets_goal": min(results.values()) >= GOAL_GBPS}
