"""The node rewrites of a user's model at import (:mod:`hiertrain.train.onnxmodel`): ops whose
gradient is not exact here, or does not lower to standard ONNX, rewritten into ones whose gradient is:
inference-mode BatchNormalization into constant-statistics arithmetic, training-mode into
:func:`hiertrain.train.batchnorm.marker`, Dropout (inference mode) into Identity, division by a
constant into a multiplication, and HardSigmoid, HardSwish, LayerNormalization and
InstanceNormalization into Mul/Add/Clip/ReduceMean arithmetic (:data:`DECOMPOSE`), and a Gather or
Slice of an activation at constant positions into a MatMul with a 0/1 selection matrix.
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
            *_clip(f"{base}/clip", f"{base}.axb", f"{base}.lo", f"{base}.hi", out)]


def _clip(base, x, lo, hi, out) -> list[onnx.NodeProto]:
    """Clip(x, lo, hi) with PyTorch's gradient: dY where lo < x < hi, 0 elsewhere, bounds included
    (hardtanh's and ReLU6's backward). onnxruntime's Clip gradient passes dY at x == lo, which a
    channel of exact zeros (a dead depthwise channel, normalised to 0) meets: there a MobileNetV2 parts
    from PyTorch. Written as Where(lo < x < hi, x, x >= hi ? hi : lo), whose value is Clip's and
    whose gradient flows only through the first branch (the comparisons have none)."""
    return [helper.make_node("Greater", [x, lo], [f"{base}.above"], name=f"{base}/above"),
            helper.make_node("Less", [x, hi], [f"{base}.below"], name=f"{base}/below"),
            helper.make_node("And", [f"{base}.above", f"{base}.below"], [f"{base}.inside"], name=f"{base}/inside"),
            helper.make_node("GreaterOrEqual", [x, hi], [f"{base}.high"], name=f"{base}/high"),
            helper.make_node("Where", [f"{base}.high", hi, lo], [f"{base}.bound"], name=f"{base}/bound"),
            helper.make_node("Where", [f"{base}.inside", x, f"{base}.bound"], [out], name=f"{base}/where")]


def _rw_clip(n, consts, shapes):
    base = f"{n.name or n.output[0]}/clip"
    bounds = []
    for k, (default, what) in enumerate(((-np.inf, "lo"), (np.inf, "hi")), start=1):
        t = n.input[k] if len(n.input) > k and n.input[k] else ""
        if t and t not in consts:
            return [n]  # bounds computed from activations: left to onnxruntime's gradient
        consts[f"{base}.{what}"] = np.asarray(consts[t] if t else default, np.float32)
        bounds.append(f"{base}.{what}")
    return _clip(base, n.input[0], *bounds, n.output[0])


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


def _select(n, x, shape, axis, idx, out, consts, tag) -> list[onnx.NodeProto]:
    """``x`` taken at the constant indices ``idx`` along ``axis`` (of the full rank, batch at 0) as a
    MatMul with a constant 0/1 selection matrix, the axis moved last and back: exact (each output is
    one input times 1 plus zeros), and its gradient is MatMul's, which lowers to standard ONNX."""
    base = f"{n.name or n.output[0]}/{tag}"
    rank, d = len(shape) + 1, shape[axis - 1]
    sel = np.zeros((d, len(idx)), np.float32)
    sel[np.asarray(idx, np.int64), np.arange(len(idx))] = 1.0
    consts[f"{base}.select"] = sel
    order = [k for k in range(rank) if k != axis] + [axis]
    back = list(range(axis)) + [rank - 1] + list(range(axis, rank - 1))
    nodes, moved = [], x
    if order != list(range(rank)):
        nodes.append(helper.make_node("Transpose", [x], [f"{base}.moved"], perm=order, name=f"{base}/move"))
        moved = f"{base}.moved"
    taken = out if back == list(range(rank)) else f"{base}.taken"
    nodes.append(helper.make_node("MatMul", [moved, f"{base}.select"], [taken], name=f"{base}/select"))
    if taken != out:
        nodes.append(helper.make_node("Transpose", [taken], [out], perm=back, name=f"{base}/back"))
    return nodes


