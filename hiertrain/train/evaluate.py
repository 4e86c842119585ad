"""``hiertrain evaluate``: held-out accuracy and loss of a checkpoint, with plain onnxruntime.

The checkpoint is worker_o's portable ``.npz`` (:mod:`hiertrain.train.checkpoint`); the model's
forward graph is standard ONNX, so any onnxruntime (a laptop, a Pi) runs it. The held-out set is
the data set's own test split where it has one (CIFAR-10's ``test_batch.bin``, Tiny-ImageNet's
``val``), the synthetic set's held-out part, or else the first ``[eval] holdout`` samples, which
the device then leaves out of training.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from hiertrain.train import checkpoint, data, models
from hiertrain.errors import ConfigError
from hiertrain.tierconfig import TierConfig


@dataclass(frozen=True)
class Result:
    accuracy: float
    loss: float
    samples: int
    iteration: int


def held_out(cfg: TierConfig, spec: models.ModelSpec) -> data.Dataset:
    if cfg.dataset == "synthetic":
        return data.synthetic_split(spec.input_shape, spec.classes, seed=cfg.seed)[1]
    if cfg.dataset == "cifar10" and cfg.data_path and (Path(cfg.data_path) / "test_batch.bin").is_file():
        return data.cifar10(cfg.data_path, train=False)
    if cfg.dataset == "tiny-imagenet" and cfg.data_path and (Path(cfg.data_path) / "val").is_dir():
        return data.tiny_imagenet(cfg.data_path, split="val")
    if cfg.holdout:
        return cfg.load_data(spec).split(cfg.holdout)[1]
    raise ConfigError(f"{cfg.path}: {cfg.dataset} has no test split here; set [eval] holdout = N (the device "
                      f"then trains without its first N samples)")


class Scorer:
    """The model's owner scoring its weights as it trains (``[eval] every = N``): held-out accuracy
    every N steps, for its telemetry (the dashboard's curve), on at most ``[eval] samples`` held-out
    samples (on a Pi, each score costs it a forward pass over them)."""

    def __init__(self, cfg: TierConfig, spec: models.ModelSpec) -> None:
        from hiertrain.train.runtime import Predictor

        self.every = cfg.eval_every
        ds = held_out(cfg, spec)
        self.x, self.y = ds.take(np.arange(min(cfg.eval_samples, len(ds))))
        self.predict = Predictor(spec)  # BatchNorm by its running statistics
        self.owed = False

    def __call__(self, step: int, params: dict[str, np.ndarray], *, whole: bool = True) -> Optional[float]:
        """The accuracy after ``step`` if it is one to score (every N-th), else ``None``. ``whole``: the
        params are the model (in periodic sync, after an average); if not, the score waits for them."""
        self.owed |= (step + 1) % self.every == 0
        if not (self.owed and whole):
            return None
        self.owed = False
        return float((self.predict(params, self.x).argmax(1) == self.y).mean())


def scorer(cfg: TierConfig, spec: models.ModelSpec) -> Optional[Scorer]:
    return Scorer(cfg, spec) if cfg.eval_every else None


def evaluate(cfg: TierConfig, checkpoint_dir: Optional[Path] = None, *, batch: int = 256) -> Result:
    from hiertrain.train.runtime import Predictor

    spec = models.get(cfg.model)
    where = checkpoint_dir or cfg.checkpoint_dir
    if where is None:
        raise ConfigError(f"{cfg.path} has no [checkpoint] dir; pass --checkpoint DIR")
    ck = checkpoint.load(where, list(spec.param_shapes()))
    if ck is None:
        raise ConfigError(f"no checkpoint in {where} (worker_o writes one every [checkpoint] every iterations)")
    predict = Predictor(spec)  # BatchNorm by its running statistics
    ds = held_out(cfg, spec)
    correct, total_loss = 0, 0.0
    for start in range(0, len(ds), batch):
        x, y = ds.take(np.arange(start, min(start + batch, len(ds))))
        logits = predict(ck.params, x).astype(np.float64)
        shifted = logits - logits.max(1, keepdims=True)
        logp = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
        total_loss -= float(logp[np.arange(len(y)), y].sum())
        correct += int((logits.argmax(1) == y).sum())
    return Result(correct / len(ds), total_loss / len(ds), len(ds), ck.iteration)
