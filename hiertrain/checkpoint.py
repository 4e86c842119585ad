"""worker_o's checkpoints: an ONNX Runtime training checkpoint of the weights and optimizer state,
with the iteration and the schedule in effect as checkpoint properties.

Written atomically (temporary file, then rename) every K iterations; ``--resume`` reads the newest.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
from onnx import numpy_helper
from onnxruntime.capi import _pybind_state as C

from hiertrain.errors import ConfigError

NAME = "checkpoint.ort"


@dataclass(frozen=True)
class Checkpoint:
    iteration: int                 # the last iteration whose update it contains
    params: dict[str, np.ndarray]
    moments: dict[str, np.ndarray]
    optimizer_step: int
    schedule: Optional[dict[str, Any]]


def save(directory: str | os.PathLike, ck: Checkpoint) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final, tmp, raw = directory / NAME, directory / f"{NAME}.tmp", directory / f"{NAME}.raw"
    C.save_checkpoint([numpy_helper.from_array(v, k).SerializeToString() for k, v in ck.params.items()],
                      [numpy_helper.from_array(v, k).SerializeToString() for k, v in ck.moments.items()],
                      os.fspath(raw), False)
    state = C.load_checkpoint(os.fspath(raw))
    state.add_property("iteration", int(ck.iteration))
    state.add_property("optimizer_step", int(ck.optimizer_step))
    state.add_property("schedule", json.dumps(ck.schedule or {}))
    C.save_checkpoint(state, os.fspath(tmp), False)
    os.replace(tmp, final)
    raw.unlink()
    return final


def load(directory: str | os.PathLike, param_names: list[str]) -> Optional[Checkpoint]:
    """The checkpoint in ``directory``, or ``None`` if there is none."""
    path = Path(directory) / NAME
    if not path.is_file():
        return None
    try:
        state = C.load_checkpoint(os.fspath(path))
        names = set(state.parameter_names())
        missing = [n for n in param_names if n not in names]
        if missing:
            raise ConfigError(f"checkpoint {path} lacks parameters {missing[:3]}: was it written for another model?")
        params = {n: state.get_parameter(n).data.numpy().copy() for n in param_names}
        moments = {n: state.get_parameter(n).data.numpy().copy() for n in names - set(param_names)}
        schedule = json.loads(state.get_property("schedule")) or None
        return Checkpoint(int(state.get_property("iteration")), params, moments,
                          int(state.get_property("optimizer_step")), schedule)
    except RuntimeError as exc:
        raise ConfigError(f"checkpoint {path} cannot be read: {exc}") from None
