"""The node rewrites of a user's model at import (:mod:`hiertrain.train.onnxmodel`): ops whose
gradient is not exact here, or does not lower to standard ONNX, rewritten into ones whose gradient is:
inference-mode BatchNormalization into constant-statistics arithmetic, training-mode into
:func:`hiertrain.train.batchnorm.marker`, Dropout (inference mode) into Identity, division by a
constant into a multiplication, and HardSigmoid, HardSwish, LayerNormalization and
InstanceNormalization into Mul/Add/Clip/ReduceMean arithmetic (:data:`DECOMPOSE`).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from hiertrain.errors import ConfigError
from hiertrain.train import batchnorm
from hiertrain.train.folding import attr


def _hard_sigmoid(n, x, out, alpha, beta, consts):
    base = f"{n.name or n.output[0]}/hs"
    consts[f"{base}.alpha"], consts[f"{base}.beta"] = np.float32(alpha), np.float32(beta)
    consts[f"{base}.lo"], consts[f"{base}.hi"] = np.float32(0), np.float32(1)
    return [helper.make_node("Mul", [x, f"{base}.alpha"], [f"{base}.ax"], name=f"{base}/mul"),
            helper.make_node("Add", [f"{base}.ax", f"{base}.beta"], [f"{base}.axb"], name=f"{base}/add"),
            helper.make_node("Clip", [f"{base}.axb", f"{base}.lo", f"{base}.hi"], [out], name=f"{base}/clip")]


def _rw_hard_sigmoid(n, consts, shapes):
    return _hard_sigmoid(n, n.input[0], n.output[0], attr(n, "alpha", 0.2), attr(n, "beta", 0.5), consts)


def _rw_hard_swish(n, consts, shapes):
    gate = f"{n.name or n.output[0]}/gate"
    return _hard_sigmoid(n, n.input[0], gate, 1 / 6, 0.5, consts) + [
        helper.make_node("Mul", [n.input[0], gate], [n.output[0]], name=f"{n.name or n.output[0]}/mul")]


def _normalise(n, x, axes, eps, consts) -> tuple[list[onnx.NodeProto], str]:
    """(x - mean) / sqrt(var + eps) over ``axes``, in ops with gradients."""
    base = f"{n.name or n.output[0]}/norm"
    consts[f"{base}.eps"] = np.float32(eps)
    return [helper.make_node("ReduceMean", [x], [f"{base}.mean"], axes=axes, name=f"{base}/mean"),
            helper.make_node("Sub", [x, f"{base}.mean"], [f"{base}.d"], name=f"{base}/sub"),
            helper.make_node("Mul", [f"{base}.d", f"{base}.d"], [f"{base}.d2"], name=f"{base}/sq"),
            helper.make_node("ReduceMean", [f"{base}.d2"], [f"{base}.var"], axes=axes, name=f"{base}/var"),
            helper.make_node("Add", [f"{base}.var", f"{base}.eps"], [f"{base}.vare"], name=f"{base}/eps"),
            helper.make_node("Sqrt", [f"{base}.vare"], [f"{base}.std"], name=f"{base}/std"),
            helper.make_node("Reciprocal", [f"{base}.std"], [f"{base}.inv"], name=f"{base}/inv"),
            helper.make_node("Mul", [f"{base}.d", f"{base}.inv"], [f"{base}.y"], name=f"{base}/div")], f"{base}.y"


def _affine(n, y, scale, bias, shape, consts) -> list[onnx.NodeProto]:
    base = f"{n.name or n.output[0]}/affine"
    nodes, s, b = [], scale, bias
    if shape is not None:
        consts[f"{base}.shape"] = np.array(shape, np.int64)
        s, b = f"{base}.scale", f"{base}.bias"
        nodes += [helper.make_node("Reshape", [scale, f"{base}.shape"], [s], name=f"{base}/scale_shape"),
                  helper.make_node("Reshape", [bias, f"{base}.shape"], [b], name=f"{base}/bias_shape")]
    return nodes + [helper.make_node("Mul", [y, s], [f"{base}.ys"], name=f"{base}/mul"),
                    helper.make_node("Add", [f"{base}.ys", b], [n.output[0]], name=f"{base}/add")]


def _rank(n, shapes) -> int:
    """The rank of a node's input, batch dimension included; refused in one line when unknown."""
    shape = shapes.get(n.input[0])
    if shape is None:
        raise ConfigError(f"{n.op_type} node {n.name or n.output[0]!r}: the shape of its input {n.input[0]!r} is "
                          f"not known per sample (its batch dimension is lost before it); export with a symbolic "
                          f"batch dimension that every op keeps")
    return len(shape) + 1


