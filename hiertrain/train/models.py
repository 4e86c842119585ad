"""The model zoo: DNNs as sequences of *units*, the places a model can be cut.

A unit is a function that appends ONNX nodes to a :class:`Builder`. Parameters are named
``<unit>.<layer>.<weight|bias>`` so that weights move between segments and tiers by name.
:func:`segment_graph` builds the forward graph of any unit range a..b with the parameters as graph
inputs; :mod:`hiertrain.train.segments` turns it into training graphs.

The zoo has no BatchNormalization (ResNet and GoogLeNet are built without it): hybrid parallelism
is then exactly single-process SGD (shared/DESIGN.md). Imported models may train it
(:mod:`hiertrain.train.batchnorm`).
"""

from __future__ import annotations

import functools
import math
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import onnx
from onnx import TensorProto, helper

from hiertrain import MODEL_NAMES
from hiertrain.errors import PlanError

OPSET = 17
IR_VERSION = 8  # onnxruntime 1.19 reads IR <= 10; onnx 1.17 writes 10 by default
Shape = tuple[int, ...]  # per sample: (C, H, W) or (F,)


class Builder:
    """Appends nodes for one graph, tracking per-sample shapes and parameter shapes."""

    def __init__(self, training: bool = True) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.params: dict[str, Shape] = {}
        self.unit = ""
        self._n = 0
        self.training = training                 # BatchNorm: batch statistics (else the running ones)
        self.outputs: list[str] = []             # extra graph outputs: BatchNorm buffers' sums
        self.momenta: dict[str, float] = {}      # BatchNorm buffers' prefix -> PyTorch's momentum
        self.known: list[onnx.ValueInfoProto] = []  # shapes ONNX cannot infer (an imported file's, measured)

    def _name(self, what: str) -> str:
        self._n += 1
        return f"{self.unit}/{what}{self._n}"

    def _param(self, name: str, shape: Shape) -> str:
        full = f"{self.unit}.{name}"
        if full in self.params:
            raise PlanError(f"parameter {full!r} defined twice; give the layers of unit {self.unit!r} distinct names")
        self.params[full] = shape
        return full

    def node(self, op: str, inputs: list[str], **attrs: object) -> str:
        out = self._name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    # layers ------------------------------------------------------------------------------
    def conv(self, x: str, s: Shape, out: int, k: int, *, stride: int = 1, pad: Optional[int] = None,
             relu: bool = True, name: str = "conv") -> tuple[str, Shape]:
        pad = k // 2 if pad is None else pad
        w = self._param(f"{name}.weight", (out, s[0], k, k))
        b = self._param(f"{name}.bias", (out,))
        y = self.node("Conv", [x, w, b], kernel_shape=[k, k], strides=[stride, stride], pads=[pad] * 4)
        h, wd = ((d + 2 * pad - k) // stride + 1 for d in s[1:])
        return (self.node("Relu", [y]) if relu else y), (out, h, wd)

    def maxpool(self, x: str, s: Shape, k: int = 2, stride: int = 2, pad: int = 0) -> tuple[str, Shape]:
        y = self.node("MaxPool", [x], kernel_shape=[k, k], strides=[stride, stride], pads=[pad] * 4)
        return y, (s[0], *((d + 2 * pad - k) // stride + 1 for d in s[1:]))

    def fc(self, x: str, s: Shape, out: int, *, relu: bool = True, name: str = "fc") -> tuple[str, Shape]:
        if len(s) > 1:
            x, s = self.node("Flatten", [x]), (math.prod(s),)
        w = self._param(f"{name}.weight", (out, s[0]))
        b = self._param(f"{name}.bias", (out,))
        y = self.node("Gemm", [x, w, b], transB=1)
        return (self.node("Relu", [y]) if relu else y), (out,)

    def global_avgpool(self, x: str, s: Shape) -> tuple[str, Shape]:
        return self.node("Flatten", [self.node("GlobalAveragePool", [x])]), (s[0],)


UnitFn = Callable[[Builder, str, Shape], tuple[str, Shape]]


@dataclass(frozen=True)
class Unit:
    name: str
    fn: UnitFn


@dataclass(frozen=True)
class ModelSpec:
    name: str
    input_shape: Shape
    classes: int
    units: tuple[Unit, ...]
    # an imported model's (hiertrain.train.onnxmodel): its file's weights, by our parameter names, and the file
    initial: Optional[dict[str, np.ndarray]] = field(default=None, compare=False, hash=False, repr=False)
    source: Optional[str] = None

    @property
    def n_units(self) -> int:
        return len(self.units)

    def unit_index(self, name: str) -> int:
        """1-based index of the unit a parameter ``<unit>.<...>`` belongs to."""
        unit = name.split(".", 1)[0]
        for i, u in enumerate(self.units, 1):
            if u.name == unit:
                return i
        raise PlanError(f"parameter {name!r} belongs to no unit of {self.name}")

    @functools.cached_property
    def layout(self) -> tuple[tuple[Shape, ...], tuple[dict[str, Shape], ...], dict[str, float]]:
        """Per-sample shapes at every cut (index 0 = input), each unit's parameter shapes and the
        BatchNorm momenta (:attr:`momentum`)."""
        shapes: list[Shape] = [self.input_shape]
        params: list[dict[str, Shape]] = []
        momenta: dict[str, float] = {}
        for unit in self.units:
            b = Builder()
            b.unit = unit.name
            _, s = unit.fn(b, "x", shapes[-1])
            shapes.append(s)
            params.append(dict(b.params))
            momenta.update(b.momenta)
        return tuple(shapes), tuple(params), momenta

    @property
    def momentum(self) -> dict[str, float]:
        """Every training-mode BatchNorm's buffer prefix and momentum (:mod:`hiertrain.train.batchnorm`)."""
        return self.layout[2]

    def shape_at(self, cut: int) -> Shape:
        return self.layout[0][cut]

    def param_shapes(self, first: int = 1, last: Optional[int] = None) -> dict[str, Shape]:
        last = self.n_units if last is None else last
        return {k: v for p in self.layout[1][first - 1:last] for k, v in p.items()}

    def check_range(self, first: int, last: int) -> None:
        if not 1 <= first <= last + 1 <= self.n_units + 1:
            raise PlanError(f"unit range {first}..{last} is not within 1..{self.n_units} of {self.name}")

    def output_bytes(self) -> list[float]:
        return [4.0 * math.prod(s) for s in self.layout[0][1:]]

    def param_bytes(self) -> list[float]:
        return [4.0 * sum(math.prod(s) for s in p.values()) for p in self.layout[1]]

    def sample_bytes(self) -> float:
        return 4.0 * math.prod(self.input_shape)


def init_params(spec: ModelSpec, seed: int = 0) -> dict[str, np.ndarray]:
    """He-normal weights, zero biases; each parameter's values depend only on (seed, name). An
    imported model starts from its file's weights."""
    if spec.initial is not None:
        return {k: v.copy() for k, v in spec.initial.items()}
    out = {}
    for name, shape in spec.param_shapes().items():
        if name.endswith(".bias"):
            out[name] = np.zeros(shape, np.float32)
            continue
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
        fan_in = math.prod(shape[1:])
        out[name] = (rng.standard_normal(shape) * math.sqrt(2.0 / fan_in)).astype(np.float32)
    return out


def segment_graph(spec: ModelSpec, first: int, last: int, *, training: bool = True
                  ) -> tuple[onnx.ModelProto, dict[str, Shape]]:
    """Forward graph of units first..last: input ``x`` [N, *shape], output ``y``; params as inputs.
    ``training``: BatchNorm normalises by the batch and the graph also outputs its buffers' sums
    (``<buffer>_grad``); else by the running statistics (evaluation)."""
    spec.check_range(first, last)
    b = Builder(training)
    x, s = "x", spec.shape_at(first - 1)
    for unit in spec.units[first - 1:last]:
        b.unit = unit.name
        x, s = unit.fn(b, x, s)
    nodes = b.nodes + [helper.make_node("Identity", [x], ["y"], name="output")]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *spec.shape_at(first - 1)])]
    inputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(sh)) for n, sh in b.params.items()]
    graph = helper.make_graph(nodes, f"{spec.name}_{first}_{last}", inputs,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", *s])]
                              + [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in b.outputs],
                              value_info=b.known)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="hiertrain")
    model.ir_version = IR_VERSION
    return model, dict(b.params)


