"""Models exported from PyTorch the way a user would, and data in the formats a user brings.

Architectures the zoo does not have: a MobileNetV2-style net (depthwise convolutions, inverted
residuals, ReLU6, BatchNorm folded by an eval-mode export) and an MLP for tabular data (GELU,
LayerNorm, BatchNorm1d, Dropout).
"""

from __future__ import annotations

import csv
import warnings
from pathlib import Path

import numpy as np


def export(module, sample_shape, path: Path, *, train: bool = False, dynamic: bool = True, fold: bool = True,
           batchnorm: bool = False) -> Path:
    """As the README says: ``train``, the whole model in training mode; ``batchnorm``, BatchNorm in
    training mode and Dropout in inference mode (what trains BatchNorm from scratch here: the
    export ``bench families`` makes)."""
    import torch

    if batchnorm:
        from hiertrain.bench.families import export as export_training_batchnorm

        return export_training_batchnorm(module, sample_shape, path)
    module.train(train)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.randn(2, *sample_shape),), str(path), dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "N"}, "y": {0: "N"}} if dynamic else None,
                          training=torch.onnx.TrainingMode.TRAINING if train else torch.onnx.TrainingMode.EVAL,
                          do_constant_folding=fold and not train)
    return path


def mobilenet(classes: int = 4):
    import torch.nn as nn

    def bn_relu6(c):
        return [nn.BatchNorm2d(c), nn.ReLU6()]

    class Inverted(nn.Module):
        def __init__(self, c, expand=2):
            super().__init__()
            h = c * expand
            self.block = nn.Sequential(nn.Conv2d(c, h, 1), *bn_relu6(h), nn.Conv2d(h, h, 3, 1, 1, groups=h),
                                       *bn_relu6(h), nn.Conv2d(h, c, 1), nn.BatchNorm2d(c))

        def forward(self, x):
            return x + self.block(x)

    def separable(c_in, c_out, stride):
        return nn.Sequential(nn.Conv2d(c_in, c_in, 3, stride, 1, groups=c_in), *bn_relu6(c_in),
                             nn.Conv2d(c_in, c_out, 1), *bn_relu6(c_out))

    net = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), *bn_relu6(8), separable(8, 16, 1), Inverted(16),
                        separable(16, 24, 2), Inverted(24), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Dropout(0.2), nn.Linear(24, classes))
    _stats(net)
    return net


def mlp(features: int = 8, classes: int = 3):
    import torch.nn as nn

    net = nn.Sequential(nn.Linear(features, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.1),
                        nn.Linear(32, 32), nn.GELU(), nn.LayerNorm(32), nn.Linear(32, classes))
    _stats(net)
    return net


def _stats(net) -> None:
    """Running statistics a trained model would have (not the fresh 0 and 1)."""
    import torch
    import torch.nn as nn

    torch.manual_seed(0)
    for m in net.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.7, 1.3)


def image_folder(root: Path, classes: int = 4, per_class: int = 30, size: int = 40, seed: int = 0) -> Path:
    """PNG images in one folder per class, each class a different stripe frequency plus noise."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
        stripes = 0.5 + 0.3 * np.sin(np.arange(size)[:, None, None] * (c + 1) / 6)
        for i in range(per_class):
            a = np.clip(stripes + 0.15 * rng.standard_normal((size, size, 3)), 0, 1)
            Image.fromarray((a * 255).astype(np.uint8)).save(root / f"class{c}" / f"{i}.png")
    return root


def table(path: Path, n: int = 400, features: int = 8, seed: int = 0) -> Path:
    """A CSV with a header and named classes in a column called species (not the last)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, features)).astype(np.float32)
    y = (x @ rng.standard_normal((features, 3))).argmax(1)
    names = ["setosa", "versicolor", "virginica"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["species"] + [f"f{i}" for i in range(features)])
        for row, label in zip(x, y):
            w.writerow([names[label]] + [f"{v:.6f}" for v in row])
    return path
