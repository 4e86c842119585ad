"""``hiertrain bench families``: the architectures users bring, trained from scratch across three tiers.

Each family is written after its published PyTorch code (torchvision's ResNet BasicBlock,
MobileNetV2 and V3 InvertedResidual, EfficientNet MBConv, RegNetY block, ConvNeXt CNBlock; timm's ViT),
narrow and short so a run takes a minute, from random weights; it is exported as the README says
(BatchNorm in training mode, Dropout off), imported, and trained by ``hiertrain demo`` on the
user's ``--data`` (broker, profile, planner, three tiers over MQTT) for ``--count`` iterations.
Reported per family: its ops, units, cut points, BatchNorm layers, accuracy on the held-out fifth
before and after, median time per iteration and the schedules the planner published. Needs torch
(the test extra) to write the models.

Each family trains with its published recipe's optimizer (:data:`RECIPES`: torchvision trains
ResNet and RegNet with SGD, ConvNeXt with AdamW, timm ViT with AdamW; the RMSprop of MobileNetV2's,
V3's and EfficientNet's recipes is not among ours, SGD stands in) unless ``--optimizer`` names one for all.
ConvNeXt under plain SGD does not learn, in PyTorch either (digits, 150 steps, lr 0.05 to 0.5).
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import warnings
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

from hiertrain.errors import ConfigError


RECIPES = {"resnet": "sgd", "mobilenetv2": "sgd", "mobilenetv3": "sgd", "efficientnet": "sgd", "regnety": "sgd", "convnext": "adamw",
           "vit": "adamw"}
RATES = {"sgd": 0.05, "adamw": 0.005}  # an optimizer's learning rate when --lr gives none


def families(channels: int, classes: int) -> dict[str, Any]:
    import torch
    import torch.nn as nn

    def bn_act(c, act=nn.ReLU):
        return [nn.BatchNorm2d(c), act()]

    class Basic(nn.Module):  # torchvision.models.resnet.BasicBlock
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), *bn_act(cout),
                                      nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
            self.down = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                         if stride != 1 or cin != cout else nn.Identity())

        def forward(self, x):
            return torch.relu(self.body(x) + self.down(x))

    class SE(nn.Module):  # torchvision.ops.SqueezeExcitation
        def __init__(self, c, squeeze, act=nn.ReLU, scale=nn.Sigmoid):
            super().__init__()
            self.fc1, self.fc2, self.act, self.scale = nn.Conv2d(c, squeeze, 1), nn.Conv2d(squeeze, c, 1), act(), scale()

        def forward(self, x):
            return x * self.scale(self.fc2(self.act(self.fc1(x.mean((2, 3), keepdim=True)))))

    def efficientnet_se(h, cin):  # torchvision EfficientNet MBConv: a quarter of the block's input, SiLU
        return SE(h, max(1, cin // 4), nn.SiLU)

    def mobilenetv3_se(h, cin):  # torchvision MobileNetV3: a quarter of the expansion (to 8), hard sigmoid
        return SE(h, max(8, (h // 4 + 4) // 8 * 8), nn.ReLU, nn.Hardsigmoid)

    class Inverted(nn.Module):  # torchvision MobileNetV2/V3 InvertedResidual, EfficientNet MBConv (act, se)
        def __init__(self, cin, cout, stride, expand, act=nn.ReLU6, se=None):
            super().__init__()
            h = cin * expand
            layers = [nn.Conv2d(cin, h, 1, bias=False), *bn_act(h, act),
                      nn.Conv2d(h, h, 3, stride, 1, groups=h, bias=False), *bn_act(h, act)]
            layers += [se(h, cin)] if se else []
            self.block = nn.Sequential(*layers, nn.Conv2d(h, cout, 1, bias=False), nn.BatchNorm2d(cout))
            self.residual = stride == 1 and cin == cout

        def forward(self, x):
            return x + self.block(x) if self.residual else self.block(x)

    class RegY(nn.Module):  # torchvision RegNet ResBottleneckBlock with SE (RegNetY), group width 8
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.f = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), *bn_act(cout),
                                   nn.Conv2d(cout, cout, 3, stride, 1, groups=cout // 8, bias=False), *bn_act(cout),
                                   SE(cout, max(1, cin // 4)), nn.Conv2d(cout, cout, 1, bias=False), nn.BatchNorm2d(cout))
            self.proj = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                         if stride != 1 or cin != cout else nn.Identity())

        def forward(self, x):
            return torch.relu(self.proj(x) + self.f(x))

    class CNBlock(nn.Module):  # torchvision ConvNeXt CNBlock: depthwise 7x7, channels-last LayerNorm, MLP
        def __init__(self, c):
            super().__init__()
            self.dw, self.norm = nn.Conv2d(c, c, 7, padding=3, groups=c), nn.LayerNorm(c)
            self.mlp = nn.Sequential(nn.Linear(c, 4 * c), nn.GELU(), nn.Linear(4 * c, c))
            self.gamma = nn.Parameter(torch.full((c,), 1e-1))

        def forward(self, x):
            return x + (self.mlp(self.norm(self.dw(x).permute(0, 2, 3, 1))) * self.gamma).permute(0, 3, 1, 2)

    class Attention(nn.Module):  # timm's ViT Attention
        def __init__(self, dim, heads):
            super().__init__()
            self.heads, self.scale = heads, (dim // heads) ** -0.5
            self.qkv, self.proj = nn.Linear(dim, dim * 3), nn.Linear(dim, dim)

        def forward(self, x):
            b, n, c = x.shape
            q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
            a = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
            return self.proj((a @ v).transpose(1, 2).reshape(b, n, c))

    class ViTBlock(nn.Module):  # timm's Block: pre-norm attention and MLP
        def __init__(self, dim, heads):
            super().__init__()
            self.n1, self.attn, self.n2 = nn.LayerNorm(dim), Attention(dim, heads), nn.LayerNorm(dim)
            self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

        def forward(self, x):
            x = x + self.attn(self.n1(x))
            return x + self.mlp(self.n2(x))

    class ViT(nn.Module):
        def __init__(self, dim=32, patch=4, tokens=16):
            super().__init__()
            self.patch, self.pos = nn.Conv2d(channels, dim, patch, patch), nn.Parameter(torch.zeros(1, tokens, dim))
            self.blocks = nn.Sequential(ViTBlock(dim, 4), ViTBlock(dim, 4))
            self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, classes)

        def forward(self, x):
            x = self.patch(x).flatten(2).transpose(1, 2) + self.pos
            return self.head(self.norm(self.blocks(x)).mean(1))

    def head(c):
        return [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, classes)]

    c = channels
    return {
        "resnet": lambda: nn.Sequential(nn.Conv2d(c, 16, 3, 1, 1, bias=False), *bn_act(16), Basic(16, 16, 1),
                                        Basic(16, 32, 2), Basic(32, 32, 1), *head(32)),
        "mobilenetv2": lambda: nn.Sequential(nn.Conv2d(c, 16, 3, 1, 1, bias=False), *bn_act(16, nn.ReLU6),
                                             Inverted(16, 16, 1, 1), Inverted(16, 24, 2, 4), Inverted(24, 24, 1, 4),
                                             nn.Conv2d(24, 64, 1, bias=False), *bn_act(64, nn.ReLU6), *head(64)),
        "mobilenetv3": lambda: nn.Sequential(nn.Conv2d(c, 16, 3, 1, 1, bias=False), *bn_act(16, nn.Hardswish),
                                             Inverted(16, 16, 1, 1, nn.ReLU, mobilenetv3_se), Inverted(16, 24, 2, 4, nn.ReLU),
                                             Inverted(24, 24, 1, 3, nn.Hardswish, mobilenetv3_se),
                                             nn.Conv2d(24, 64, 1, bias=False), *bn_act(64, nn.Hardswish),
                                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 128), nn.Hardswish(),
                                             nn.Linear(128, classes)),
        "efficientnet": lambda: nn.Sequential(nn.Conv2d(c, 16, 3, 1, 1, bias=False), *bn_act(16, nn.SiLU),
                                              Inverted(16, 16, 1, 1, nn.SiLU, efficientnet_se),
                                              Inverted(16, 24, 2, 4, nn.SiLU, efficientnet_se),
                                              Inverted(24, 24, 1, 4, nn.SiLU, efficientnet_se), nn.Conv2d(24, 64, 1, bias=False),
                                              *bn_act(64, nn.SiLU), *head(64)),
        "regnety": lambda: nn.Sequential(nn.Conv2d(c, 16, 3, 1, 1, bias=False), *bn_act(16), RegY(16, 16, 1),
                                         RegY(16, 32, 2), RegY(32, 32, 1), *head(32)),
        "convnext": lambda: nn.Sequential(nn.Conv2d(c, 32, 2, 2), CNBlock(32), CNBlock(32), *head(32)),
        "vit": ViT,
    }


def export(module: Any, shape: tuple[int, ...], path: Path) -> Path:
    import torch
    import torch.nn as nn

    module.train()
    for m in module.modules():
        if isinstance(m, nn.Dropout):
            m.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.randn(2, *shape),), str(path), dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "N"}, "y": {0: "N"}},
                          training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False)
    return path


def _parse(lines: str) -> dict[str, Any]:
    """What ``hiertrain demo`` printed: accuracy, time per iteration, schedules."""
    out: dict[str, Any] = {"schedules": 0}
    for line in lines.splitlines():
        if line.startswith("schedule v"):
            out["schedules"] += 1
            out["plan"] = line.split(": ", 1)[1]
        elif line.startswith("iterations: "):
            out["ms_per_iteration"] = float(line.split("median ", 1)[1].split(" ms", 1)[0])
        elif line.startswith("accuracy on "):
            before, after = line.split(": ", 1)[1].replace(" before", "").replace(" after", "").split(", ")
            out["accuracy_before"], out["accuracy_after"] = float(before), float(after)
    return out


def bench(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from hiertrain import demo
    from hiertrain.train import data, onnxmodel

    if not args.data or not str(args.data).endswith(".npz"):
        raise ConfigError("bench families trains on your images: --data FILE.npz (x: [N, C, H, W], y: labels)")
    ds = data.npz(args.data)
    shape, classes = tuple(ds.images.shape[1:]), ds.classes
    if len(shape) != 3:
        raise ConfigError(f"{args.data}: bench families needs images [C, H, W], not samples of shape {list(shape)}")
    if args.library == "transformers":
        from hiertrain.bench import hubmodels

        if shape[1] != shape[2]:
            raise ConfigError(f"{args.data}: transformers' models take square images, not {shape[1]}x{shape[2]}")
        try:
            built, recipes = hubmodels.families(shape[0], classes, shape[1]), hubmodels.RECIPES
        except ImportError:
            raise ConfigError("bench families --library transformers needs transformers (pip install "
                              "'hiertrain[test]')") from None
    else:
        built, recipes = families(shape[0], classes), RECIPES
    wanted = [f for f in args.families.split(",") if f] or list(built)
    unknown = sorted(set(wanted) - set(built))
    if unknown:
        raise ConfigError(f"unknown families {unknown}; available: {', '.join(built)}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="hiertrain-families-") as d:
        for name in wanted:
            torch.manual_seed(0)
            try:
                path = export(built[name](), shape, Path(d) / f"{name}.onnx")
                spec, found = onnxmodel.inspect(path)
            except Exception as exc:  # noqa: BLE001 - PyTorch's own refusal (a kernel wider than the map), or ours
                why = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
                print(f"{name}: not trained: {why}", file=sys.stderr, flush=True)
                rows.append({"family": name, "exit": 1, "error": why})
                continue
            optimizer = args.optimizer if args.optimizer != "recipe" else recipes[name]
            lr = args.lr or RATES[optimizer]
            printed = io.StringIO()
            with redirect_stdout(printed):
                code = demo.run(model=str(path), iterations=args.count, batch=args.batch, lr=lr,
                                data_path=args.data, optimizer=optimizer)
            row = {"family": name, "optimizer": optimizer, "lr": lr, "ops": sorted({op for u in found.units for op in u["ops"]}), "units": spec.n_units,
                   "cut_points": found.cut_points, "batchnorm_layers": len(spec.momentum),
                   "params": sum(u["params"] for u in found.units), "exit": code, **_parse(printed.getvalue())}
            print(f"{name}: {row.get('accuracy_before')} -> {row.get('accuracy_after')}, "
                  f"{row.get('ms_per_iteration')} ms/iteration, {row['schedules']} schedules", file=sys.stderr,
                  flush=True)
            rows.append(row)
    return {"bench": "families", "library": args.library, "data": str(args.data), "samples": len(ds), "shape": list(shape), "classes": classes,
            "iterations": args.count, "batch": args.batch, "rows": rows}