def _activation_shape(n, shapes, problems) -> list | None:
    """The per-sample shape of an op's data input when it is an activation whose every dimension is
    known; None for a shape computation (its input has no batch dimension) or an unknown shape."""
    shape = shapes.get(n.input[0])
    if shape is not None and not all(isinstance(v, int) for v in shape):
        problems.append(f"{n.op_type} (node {n.name!r}): the shape of its input is not known per sample")
        return None
    return shape


def _expand(n, consts, shapes) -> list[onnx.NodeProto]:
    """x broadcast to a shape (a class token to the batch, its shape computed from the batch's): x plus
    zeros shaped [N, 1, ..., 1], N taken from the computed shape; exact, with Add's gradient, which
    lowers statically because the zeros' shape is known per sample."""
    rank = len(shapes[n.output[0]]) + 1
    base = f"{n.name or n.output[0]}/zeros"
    consts[f"{base}.start"], consts[f"{base}.end"] = np.array([0], np.int64), np.array([1], np.int64)
    consts[f"{base}.ones"] = np.ones(rank - 1, np.int64)
    shapes[base] = [1] * (rank - 1)
    return [helper.make_node("Slice", [n.input[1], f"{base}.start", f"{base}.end"], [f"{base}.n"], name=f"{base}/n"),
            helper.make_node("Concat", [f"{base}.n", f"{base}.ones"], [f"{base}.shape"], axis=0, name=f"{base}/shape"),
            helper.make_node("ConstantOfShape", [f"{base}.shape"], [base], name=base,
                             value=helper.make_tensor("zero", onnx.TensorProto.FLOAT, [1], [0.0])),
            helper.make_node("Add", [n.input[0], base], [n.output[0]], name=n.name)]


