"""worker_o's checkpoints: the weights and optimizer state as a NumPy ``.npz`` archive, with the
iteration, the optimizer's step count and the schedule in effect as a JSON entry.

Portable on purpose: any tier writes and reads it with NumPy alone (a Raspberry Pi running plain
onnxruntime plays worker_o too), and no pickle is ever loaded. Written atomically (temporary
file, then rename) every K iterations as ``checkpoint-<iteration>.npz``, the newest ``keep``
kept; ``--resume`` and ``hiertrain evaluate`` read the newest. A tier with ``[checkpoint] collect
= true`` receives every checkpoint over MQTT wherever worker_o runs (:mod:`hiertrain.train.collect`).
"""

from __future__ import annotations

import json
import os
import re
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np

from hiertrain.errors import ConfigError

FORMAT = "hiertrain-checkpoint/1"
TMP = "checkpoint.npz.tmp"  # the one file being written; renamed when complete
_NAME = re.compile(r"checkpoint-(\d{8,})\.npz\Z")


@dataclass(frozen=True)
class Checkpoint:
    iteration: int                 # the last iteration whose update it contains
    params: dict[str, np.ndarray]
    moments: dict[str, np.ndarray]
    optimizer_step: int
    schedule: Optional[dict[str, Any]]

    def tensors(self) -> dict[str, np.ndarray]:
        """The state as one message's tensors: parameters, and moments as ``m:``/``v:`` names."""
        return {**self.params, **self.moments}

    def meta(self) -> dict[str, Any]:
        """The scalars beside the tensors in a message (the schedule as JSON text)."""
        return {"iteration": int(self.iteration), "optimizer_step": int(self.optimizer_step),
                "schedule": json.dumps(self.schedule or {})}

    @classmethod
    def from_message(cls, tensors: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> "Checkpoint":
        it, step = meta.get("iteration"), meta.get("optimizer_step")
        if type(it) is not int or type(step) is not int or it < 0 or step < 0:
            raise ConfigError(f"malformed checkpoint message: iteration {it!r}, optimizer step {step!r}")
        try:
            schedule = json.loads(meta.get("schedule") or "{}")
        except (TypeError, ValueError):
            raise ConfigError("malformed checkpoint message: its schedule is not JSON") from None
        return cls(it, {k: v for k, v in tensors.items() if k[:2] not in ("m:", "v:")},
                   {k: v for k, v in tensors.items() if k[:2] in ("m:", "v:")}, step,
                   schedule if isinstance(schedule, dict) and schedule else None)


def path_of(directory: str | os.PathLike, iteration: int) -> Path:
    return Path(directory) / f"checkpoint-{iteration:08d}.npz"


def iterations(directory: str | os.PathLike) -> list[int]:
    """The iterations of the checkpoints in ``directory``, oldest first."""
    d = Path(directory)
    if not d.is_dir():
        return []
    return sorted(int(m.group(1)) for p in d.iterdir() if (m := _NAME.match(p.name)))


def save(directory: str | os.PathLike, ck: Checkpoint, *, keep: int = 3) -> Path:
    """Write ``ck`` atomically, then remove all but the newest ``keep`` checkpoints."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final, tmp = path_of(directory, ck.iteration), directory / TMP
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
    except OSError as exc:  # a full or failing disk: one line; the previous checkpoints stay intact
        raise ConfigError(f"cannot write checkpoint {final} for iteration {ck.iteration}: "
                          f"{exc.strerror or exc}") from None
    finally:
        tmp.unlink(missing_ok=True)
    for old in iterations(directory)[:-max(1, keep)]:
        path_of(directory, old).unlink(missing_ok=True)
    return final


def set_aside(directory: str | os.PathLike, *, after: int = -1) -> Optional[Path]:
    """A new run (not a resumed one) writing into ``directory``: move an earlier run's checkpoints into
    a ``superseded-<UTC time>`` folder beside them, so that they are neither taken for the new run's
    nor pruned in its favour (the newest are kept by iteration). Returns that folder, if any moved.
    ``after``: only those of later iterations (a collector given an earlier one: another run's are ahead)."""
    its = [it for it in iterations(directory) if it > after]
    if not its:
        return None
    aside = Path(directory) / time.strftime("superseded-%Y%m%dT%H%M%SZ", time.gmtime())
    aside.mkdir(exist_ok=True)
    for it in its:
        os.replace(path_of(directory, it), path_of(aside, it))
    return aside


def load(directory: str | os.PathLike, param_names: list[str], iteration: Optional[int] = None) -> Optional[Checkpoint]:
    """The newest checkpoint in ``directory`` (or the one of ``iteration``), or ``None`` if there is none."""
    its = iterations(directory)
    if iteration is not None:
        its = [i for i in its if i == iteration]
    if not its:
        return None
    path = path_of(directory, its[-1])
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
