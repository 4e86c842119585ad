"""Where a user's graph is cut into units (:mod:`hiertrain.train.onnxmodel`): the places in node order
where exactly one activation ``[N, ...]`` crosses and no parameter is used on both sides; the nodes
between two of them are a unit (one without parameters joins the one before), named after the
modules its parameters belong to, and built into any segment by :func:`unit_fn`.
"""

from __future__ import annotations

import re

import numpy as np
import onnx
from onnx import helper, numpy_helper

from hiertrain.train import batchnorm
from hiertrain.train.models import Builder, Shape


def common(paths: list[str]) -> str:
    """The longest dotted prefix of module paths: ``1.a``, ``1.b`` -> ``1``."""
    split = [p.split(".") for p in paths]
    out = []
    for parts in zip(*split):
        if len(set(parts)) > 1:
            break
        out.append(parts[0])
    return ".".join(out)


def sanitize(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", s).strip("_") or "unit"


def cut_points(nodes, params, shapes, *, x: str, y: str) -> list[int]:
    """Positions i (a cut before nodes[i]) where one activation [N, ...] crosses and no parameter."""
    produced_at = {x: -1}
    for i, n in enumerate(nodes):
        for o in n.output:
            produced_at[o] = i
    last_use: dict[str, int] = {y: len(nodes)}
    first_use_param: dict[str, int] = {}
    last_use_param: dict[str, int] = {}
    for i, n in enumerate(nodes):
        for t in n.input:
            if t in produced_at:
                last_use[t] = max(last_use.get(t, -1), i)
            if t in params:
                first_use_param.setdefault(t, i)
                last_use_param[t] = i
    cuts = []
    for i in range(1, len(nodes)):
        live = [t for t, p in produced_at.items() if p < i and last_use.get(t, -1) >= i]
        if len(live) != 1 or any(first_use_param[p] < i <= last_use_param[p] for p in first_use_param):
            continue
        s = shapes.get(live[0])
        if s and all(isinstance(d, int) and d > 0 for d in s):
            cuts.append(i)
    return cuts

def unit_groups(nodes, params, cuts) -> list[list[onnx.NodeProto]]:
    """The nodes between cut points; a group without parameters joins the one before it."""
    bounds = [0, *cuts, len(nodes)]
    groups = [nodes[a:b] for a, b in zip(bounds, bounds[1:])]
    merged: list[list[onnx.NodeProto]] = []
    for grp in groups:
        has = any(t in params for n in grp for t in n.input)
        if merged and (not has or not any(t in params for n in merged[-1] for t in n.input)):
            merged[-1] = merged[-1] + grp
        else:
            merged.append(list(grp))
    return merged



def unit_fn(nodes, inp: str, out: str, consts, params, out_shape: Shape, known=()):
    """``known``: (tensor, per-sample shape) of the unit's tensors as the importer knows them, given to the
    graph as value_info: ONNX inference cannot tell some (a ViT's class token broadcast to a batch
    computed from a shape), and lowering a gradient needs them."""
    def fn(b: Builder, x: str, s: Shape) -> tuple[str, Shape]:
        rename = {inp: x}
        for t, value in consts:
            rename[t] = f"{b.unit}/const/{t}"
            b.nodes.append(helper.make_node("Constant", [], [rename[t]], name=rename[t],
                                            value=numpy_helper.from_array(np.asarray(value), rename[t])))
        for t, short, shape in params:
            rename[t] = b._param(short, shape)
        for n in nodes:
            new = onnx.NodeProto()
            new.CopyFrom(n)
            for k, t in enumerate(n.input):
                if t:
                    new.input[k] = rename.setdefault(t, f"{b.unit}/{t}")
            for k, t in enumerate(n.output):
                if t:
                    new.output[k] = rename.setdefault(t, f"{b.unit}/{t}")
            new.name = f"{b.unit}/{n.name or n.output[0]}"
            if new.domain != batchnorm.DOMAIN:
                b.nodes.append(new)
                continue
            made: dict[str, np.ndarray] = {}
            expanded, sums = batchnorm.expand(new, b.training, made)
            b.nodes += [helper.make_node("Constant", [], [t], name=t, value=numpy_helper.from_array(v, t))
                        for t, v in made.items()] + expanded
            b.outputs += sums
            b.momenta[new.input[3].rsplit(".", 1)[0]] = round(next(a.f for a in new.attribute if a.name == "momentum"), 6)
        b.known += [helper.make_tensor_value_info(rename[t], onnx.TensorProto.FLOAT, ["N", *shape])
                    for t, shape in known if t in rename and t != out]
        return rename[out], out_shape
    return fn
