"""The ``hiertrain-profile/1`` format (shared/COSTMODEL.md): per-unit sizes and per-tier timings.

A pure data module (no ORT): the profiler writes it, tiers publish it, the planner reads it.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

from hiertrain import TIERS
from hiertrain.errors import PlanError

FORMAT = "hiertrain-profile/1"


@dataclass(frozen=True)
class Layer:
    name: str
    output_bytes: float
    param_bytes: float


@dataclass(frozen=True)
class TierTimes:
    """Seconds per sample (forward, backward) and per iteration (update) of each unit on one tier."""

    forward_s: tuple[float, ...]
    backward_s: tuple[float, ...]
    update_s: tuple[float, ...]
    can_train: bool = True
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Profile:
    model: str
    sample_bytes: float
    layers: tuple[Layer, ...]
    tiers: Mapping[str, TierTimes]
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def n_units(self) -> int:
        return len(self.layers)

    # --------------------------------------------------------------------- I/O

    @classmethod
    def from_json(cls, data: Any, *, where: str = "profile") -> "Profile":
        def fail(what: str) -> PlanError:
            return PlanError(f"{where}: {what}")

        if not isinstance(data, dict):
            raise fail("not a JSON object")
        if data.get("format") != FORMAT:
            raise fail(f"format is {data.get('format')!r}, expected {FORMAT!r}")
        layers_raw = data.get("layers")
        if not isinstance(layers_raw, list) or not layers_raw:
            raise fail("'layers' must be a non-empty list")
        layers = []
        for i, layer in enumerate(layers_raw):
            if not isinstance(layer, dict) or not isinstance(layer.get("name"), str):
                raise fail(f"layers[{i}] needs a name, output_bytes and param_bytes")
            layers.append(Layer(layer["name"], _number(layer.get("output_bytes"), f"layers[{i}].output_bytes", fail),
                                _number(layer.get("param_bytes"), f"layers[{i}].param_bytes", fail)))
        n = len(layers)
        tiers_raw = data.get("tiers")
        if not isinstance(tiers_raw, dict):
            raise fail("'tiers' must be an object")
        tiers = {}
        for tier, entry in tiers_raw.items():
            if tier not in TIERS:
                raise fail(f"unknown tier {tier!r}; expected {', '.join(TIERS)}")
            if not isinstance(entry, dict):
                raise fail(f"tiers.{tier} must be an object")
            can_train = entry.get("can_train", True)
            if not isinstance(can_train, bool):
                raise fail(f"tiers.{tier}.can_train must be true or false")
            arrays = {}
            for key in ("forward_s", "backward_s", "update_s"):
                values = entry.get(key, [] if not can_train else None)
                if not can_train and values == []:
                    values = [0.0] * n
                if not isinstance(values, list) or len(values) != n:
                    raise fail(f"tiers.{tier}.{key} must list {n} numbers, one per layer")
                arrays[key] = tuple(_number(v, f"tiers.{tier}.{key}", fail) for v in values)
            tiers[tier] = TierTimes(**arrays, can_train=can_train,
                                    extra={k: v for k, v in entry.items() if k not in (*arrays, "can_train")})
        return cls(str(data.get("model", "?")), _number(data.get("sample_bytes"), "sample_bytes", fail),
                   tuple(layers), tiers,
                   extra={k: v for k, v in data.items() if k not in ("format", "model", "sample_bytes", "layers", "tiers")})

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Profile":
        try:
            text = Path(path).read_text()
        except FileNotFoundError:
            raise PlanError(f"profile {str(path)!r} does not exist") from None
        except OSError as exc:
            raise PlanError(f"cannot read profile {str(path)!r}: {exc.strerror}") from None
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise PlanError(f"profile {str(path)!r} is not JSON: {exc}") from None
        return cls.from_json(data, where=f"profile {str(path)!r}")

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "model": self.model, "sample_bytes": self.sample_bytes,
            "layers": [{"name": l.name, "output_bytes": l.output_bytes, "param_bytes": l.param_bytes}
                       for l in self.layers],
            "tiers": {t: {"forward_s": list(v.forward_s), "backward_s": list(v.backward_s),
                          "update_s": list(v.update_s), **({"can_train": False} if not v.can_train else {}),
                          **v.extra}
                      for t, v in self.tiers.items()},
            **self.extra,
        }

    def require_tiers(self) -> "Profile":
        missing = [t for t in TIERS if t not in self.tiers]
        if missing:
            raise PlanError(f"profile of {self.model} has no timings for {', '.join(missing)}; "
                            "planning needs device, edge and cloud")
        return self

    def merged(self, tier: str, other: "Profile", *, as_tier: Optional[str] = None) -> "Profile":
        """This profile with ``other``'s timings for ``tier`` (stored under ``as_tier``, default the same)."""
        if [l.name for l in other.layers] != [l.name for l in self.layers]:
            raise PlanError(f"cannot merge profiles of different layer lists ({other.model} into {self.model})")
        tiers = dict(self.tiers)
        tiers[as_tier or tier] = other.tiers[tier]
        return Profile(self.model, self.sample_bytes, self.layers, tiers, self.extra)


def _number(value: Any, what: str, fail: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise fail(f"{what} must be a finite number >= 0, got {value!r}")
    return float(value)
