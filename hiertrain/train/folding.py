"""Constants folded and batch-dependent shapes made static when a user's model is imported
(:mod:`hiertrain.train.onnxmodel`): a node whose inputs are all constants is evaluated once; a Reshape
or a Pad whose shape the file computes from an activation's gets it as a constant, found by running
the file at two batch sizes, which also shows whether a Softmax or Split inside the model runs along
the batch (it must not: each sample stays apart).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import onnx
from onnx import helper, numpy_helper

from hiertrain.errors import ConfigError
from hiertrain.train.models import OPSET

AXIS_OPS = ("Softmax", "Split")  # exact unless they run along the batch: checked on the file


def attrs(node: onnx.NodeProto) -> dict:
    """Every attribute of ``node``, by name."""
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def constant_value(node: onnx.NodeProto) -> np.ndarray:
    a = node.attribute[0]
    if a.name == "value":
        return numpy_helper.to_array(a.t)
    value = helper.get_attribute_value(a)
    dtype = {"value_float": np.float32, "value_floats": np.float32, "value_int": np.int64,
             "value_ints": np.int64}.get(a.name)  # (value_string and sparse values are not numbers)
    if dtype is None:
        raise ConfigError(f"Constant node {node.name!r}: attribute {a.name} is not supported")
    return np.array(value, dtype)


def fold(node: onnx.NodeProto, values: list[Optional[np.ndarray]]) -> list[np.ndarray]:
    """Evaluate a node whose inputs are all constants (a shape computation, a scalar); None for an
    optional input left out."""
    from onnx.reference import ReferenceEvaluator

    names = [f"i{k}" if v is not None else "" for k, v in enumerate(values)]
    n = helper.make_node(node.op_type, names, [f"o{k}" for k in range(len(node.output))])
    n.attribute.extend(node.attribute)
    given = [(nm, v) for nm, v in zip(names, values) if v is not None]
    g = helper.make_graph([n], "fold", [helper.make_tensor_value_info(nm, helper.np_dtype_to_tensor_dtype(v.dtype),
                                                                      list(v.shape)) for nm, v in given],
                          [helper.make_empty_tensor_value_info(f"o{k}") for k in range(len(node.output))])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)])
    return list(ReferenceEvaluator(m).run(None, dict(given)))


def static(nodes: list[onnx.NodeProto], consts: dict, *, model: onnx.ModelProto, x: str, y: str,
           input_shape: tuple, path: Path, problems: list[str]) -> list[onnx.NodeProto]:
    """A Reshape whose shape is computed from an activation's (``x.view(x.size(0), -1)``) gets it as
    a constant: evaluated at two batch sizes, an entry that follows the batch becomes 0 (copy the
    input's batch dimension), one that stays put is kept; the shape computation is then dead.
    A Pad's computed pads that do not change with the batch become constants too, and a Softmax or
    Split inside the model (attention's, its heads') is checked not to run along the batch (the axis
    of its input that grows with it). One evaluation of the file serves all three."""
    axis_ops = [n for n in nodes if n.op_type in AXIS_OPS]
    pads = [n for n in nodes if n.op_type == "Pad" and len(n.input) > 1 and n.input[1] not in consts]
    dynamic = [n for n in nodes if n.op_type == "Reshape" and n.input[1] not in consts]
    wanted = [n.input[0] for n in axis_ops] + [n.input[1] for n in pads + dynamic]
    at = at_two_batch_sizes(model, x, input_shape, path, wanted) if wanted else []
    for n, (two, three) in zip(axis_ops, at):
        grows = [i for i, (a, b) in enumerate(zip(two.shape, three.shape)) if a != b]
        axis = attr(n, "axis", -1 if n.op_type == "Softmax" else 0) % max(1, two.ndim)
        if len(grows) != 1 or axis == grows[0]:
            problems.append(f"{n.op_type} (node {n.name or n.output[0]!r}) runs along the batch: each "
                                 f"sample must stay apart")
    at = at[len(axis_ops):]
    for n, (two, three) in zip(pads, at):  # torch writes F.pad's pads as a computation on constants
        if np.array_equal(two, three):
            name = f"{n.name or n.output[0]}/static_pads"
            consts[name] = np.asarray(two, np.int64)
            n.input[1] = name
    if dynamic:
        for n, (two, three) in zip(dynamic, at[len(pads):]):
            two, three = two.reshape(-1), three.reshape(-1)
            fixed = []
            for i, (a, b) in enumerate(zip(two, three)):
                if a == b:
                    fixed.append(int(a))
                elif i == 0 and (a, b) == (2, 3) and not attr(n, "allowzero", 0):
                    fixed.append(0)
                else:
                    problems.append(f"Reshape (node {n.name!r}) mixes the batch into dimension {i}: each "
                                         f"sample must stay apart")
                    fixed.append(int(a))
            name = f"{n.name or n.output[0]}/static_shape"
            consts[name] = np.array(fixed, np.int64)
            n.input[1] = name
    needed, kept = {y}, []
    for n in reversed(nodes):  # dead code: shape computations nobody reads any more
        if any(o in needed for o in n.output):
            kept.append(n)
            needed.update(t for t in n.input if t)
    return kept[::-1]

def at_two_batch_sizes(model: onnx.ModelProto, x: str, input_shape: tuple, path: Path, tensors: list[str]
                        ) -> list[tuple[np.ndarray, np.ndarray]]:
    """The file's ``tensors`` evaluated for batches of 2 and of 3 samples (zeros)."""
    import onnxruntime as ort

    m = onnx.ModelProto()
    m.CopyFrom(model)
    del m.graph.output[:]
    m.graph.output.extend(helper.make_empty_tensor_value_info(t) for t in tensors)
    try:
        sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        two, three = (sess.run(None, {x: np.zeros((b, *input_shape), np.float32)}) for b in (2, 3))
    except Exception as exc:  # noqa: BLE001 - onnxruntime's errors are one line here
        raise ConfigError(f"{path}: onnxruntime cannot run it for 2 and 3 samples ({str(exc).splitlines()[0][:200]})"
                   ) from None
    return list(zip(two, three))