def _rw_layer_norm(n, consts, shapes):
    axis = attr(n, "axis", -1)
    # normalised over the last dimensions: a negative axis needs no rank (ReduceMean takes negative axes)
    axes = list(range(axis, 0)) if axis < 0 else list(range(axis, _rank(n, shapes)))
    nodes, y = _normalise(n, n.input[0], axes, attr(n, "epsilon", 1e-5), consts)
    if len(n.input) < 3 or not n.input[2]:
        consts[f"{n.name}/zero_bias"] = np.float32(0)
        return nodes + _affine(n, y, n.input[1], f"{n.name}/zero_bias", None, consts)
    return nodes + _affine(n, y, n.input[1], n.input[2], None, consts)


def _rw_instance_norm(n, consts, shapes):
    rank = _rank(n, shapes)
    nodes, y = _normalise(n, n.input[0], list(range(2, rank)), attr(n, "epsilon", 1e-5), consts)
    return nodes + _affine(n, y, n.input[1], n.input[2], [-1, *([1] * (rank - 2))], consts)


DECOMPOSE = {"HardSigmoid": _rw_hard_sigmoid, "HardSwish": _rw_hard_swish, "LayerNormalization": _rw_layer_norm,
              "InstanceNormalization": _rw_instance_norm}


def rewrite(n, out, params, consts, shapes, problems, synthetic):
    """Append to ``out`` what node ``n`` becomes (the node itself, when it needs no rewriting); what
    cannot be trained exactly goes to ``problems``, parameters the file does not have to ``synthetic``."""
    if n.op_type == "Dropout":
        ratio_ok = len(n.input) < 3 or not n.input[2] or (n.input[2] in consts and not consts[n.input[2]])
        if not ratio_ok or len([o for o in n.output if o]) > 1:
            problems.append(f"Dropout (node {n.name!r}) in training mode: its random masks differ "
                                 f"between workers; export with model.eval(), or, to train BatchNorm, with "
                                 f"model.train(), each nn.Dropout .eval() and training=TrainingMode.PRESERVE")
            return
        out.append(helper.make_node("Identity", [n.input[0]], [n.output[0]], name=n.name))
    elif n.op_type == "Div":
        if n.input[1] not in consts:
            problems.append(f"Div (node {n.name!r}) divides by an activation; only division by a "
                                 f"constant is trained here")
            return
        name = f"{n.name or n.output[0]}/reciprocal"
        consts[name] = (1.0 / consts[n.input[1]].astype(np.float64)).astype(consts[n.input[1]].dtype)
        out.append(helper.make_node("Mul", [n.input[0], name], [n.output[0]], name=n.name))
    elif n.op_type in DECOMPOSE:
        out += DECOMPOSE[n.op_type](n, consts, shapes)
    elif n.op_type == "BatchNormalization" and attr(n, "training_mode", 0):
        out += _batchnorm_training(n, params, shapes, problems, synthetic)
    elif n.op_type == "BatchNormalization":
        out += _batchnorm(n, consts, shapes, problems)
    else:
        out.append(n)

def _batchnorm(n, consts, shapes, problems):
    """y = (x - mean) * (1 / sqrt(var + eps)) * scale + bias, the statistics constants shaped
    [C, 1, ..., 1] for the input's rank; the scale and bias stay parameters (the nodes between
    are never cut points: their tensors have no inferred shape)."""
    x, scale, bias, mean, var = n.input
    if mean not in consts or var not in consts or x not in shapes:
        problems.append(f"BatchNormalization (node {n.name!r}): its running mean and variance must be "
                             f"constants of the file and its input's shape known")
        return []
    eps = float(attr(n, "epsilon", 1e-5))
    per_channel = (-1, *([1] * (len(shapes[x]) - 1)))
    base = f"{n.name or n.output[0]}/bn"
    consts[f"{base}.mean"] = consts[mean].astype(np.float32).reshape(per_channel)
    consts[f"{base}.inv_std"] = (1.0 / np.sqrt(consts[var].astype(np.float64) + eps)).astype(np.float32).reshape(per_channel)
    return [
        helper.make_node("Sub", [x, f"{base}.mean"], [f"{base}.centred"], name=f"{base}/sub"),
        helper.make_node("Mul", [f"{base}.centred", f"{base}.inv_std"], [f"{base}.normed"], name=f"{base}/norm"),
    ] + _affine(n, f"{base}.normed", scale, bias, list(per_channel), consts)

def _batchnorm_training(n, params, shapes, problems, synthetic):
    """A :func:`batchnorm.marker` node: its running statistics and a batch counter are buffers."""
    x, scale, bias, mean, var = n.input
    if not all(t in params for t in (scale, bias, mean, var)) or x not in shapes:
        problems.append(f"BatchNormalization (node {n.name!r}) in training mode: its scale, bias and "
                             f"running statistics must be initializers of the file and its input's shape known")
        return []
    count = f"{n.name or n.output[0]}/num_batches_tracked"
    params[count] = np.zeros(1, np.float32)
    synthetic.add(count)
    return [batchnorm.marker(x, scale, bias, (mean, var, count), n.output[0], name=n.name or n.output[0],
                             epsilon=attr(n, "epsilon", 1e-5), momentum=1.0 - attr(n, "momentum", 0.9),
                             rank=len(shapes[x]) + 1)]
