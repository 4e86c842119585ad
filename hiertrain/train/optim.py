"""Optimizers as ONNX graphs run by ONNX Runtime: plain SGD (as in the paper) and AdamW.

worker_o holds the optimizer and its state. It sums its own parameter gradients with those s and
l sent, then runs one step of this graph over every parameter: the update arithmetic happens
inside ORT, the same way on every tier. The state (AdamW moments, step count) is numpy arrays
that checkpoints save and that can move with their units. BatchNorm's buffers are no parameters
of the graph: their running statistics move by the sums that arrive in their gradients' place
(:func:`hiertrain.train.batchnorm.update`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from hiertrain.errors import PlanError
from hiertrain.train import batchnorm
from hiertrain.train.models import IR_VERSION, OPSET, Shape
from hiertrain.train.segments import session_options

KINDS = ("sgd", "adamw")


@dataclass(frozen=True)
class OptimizerConfig:
    kind: str = "sgd"
    lr: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise PlanError(f"unknown optimizer {self.kind!r}; available: {', '.join(KINDS)}")
        if not self.lr > 0:
            raise PlanError(f"learning rate must be > 0, got {self.lr}")


def _scalar(name: str) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, [])


def _graph(kind: str, shapes: Mapping[str, Shape]) -> onnx.ModelProto:
    nodes, inputs, outputs = [], [_scalar("lr")], []
    if kind == "adamw":
        inputs += [_scalar(n) for n in ("beta1", "beta2", "eps", "wd", "step")]
        nodes += [helper.make_node("Constant", [], ["one"], value=helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])),
                  helper.make_node("Pow", ["beta1", "step"], ["b1t"]), helper.make_node("Sub", ["one", "b1t"], ["bc1"]),
                  helper.make_node("Pow", ["beta2", "step"], ["b2t"]), helper.make_node("Sub", ["one", "b2t"], ["bc2"]),
                  helper.make_node("Sub", ["one", "beta1"], ["ib1"]), helper.make_node("Sub", ["one", "beta2"], ["ib2"]),
                  helper.make_node("Mul", ["lr", "wd"], ["lrwd"]), helper.make_node("Sub", ["one", "lrwd"], ["decay"])]
    for i, (name, shape) in enumerate(shapes.items()):
        w, g, o = f"w{i}", f"g{i}", f"w{i}_new"
        inputs += [helper.make_tensor_value_info(t, TensorProto.FLOAT, list(shape)) for t in (w, g)]
        outputs.append(helper.make_tensor_value_info(o, TensorProto.FLOAT, list(shape)))
        if kind == "sgd":
            nodes += [helper.make_node("Mul", ["lr", g], [f"s{i}"]), helper.make_node("Sub", [w, f"s{i}"], [o])]
            continue
        m, v = f"m{i}", f"v{i}"
        inputs += [helper.make_tensor_value_info(t, TensorProto.FLOAT, list(shape)) for t in (m, v)]
        outputs += [helper.make_tensor_value_info(f"{t}_new", TensorProto.FLOAT, list(shape)) for t in (m, v)]
        nodes += [
            # m' = b1 m + (1 - b1) g ; v' = b2 v + (1 - b2) g^2
            helper.make_node("Mul", ["beta1", m], [f"a{i}"]), helper.make_node("Mul", ["ib1", g], [f"b{i}"]),
            helper.make_node("Add", [f"a{i}", f"b{i}"], [f"{m}_new"]),
            helper.make_node("Mul", [g, g], [f"gg{i}"]), helper.make_node("Mul", ["beta2", v], [f"c{i}"]),
            helper.make_node("Mul", ["ib2", f"gg{i}"], [f"d{i}"]), helper.make_node("Add", [f"c{i}", f"d{i}"], [f"{v}_new"]),
            # w' = w (1 - lr wd) - lr (m'/c1) / (sqrt(v'/c2) + eps)
            helper.make_node("Div", [f"{m}_new", "bc1"], [f"mh{i}"]), helper.make_node("Div", [f"{v}_new", "bc2"], [f"vh{i}"]),
            helper.make_node("Sqrt", [f"vh{i}"], [f"sq{i}"]), helper.make_node("Add", [f"sq{i}", "eps"], [f"den{i}"]),
            helper.make_node("Div", [f"mh{i}", f"den{i}"], [f"u{i}"]), helper.make_node("Mul", ["lr", f"u{i}"], [f"lu{i}"]),
            helper.make_node("Mul", [w, "decay"], [f"wd{i}"]), helper.make_node("Sub", [f"wd{i}", f"lu{i}"], [o]),
        ]
    graph = helper.make_graph(nodes, f"{kind}_step", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="hiertrain")
    model.ir_version = IR_VERSION
    return model


@dataclass
class Optimizer:
    """One optimizer over a fixed set of parameters (names and shapes); ``momenta``: the BatchNorm
    layers among them (:attr:`hiertrain.train.models.ModelSpec.momentum`)."""

    config: OptimizerConfig
    shapes: Mapping[str, Shape]
    step_count: int = 0
    moments: dict[str, np.ndarray] = field(default_factory=dict)
    momenta: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        so = session_options()
        self.names = [n for n in self.shapes if not batchnorm.is_buffer(n)]
        self._momenta = {p: m for p, m in self.momenta.items() if batchnorm.buffers(p)[0] in self.shapes}
        self._session = ort.InferenceSession(_graph(self.config.kind, {n: self.shapes[n] for n in self.names})
                                             .SerializeToString(), so, providers=["CPUExecutionProvider"])
        if self.config.kind == "adamw" and not self.moments:
            for n, s in ((n, self.shapes[n]) for n in self.names):
                self.moments[f"m:{n}"] = np.zeros(s, np.float32)
                self.moments[f"v:{n}"] = np.zeros(s, np.float32)

    def step(self, params: Mapping[str, np.ndarray], grads: Mapping[str, np.ndarray],
             frozen: frozenset[str] = frozenset()) -> dict[str, np.ndarray]:
        """New values of every parameter; a parameter without a gradient gets a zero one, and one of
        ``frozen`` (with its moments) stays as it was."""
        c = self.config
        before = dict(self.moments) if frozen else {}
        self.step_count += 1
        f32 = np.float32
        feed: dict[str, np.ndarray] = {"lr": np.array(c.lr, f32)}
        if c.kind == "adamw":
            feed.update(beta1=np.array(c.beta1, f32), beta2=np.array(c.beta2, f32), eps=np.array(c.eps, f32),
                        wd=np.array(c.weight_decay, f32), step=np.array(self.step_count, f32))
        for i, n in enumerate(self.names):
            feed[f"w{i}"] = params[n]
            g = grads.get(n)
            feed[f"g{i}"] = g if g is not None else np.zeros(self.shapes[n], np.float32)
            if c.kind == "adamw":
                feed[f"m{i}"], feed[f"v{i}"] = self.moments[f"m:{n}"], self.moments[f"v:{n}"]
        outs = self._session.run(None, feed)
        per = 1 if c.kind == "sgd" else 3
        new = {n: params[n] for n in self.shapes if batchnorm.is_buffer(n)}
        new.update(batchnorm.update(params, grads, self._momenta))
        for i, n in enumerate(self.names):
            new[n] = outs[per * i]
            if c.kind == "adamw":
                self.moments[f"m:{n}"], self.moments[f"v:{n}"] = outs[per * i + 1], outs[per * i + 2]
        for n in frozen:
            new[n] = params[n]
            self.moments.update({k: before[k] for k in (f"m:{n}", f"v:{n}") if k in before})
        return new