# ------------------------------------------------------------------------------------ the zoo

def _seq(*layers: Callable[[Builder, str, Shape], tuple[str, Shape]]) -> UnitFn:
    def fn(b: Builder, x: str, s: Shape) -> tuple[str, Shape]:
        for layer in layers:
            x, s = layer(b, x, s)
        return x, s
    return fn


def conv(out: int, k: int = 3, stride: int = 1, pad: Optional[int] = None, relu: bool = True, name: str = "conv"):
    return lambda b, x, s: b.conv(x, s, out, k, stride=stride, pad=pad, relu=relu, name=name)


def pool(k: int = 2, stride: int = 2, pad: int = 0):
    return lambda b, x, s: b.maxpool(x, s, k, stride, pad)


def fc(out: int, relu: bool = True, name: str = "fc"):
    return lambda b, x, s: b.fc(x, s, out, relu=relu, name=name)


def lenet5() -> ModelSpec:
    """LeNet-5 for 32x32x3 (CIFAR-10) as in the paper: its seven layers are the units."""
    return ModelSpec("lenet5", (3, 32, 32), 10, (
        Unit("conv1", _seq(conv(6, 5, pad=0))), Unit("pool1", _seq(pool())),
        Unit("conv2", _seq(conv(16, 5, pad=0))), Unit("pool2", _seq(pool())),
        Unit("fc1", _seq(fc(120))), Unit("fc2", _seq(fc(84))), Unit("fc3", _seq(fc(10, relu=False))),
    ))


