"""Datasets: CIFAR-10 (binary format), Tiny-ImageNet (folder layout), a learnable synthetic set, and a
user's own data: an ``.npz`` of arrays, an image folder (one folder per class), a CSV table, or a
Python entry point (``module:function``).

All yield float32 samples (uint8 images scaled to [0, 1]; float data as stored) and int64 labels. Batches are drawn by a seeded
permutation, so every process that knows (dataset, seed, iteration) draws the same batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from hiertrain.errors import ConfigError

CIFAR_RECORD = 1 + 3 * 32 * 32


def stored_dtype(shape: tuple[int, ...]) -> str:
    """How a sample of this shape is usually stored: images ([1 or 3, H, W]) as uint8, else float32."""
    return "uint8" if len(shape) == 3 and shape[0] in (1, 3) else "float32"


def normalize(x: np.ndarray) -> np.ndarray:
    """The model's input from samples as stored: uint8 scaled to [0, 1] float32, floats as float32.
    Done where the samples are used, so uint8 images travel at a quarter of the bytes."""
    return x.astype(np.float32) / np.float32(255.0) if x.dtype == np.uint8 else x.astype(np.float32, copy=False)


@dataclass(frozen=True)
class Dataset:
    name: str
    images: np.ndarray  # uint8 N x C x H x W, or float32
    labels: np.ndarray  # int64 N
    classes: int
    _orders: dict = field(default_factory=dict, compare=False, repr=False)  # (seed, epoch) -> its order

    def __post_init__(self) -> None:
        if len(self.images) != len(self.labels) or not len(self.labels):
            raise ConfigError(f"dataset {self.name}: {len(self.images)} images for {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.images.shape[1:])

    @property
    def sample_bytes(self) -> float:
        """Bytes of one sample as stored, and as it travels (uint8 images: a quarter of float32)."""
        return float(self.images.dtype.itemsize * np.prod(self.shape))

    def take(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x, y = self.take_raw(index)
        return normalize(x), y

    def take_raw(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Samples as stored (what travels: :func:`normalize` makes them the model's input)."""
        return np.ascontiguousarray(self.images[index]), self.labels[index].astype(np.int64)

    def batch(self, iteration: int, size: int, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Batch ``iteration`` of a seeded epoch-wise shuffle."""
        x, y = self.batch_raw(iteration, size, seed=seed)
        return normalize(x), y

    def batch_raw(self, iteration: int, size: int, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`batch` as stored."""
        per_epoch = max(1, len(self) // size)
        epoch, k = divmod(iteration, per_epoch)
        order = self._orders.get((seed, epoch))
        if order is None:  # one shuffle per epoch, not per batch (50,000 samples: a millisecond on a Pi)
            self._orders.clear()
            order = self._orders[(seed, epoch)] = np.random.default_rng([seed, epoch]).permutation(len(self))
        idx = order[k * size:(k + 1) * size] if len(self) >= size else order[np.arange(size) % len(self)]
        return self.take_raw(idx)

    def batches(self, size: int, *, seed: int = 0, start: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        i = start
        while True:
            yield self.batch(i, size, seed=seed)
            i += 1

    def shuffled(self, seed: int = 0) -> "Dataset":
        """The samples in a fixed random order: a user's files are often sorted by class, and the
        first ``holdout`` samples must be a fair sample of them."""
        order = np.random.default_rng([seed, 0x5EED]).permutation(len(self))
        return Dataset(self.name, self.images[order], self.labels[order], self.classes)

    def shard(self, index: int, count: int) -> "Dataset":
        """Every ``count``-th sample from ``index``: one device's part of a data set a fleet shares out."""
        return Dataset(f"{self.name}[{index}/{count}]", self.images[index::count], self.labels[index::count],
                       self.classes)

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


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
NPZ_KEYS = (("x", "y"), ("images", "labels"), ("features", "labels"), ("data", "labels"))
LABEL_COLUMNS = ("label", "labels", "class", "target", "y")


def _labels(path: object, raw: np.ndarray) -> np.ndarray:
    if raw.ndim != 1:
        raise ConfigError(f"{path}: labels must be one integer per sample, not an array shaped {raw.shape}")
    if not np.issubdtype(raw.dtype, np.integer):
        if np.issubdtype(raw.dtype, np.floating) and np.all(raw == np.round(raw)):
            raw = raw.astype(np.int64)
        else:
            raise ConfigError(f"{path}: labels must be integers (class indices), not {raw.dtype}")
    if raw.size and raw.min() < 0:
        raise ConfigError(f"{path}: label {int(raw.min())} is negative")
    return raw.astype(np.int64)


def _samples(path: object, raw: np.ndarray) -> np.ndarray:
    if raw.dtype != np.uint8 and not np.issubdtype(raw.dtype, np.floating):
        raise ConfigError(f"{path}: samples must be uint8 (images, scaled to [0, 1]) or floating point, not {raw.dtype}")
    if raw.ndim < 2:
        raise ConfigError(f"{path}: samples must be an array [N, ...] with one row per sample, not shaped {raw.shape}")
    if np.issubdtype(raw.dtype, np.floating) and not np.all(np.isfinite(raw)):
        raise ConfigError(f"{path}: samples hold NaN or infinite values")
    return raw if raw.dtype == np.uint8 else raw.astype(np.float32)


def _dataset(name: str, path: object, x: np.ndarray, y: np.ndarray) -> Dataset:
    x, y = _samples(path, np.asarray(x)), _labels(path, np.asarray(y))
    if len(x) != len(y):
        raise ConfigError(f"{path}: {len(x)} samples but {len(y)} labels")
    if not len(y):
        raise ConfigError(f"{path}: no samples")
    return Dataset(name, x, y, int(y.max()) + 1)


def npz(path: str | os.PathLike) -> Dataset:
    """An ``.npz`` with samples and labels under x/y, images/labels, features/labels or data/labels."""
    try:
        with np.load(path, allow_pickle=False) as f:
            keys = set(f.files)
            pair = next((p for p in NPZ_KEYS if set(p) <= keys), None)
            if pair is None:
                raise ConfigError(f"{path}: no samples and labels in it (it has {', '.join(sorted(keys)) or 'nothing'}; "
                                  f"name them {' or '.join('/'.join(p) for p in NPZ_KEYS)})")
            x, y = f[pair[0]], f[pair[1]]
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {path} as .npz: {exc}") from None
    return _dataset("npz", path, x, y)


def image_folder(root: str | os.PathLike, shape: tuple[int, ...]) -> Dataset:
    """``root/<class>/<image>``: classes are the folder names in sorted order; every image is
    converted to the model's channels (1: grey, 3: RGB) and resized to its height and width."""
    try:
        from PIL import Image
    except ImportError:
        raise ConfigError("reading an image folder needs Pillow: pip install 'hiertrain[data]'") from None
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"{root} is not a directory of class folders")
    if len(shape) != 3 or shape[0] not in (1, 3):
        raise ConfigError(f"{root}: an image folder feeds models that take [1 or 3, H, W] images, not {shape}")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    items = [(p, i) for i, c in enumerate(classes) for p in sorted((root / c).iterdir())
             if p.suffix.lower() in IMAGE_SUFFIXES]
    if not items:
        raise ConfigError(f"{root}: no images ({', '.join(IMAGE_SUFFIXES)}) in class folders under it")
    mode, (c, h, w) = ("L" if shape[0] == 1 else "RGB"), shape
    images = np.empty((len(items), c, h, w), np.uint8)
    for k, (p, _) in enumerate(items):
        try:
            with Image.open(p) as im:
                a = np.asarray(im.convert(mode).resize((w, h)), np.uint8)
        except OSError as exc:
            raise ConfigError(f"{p}: not an image Pillow reads ({exc})") from None
        images[k] = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
    ds = Dataset("images", images, np.array([i for _, i in items], np.int64), len(classes))
    return ds


def csv(path: str | os.PathLike, *, label: Optional[str] = None) -> Dataset:
    """A table, one sample per row: the label column is ``label`` (a header name or a 0-based index),
    else the column named label/class/target/y, else the one column of words, else the last one. Labels that are not integers are
    class names, numbered in sorted order; every other column must be a number."""
    import csv as csvlib

    try:
        with open(path, newline="") as f:
            rows = [r for r in csvlib.reader(f) if r and any(c.strip() for c in r)]
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    if not rows:
        raise ConfigError(f"{path}: no rows")

    def number(cell: str) -> bool:
        try:
            float(cell)
        except ValueError:
            return False
        return True

    header = None if all(number(c) for c in rows[0]) else [c.strip() for c in rows[0]]
    body = rows[1:] if header else rows
    width = len(rows[0])
    if label is not None:
        if header and label in header:
            col = header.index(label)
        elif label.lstrip("-").isdigit() and -width <= int(label) < width:
            col = int(label) % width
        else:
            raise ConfigError(f"{path}: no label column {label!r} (columns: {', '.join(header or map(str, range(width)))})")
    else:
        words = [k for k, c in enumerate(body[0] if body else []) if not number(c)]
        named = [header.index(c) for c in LABEL_COLUMNS if header and c in header]
        col = named[0] if named else words[0] if len(words) == 1 else width - 1
    feats, labels = [], []
    for n, r in enumerate(body, 2 if header else 1):
        if len(r) != width:
            raise ConfigError(f"{path}, line {n}: {len(r)} columns, the first row has {width}")
        try:
            feats.append([float(c) for k, c in enumerate(r) if k != col])
        except ValueError:
            raise ConfigError(f"{path}, line {n}: a feature that is not a number") from None
        labels.append(r[col].strip())
    if all(number(v) and float(v) == int(float(v)) for v in labels):
        y = np.array([int(float(v)) for v in labels], np.int64)
    else:
        names = sorted(set(labels))
        y = np.array([names.index(v) for v in labels], np.int64)
    return _dataset("csv", path, np.array(feats, np.float32), y)


def entry_point(entry: str, path: Optional[str] = None, *, search: Optional[Path] = None) -> Dataset:
    """``module:function``, called with the data path (if one is set) or nothing, returning a
    Dataset or a pair (samples [N, ...], labels [N]). The module is looked for in ``search`` (the
    config's folder) first, then on the usual path."""
    import importlib
    import sys

    module, _, func = entry.partition(":")
    if not module or not func:
        raise ConfigError(f"entry = {entry!r} must be module:function")
    if search is not None and str(search) not in sys.path:
        sys.path.insert(0, str(search))
    try:
        fn = getattr(importlib.import_module(module), func)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"entry = {entry!r}: {exc}") from None
    got = fn(path) if path is not None else fn()
    if isinstance(got, Dataset):
        return got
    if not (isinstance(got, tuple) and len(got) == 2):
        raise ConfigError(f"entry = {entry!r} returned {type(got).__name__}, not a Dataset or (samples, labels)")
    return _dataset(entry, entry, *got)


def check(ds: Dataset, shape: tuple[int, ...], classes: int, model: str) -> None:
    """The data set fits the model: per-sample shape and label range, or one line saying what differs."""
    if ds.shape != tuple(shape):
        raise ConfigError(f"data: samples of {ds.name} are shaped {ds.shape}, but the model {model} takes "
                          f"{tuple(shape)}")
    top = int(ds.labels.max())
    if top >= classes:
        raise ConfigError(f"data: {ds.name} has label {top}, but the model {model} has {classes} classes "
                          f"(labels 0..{classes - 1})")


SYNTHETIC_HOLDOUT = 512


def synthetic_split(shape: tuple[int, ...], classes: int, *, seed: int = 0) -> tuple[Dataset, Dataset]:
    """The synthetic set tiers train on, and its held-out part (same classes, unseen samples)."""
    return synthetic(shape, classes, n=2048 + SYNTHETIC_HOLDOUT, seed=seed).split(SYNTHETIC_HOLDOUT)


FORMATS = ("synthetic", "cifar10", "tiny-imagenet", "npz", "images", "csv", "python")


def load(name: str, *, path: Optional[str] = None, shape: tuple[int, ...] = (3, 32, 32), classes: int = 10,
         seed: int = 0, entry: Optional[str] = None, label: Optional[str] = None,
         search: Optional[Path] = None) -> Dataset:
    if name == "synthetic":
        return synthetic_split(shape, classes, seed=seed)[0]
    if name == "python":
        if entry is None:
            raise ConfigError("dataset \"python\" needs entry = \"module:function\"")
        return entry_point(entry, path, search=search).shuffled()
    if name not in FORMATS:
        raise ConfigError(f"unknown dataset {name!r}; available: {', '.join(FORMATS)}")
    if path is None:
        raise ConfigError(f"dataset {name!r} needs a path")
    if name == "cifar10":
        return cifar10(path)
    if name == "tiny-imagenet":
        return tiny_imagenet(path)
    if name == "npz":
        return npz(path).shuffled()
    if name == "images":
        return image_folder(path, shape).shuffled()
    return csv(path, label=label).shuffled()


def format_of(path: str | os.PathLike) -> str:
    """The format a path's data is in, by its name: .npz, .csv, or a directory (an image folder)."""
    p = Path(path)
    if p.suffix.lower() in (".npz", ".csv"):
        return p.suffix.lower()[1:]
    if p.is_dir():
        return "images"
    raise ConfigError(f"{path}: not an .npz, a .csv or a folder of class folders")
