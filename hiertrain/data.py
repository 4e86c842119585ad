"""Datasets: CIFAR-10 (binary format), Tiny-ImageNet (folder layout), and a learnable synthetic set.

All yield float32 NCHW images scaled to [0, 1] and int64 labels. Batches are drawn by a seeded
permutation, so every process that knows (dataset, seed, iteration) draws the same batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from hiertrain.errors import ConfigError

CIFAR_RECORD = 1 + 3 * 32 * 32


@dataclass(frozen=True)
class Dataset:
    name: str
    images: np.ndarray  # uint8 N x C x H x W, or float32
    labels: np.ndarray  # int64 N
    classes: int

    def __post_init__(self) -> None:
        if len(self.images) != len(self.labels) or not len(self.labels):
            raise ConfigError(f"dataset {self.name}: {len(self.images)} images for {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.images.shape[1:])

    def take(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = self.images[index]
        x = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32, copy=False)
        return np.ascontiguousarray(x), self.labels[index].astype(np.int64)

    def batch(self, iteration: int, size: int, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Batch ``iteration`` of a seeded epoch-wise shuffle."""
        per_epoch = max(1, len(self) // size)
        epoch, k = divmod(iteration, per_epoch)
        order = np.random.default_rng([seed, epoch]).permutation(len(self))
        idx = order[k * size:(k + 1) * size] if len(self) >= size else order[np.arange(size) % len(self)]
        return self.take(idx)

    def batches(self, size: int, *, seed: int = 0, start: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        i = start
        while True:
            yield self.batch(i, size, seed=seed)
            i += 1

    def split(self, holdout: int) -> tuple["Dataset", "Dataset"]:
        return (Dataset(self.name, self.images[holdout:], self.labels[holdout:], self.classes),
                Dataset(f"{self.name}-holdout", self.images[:holdout], self.labels[:holdout], self.classes))


def synthetic(shape: tuple[int, ...] = (3, 32, 32), classes: int = 10, n: int = 2048, *, seed: int = 0,
              noise: float = 0.35) -> Dataset:
    """Images made of a per-class smooth random template plus noise: learnable, but not trivially."""
    rng = np.random.default_rng(seed)
    c, h, w = shape
    coarse = rng.uniform(-1, 1, (classes, c, 4, 4))
    templates = coarse.repeat(-(-h // 4), axis=2).repeat(-(-w // 4), axis=3)[:, :, :h, :w]
    labels = rng.integers(0, classes, n)
    x = 0.5 + 0.25 * templates[labels] + noise * rng.standard_normal((n, c, h, w))
    return Dataset(f"synthetic{classes}", np.clip(x * 255, 0, 255).astype(np.uint8), labels.astype(np.int64), classes)


def cifar10(root: str | os.PathLike, *, train: bool = True) -> Dataset:
    """The CIFAR-10 binary version: ``data_batch_{1..5}.bin`` / ``test_batch.bin`` under ``root``."""
    root = Path(root)
    names = [f"data_batch_{i}.bin" for i in range(1, 6)] if train else ["test_batch.bin"]
    files = [root / n for n in names if (root / n).is_file()]
    if not files:
        raise ConfigError(f"no CIFAR-10 binary files ({', '.join(names)}) in {root}")
    raw = []
    for f in files:
        data = np.fromfile(f, np.uint8)
        if data.size % CIFAR_RECORD:
            raise ConfigError(f"{f} is {data.size} bytes, not a multiple of the {CIFAR_RECORD}-byte CIFAR record")
        raw.append(data.reshape(-1, CIFAR_RECORD))
    records = np.concatenate(raw)
    labels = records[:, 0].astype(np.int64)
    if labels.max() > 9:
        raise ConfigError(f"{root}: label {labels.max()} out of range for CIFAR-10")
    return Dataset("cifar10", records[:, 1:].reshape(-1, 3, 32, 32), labels, 10)


def tiny_imagenet(root: str | os.PathLike, *, split: str = "train", limit: Optional[int] = None) -> Dataset:
    """Tiny-ImageNet: ``wnids.txt``, ``train/<wnid>/images/*.JPEG``, ``val/images`` + ``val_annotations.txt``."""
    try:
        from PIL import Image
    except ImportError:
        raise ConfigError("reading Tiny-ImageNet needs Pillow: pip install pillow") from None
    root = Path(root)
    wnids_file = root / "wnids.txt"
    if not wnids_file.is_file():
        raise ConfigError(f"{root} has no wnids.txt; not a Tiny-ImageNet folder")
    wnids = [w.strip() for w in wnids_file.read_text().split() if w.strip()]
    index = {w: i for i, w in enumerate(wnids)}
    if split == "train":
        items = [(p, index[w]) for w in wnids for p in sorted((root / "train" / w / "images").glob("*.JPEG"))]
    elif split == "val":
        ann = (root / "val" / "val_annotations.txt").read_text().splitlines()
        items = [(root / "val" / "images" / line.split("\t")[0], index[line.split("\t")[1]]) for line in ann if line.strip()]
    else:
        raise ConfigError(f"Tiny-ImageNet split must be train or val, not {split!r}")
    items = items[:limit] if limit else items
    if not items:
        raise ConfigError(f"no {split} images under {root}")
    images = np.stack([np.asarray(Image.open(p).convert("RGB").resize((64, 64)), np.uint8).transpose(2, 0, 1)
                       for p, _ in items])
    return Dataset("tiny-imagenet", images, np.array([c for _, c in items], np.int64), len(wnids))


SYNTHETIC_HOLDOUT = 512


def synthetic_split(shape: tuple[int, ...], classes: int, *, seed: int = 0) -> tuple[Dataset, Dataset]:
    """The synthetic set tiers train on, and its held-out part (same classes, unseen samples)."""
    return synthetic(shape, classes, n=2048 + SYNTHETIC_HOLDOUT, seed=seed).split(SYNTHETIC_HOLDOUT)


def load(name: str, *, path: Optional[str] = None, shape: tuple[int, ...] = (3, 32, 32), classes: int = 10,
         seed: int = 0) -> Dataset:
    if name == "synthetic":
        return synthetic_split(shape, classes, seed=seed)[0]
    if path is None:
        raise ConfigError(f"dataset {name!r} needs a path")
    if name == "cifar10":
        return cifar10(path)
    if name == "tiny-imagenet":
        return tiny_imagenet(path)
    raise ConfigError(f"unknown dataset {name!r}; available: synthetic, cifar10, tiny-imagenet")