def alexnet(width: float = 1.0, name: str = "alexnet") -> ModelSpec:
    """AlexNet for 64x64x3 Tiny-ImageNet (200 classes), no LRN: five conv and three fc units."""
    c = [max(4, int(round(ch * width))) for ch in (64, 192, 384, 256, 256, 1024)]
    return ModelSpec(name, (3, 64, 64), 200, (
        Unit("conv1", _seq(conv(c[0]), pool())), Unit("conv2", _seq(conv(c[1]), pool())),
        Unit("conv3", _seq(conv(c[2]))), Unit("conv4", _seq(conv(c[3]))),
        Unit("conv5", _seq(conv(c[4]), pool())),
        Unit("fc6", _seq(fc(c[5]))), Unit("fc7", _seq(fc(c[5]))), Unit("fc8", _seq(fc(200, relu=False))),
    ))


def vgg(depth: int) -> ModelSpec:
    """VGG-16/19 for 64x64x3, 200 classes: one unit per conv (pools join the conv before them) and per fc."""
    per_stage = {16: (2, 2, 3, 3, 3), 19: (2, 2, 4, 4, 4)}[depth]
    units, i = [], 0
    for stage, (n, ch) in enumerate(zip(per_stage, (64, 128, 256, 512, 512)), 1):
        for j in range(n):
            i += 1
            layers = [conv(ch)] + ([pool()] if j == n - 1 else [])
            units.append(Unit(f"conv{stage}_{j + 1}", _seq(*layers)))
    units += [Unit("fc6", _seq(fc(1024))), Unit("fc7", _seq(fc(1024))), Unit("fc8", _seq(fc(200, relu=False)))]
    return ModelSpec(f"vgg{depth}", (3, 64, 64), 200, tuple(units))


def _basic_block(out: int, stride: int) -> UnitFn:
    def fn(b: Builder, x: str, s: Shape) -> tuple[str, Shape]:
        y, s1 = b.conv(x, s, out, 3, stride=stride, name="conv1")
        y, s2 = b.conv(y, s1, out, 3, relu=False, name="conv2")
        short = x
        if stride != 1 or s[0] != out:
            short, _ = b.conv(x, s, out, 1, stride=stride, pad=0, relu=False, name="down")
        return b.node("Relu", [b.node("Add", [y, short])]), s2
    return fn


def resnet34() -> ModelSpec:
    """ResNet-34 for 64x64x3, 200 classes, without BatchNorm: stem, 16 basic blocks, head."""
    units = [Unit("stem", _seq(conv(64, 7, stride=2, pad=3), pool(3, 2, 1)))]
    for stage, (n, ch) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512)), 1):
        for j in range(n):
            units.append(Unit(f"layer{stage}_{j + 1}", _basic_block(ch, 2 if j == 0 and stage > 1 else 1)))
    units.append(Unit("head", lambda b, x, s: b.fc(*b.global_avgpool(x, s), 200, relu=False, name="fc")))
    return ModelSpec("resnet34", (3, 64, 64), 200, tuple(units))


