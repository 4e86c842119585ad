"""worker_o's checkpoints: the weights and optimizer state as a NumPy ``.npz`` archive, with the
iteration, the optimizer's step count and the schedule in effect as a JSON entry.

Portable on purpose: any tier writes and reads it with NumPy alone (a Raspberry Pi running plain
onnxruntime plays worker_o too), and no pickle is ever loaded. Written atomically (temporary
file, then rename) every K iterations; ``--resume`` reads the newest.
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from hiertrain.errors import ConfigError

NAME = "checkpoint.npz"
FORMAT = "hiertrain-checkpoint/1"


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
    final, tmp = directory / NAME, directory / f"{NAME}.tmp"
    meta = {"format": FORMAT, "iteration": int(ck.iteration), "optimizer_step": int(ck.optimizer_step),
            "schedule": ck.schedule or {}, "params": list(ck.params), "moments": list(ck.moments)}
    arrays = {f"p{i}": v for i, v in enumerate(ck.params.values())}
    arrays.update({f"m{i}": v for i, v in enumerate(ck.moments.values())})
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except OSError as exc:  # a full or failing disk: one line; the previous checkpoint stays intact
        raise ConfigError(f"cannot write checkpoint {final} for iteration {ck.iteration}: "
                          f"{exc.strerror or exc}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return final


def load(directory: str | os.PathLike, param_names: list[str]) -> Optional[Checkpoint]:
    """The checkpoint in ``directory``, or ``None`` if there is none."""
    path = Path(directory) / NAME
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(z["meta"].tobytes())
            if meta.get("format") != FORMAT:
                raise ConfigError(f"checkpoint {path} is not a {FORMAT}")
            stored = {n: z[f"p{i}"] for i, n in enumerate(meta["params"])}
            moments = {n: z[f"m{i}"] for i, n in enumerate(meta["moments"])}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        raise ConfigError(f"checkpoint {path} cannot be read: {exc}") from None
    missing = [n for n in param_names if n not in stored]
    if missing:
        raise ConfigError(f"checkpoint {path} lacks parameters {missing[:3]}: was it written for another model?")
    return Checkpoint(int(meta["iteration"]), {n: stored[n] for n in param_names}, moments,
                      int(meta["optimizer_step"]), meta["schedule"] or None)