def _explicit_pads(n, shapes, params, problems) -> onnx.NodeProto | None:
    """A Conv or pool with ``auto_pad`` (SAME_UPPER, SAME_LOWER, VALID) as the same node with its pads
    written out, computed from its input's per-sample shape as ONNX defines them."""
    x, mode = shapes.get(n.input[0]), attr(n, "auto_pad")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    kernel = attr(n, "kernel_shape") or (list(params[n.input[1]].shape[2:]) if n.input[1:2] and n.input[1] in params
                                         else None)
    if x is None or not kernel or not all(isinstance(v, int) for v in [*x[1:], *kernel]):
        problems.append(f"{n.op_type} (node {n.name!r}) with auto_pad={mode}: its input's and kernel's shapes must be known")
        return None
    strides = attr(n, "strides") or [1] * len(kernel)
    dilations = attr(n, "dilations") or [1] * len(kernel)
    begin, end = [], []
    for d, k, st, dl in zip(x[1:], kernel, strides, dilations):
        total = 0 if mode == "VALID" else max((-(-d // st) - 1) * st + (k - 1) * dl + 1 - d, 0)
        small = total // 2
        begin.append(small if mode != "SAME_LOWER" else total - small)
        end.append(total - begin[-1])
    new = helper.make_node(n.op_type, list(n.input), list(n.output), name=n.name, pads=begin + end)
    new.attribute.extend(a for a in n.attribute if a.name not in ("auto_pad", "pads"))
    return new


def _whole(n, shapes) -> bool:
    """An AveragePool whose one window covers its whole unpadded input: a global average."""
    x, y = shapes.get(n.input[0]), shapes.get(n.output[0])
    pads = attr(n, "pads", None) or [0]
    auto = attr(n, "auto_pad", b"NOTSET")
    return (x is not None and y is not None and len(x) >= 2 and not any(pads) and auto in (b"NOTSET", "NOTSET")
            and all(d == 1 for d in y[1:]) and all(k >= d for k, d in zip(attr(n, "kernel_shape", []), x[1:])))


def _rw_gather(n, out, consts, shapes, problems):
    """A Gather of an activation at constant indices (a ViT's class token, ``x[:, 0]``): a selection."""
    shape = _activation_shape(n, shapes, problems)
    if shape is None:
        out.append(n)  # a shape computation: no gradient
        return
    axis = attr(n, "axis", 0) % (len(shape) + 1)
    idx = consts.get(n.input[1])
    if axis == 0 or idx is None or idx.ndim > 1:
        problems.append(f"Gather (node {n.name!r}): only constant indices (a scalar or a list) along a sample's "
                        f"own dimensions are trained here" + (", not along the batch" if axis == 0 else ""))
        return
    d = shape[axis - 1]
    taken = [int(i) % d for i in idx.reshape(-1)]
    if idx.ndim == 1:
        out += _select(n, n.input[0], shape, axis, taken, n.output[0], consts, "gather")
        return
    base = f"{n.name or n.output[0]}/gather"
    consts[f"{base}.axes"] = np.array([axis], np.int64)
    out += _select(n, n.input[0], shape, axis, taken, f"{base}.one", consts, "gather")
    out.append(helper.make_node("Squeeze", [f"{base}.one", f"{base}.axes"], [n.output[0]], name=f"{base}/squeeze"))


def _rw_slice(n, out, consts, shapes, problems):
    """A Slice of an activation by constant starts, ends, axes and steps along a sample's own dimensions:
    one selection per axis sliced."""
    shape = _activation_shape(n, shapes, problems)
    if shape is None:
        out.append(n)
        return
    given = [consts.get(t) if t else None for t in (list(n.input[1:]) + [""] * 4)[:4]]
    starts, ends, axes, steps = given
    missing = [t for t in n.input[1:] if t and t not in consts]
    rank = len(shape) + 1
    axes = list(range(len(starts))) if axes is None and starts is not None else axes
    if missing or starts is None or ends is None or any(int(a) % rank == 0 for a in axes):
        problems.append(f"Slice (node {n.name!r}): only constant starts, ends, axes and steps along a sample's own "
                        f"dimensions are trained here")
        return
    steps = np.ones(len(starts), np.int64) if steps is None else steps
    shape, x = list(shape), n.input[0]
    todo = [(int(a) % rank, int(b), int(e), int(s)) for a, b, e, s in zip(axes, starts, ends, steps)]
    for k, (axis, b, e, s) in enumerate(todo):
        taken = list(range(*slice(b, e, s).indices(shape[axis - 1])))
        y = n.output[0] if k == len(todo) - 1 else f"{n.name or n.output[0]}/slice{k}.out"
        out += _select(n, x, shape, axis, taken, y, consts, f"slice{k}")
        shape[axis - 1], x = len(taken), y


DECOMPOSE = {"Clip": _rw_clip, "HardSigmoid": _rw_hard_sigmoid, "HardSwish": _rw_hard_swish, "LayerNormalization": _rw_layer_norm,
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
    elif n.op_type == "Expand" and n.output[0] in shapes:
        out += _expand(n, consts, shapes)
    elif n.op_type == "Expand" and n.input[0] in shapes:
        problems.append(f"Expand (node {n.name!r}): the shape it broadcasts an activation to is not known per sample")
    elif n.op_type == "Expand":
        out.append(n)  # of a shape computation: no gradient
    elif n.op_type in ("Conv", "AveragePool", "MaxPool") and attr(n, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        explicit = _explicit_pads(n, shapes, params, problems)  # (padding="same": its gradient lowers with explicit pads)
        if explicit is not None:
            rewrite(explicit, out, params, consts, shapes, problems, synthetic)
    elif n.op_type == "AveragePool" and _whole(n, shapes):
        # a window over the whole map (transformers' EfficientNet pools with kernel = its width, ceil_mode)
        out.append(helper.make_node("GlobalAveragePool", [n.input[0]], [n.output[0]], name=n.name))
    elif n.op_type == "Gather":
        _rw_gather(n, out, consts, shapes, problems)
    elif n.op_type == "Slice":
        _rw_slice(n, out, consts, shapes, problems)
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