def _inception(c1: int, r3: int, c3: int, r5: int, c5: int, pp: int, then_pool: bool) -> UnitFn:
    def fn(b: Builder, x: str, s: Shape) -> tuple[str, Shape]:
        y1, _ = b.conv(x, s, c1, 1, name="b1")
        y3, s3 = b.conv(x, s, r3, 1, name="b3r")
        y3, _ = b.conv(y3, s3, c3, 3, name="b3")
        y5, s5 = b.conv(x, s, r5, 1, name="b5r")
        y5, _ = b.conv(y5, s5, c5, 5, name="b5")
        yp, sp = b.maxpool(x, s, 3, 1, 1)
        yp, _ = b.conv(yp, sp, pp, 1, name="bp")
        y = b.node("Concat", [y1, y3, y5, yp], axis=1)
        out: Shape = (c1 + c3 + c5 + pp, *s[1:])
        return b.maxpool(y, out, 3, 2, 1) if then_pool else (y, out)
    return fn


def googlenet() -> ModelSpec:
    """GoogLeNet (Inception v1) for 64x64x3, 200 classes, no auxiliary heads: each inception is a unit."""
    table = [("3a", 64, 96, 128, 16, 32, 32, False), ("3b", 128, 128, 192, 32, 96, 64, True),
             ("4a", 192, 96, 208, 16, 48, 64, False), ("4b", 160, 112, 224, 24, 64, 64, False),
             ("4c", 128, 128, 256, 24, 64, 64, False), ("4d", 112, 144, 288, 32, 64, 64, False),
             ("4e", 256, 160, 320, 32, 128, 128, True), ("5a", 256, 160, 320, 32, 128, 128, False),
             ("5b", 384, 192, 384, 48, 128, 128, False)]
    units = [Unit("stem", _seq(conv(64, 7, stride=2, pad=3), pool(3, 2, 1))),
             Unit("conv2", _seq(conv(64, 1, pad=0, name="reduce"), conv(192, 3), pool(3, 2, 1)))]
    units += [Unit(f"inception{n}", _inception(*args)) for n, *args in table]
    units.append(Unit("head", lambda b, x, s: b.fc(*b.global_avgpool(x, s), 200, relu=False, name="fc")))
    return ModelSpec("googlenet", (3, 64, 64), 200, tuple(units))


MODELS: dict[str, Callable[[], ModelSpec]] = {
    "lenet5": lenet5,
    "alexnet": alexnet,
    "alexnet-small": lambda: alexnet(0.25, "alexnet-small"),
    "vgg16": lambda: vgg(16),
    "vgg19": lambda: vgg(19),
    "resnet34": resnet34,
    "googlenet": googlenet,
}


assert tuple(MODELS) == MODEL_NAMES, "hiertrain.MODEL_NAMES must list the zoo"


def is_file(name: str) -> bool:
    """Whether a model name is a path to an ONNX file (a user's model) rather than one of the zoo's."""
    return name.endswith(".onnx")


def get(name: str) -> ModelSpec:
    """A zoo model by name, or a user's model from an ``.onnx`` file (:mod:`hiertrain.train.onnxmodel`)."""
    if is_file(name):
        path = Path(name).expanduser().resolve()
        try:
            st = path.stat()
        except OSError:
            raise PlanError(f"no model file {name}") from None
        return _imported(str(path), st.st_mtime_ns, st.st_size)
    return _zoo(name)


@functools.lru_cache(maxsize=None)
def _zoo(name: str) -> ModelSpec:
    try:
        return MODELS[name]()
    except KeyError:
        raise PlanError(f"unknown model {name!r}; available: {', '.join(MODELS)}, or a path to an .onnx file") from None


@functools.lru_cache(maxsize=16)
def _imported(path: str, mtime_ns: int, size: int) -> ModelSpec:
    from hiertrain.train import onnxmodel

    return onnxmodel.load(Path(path))
