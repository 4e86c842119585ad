"""BatchNorm that trains: batch statistics in the step, running statistics kept by the owner.

A BatchNormalization layer in training mode (``torch.onnx.export(..., training=TRAINING)``)
normalises with the statistics of the samples that pass through it, as PyTorch's ``model.train()``
does. Where one worker holds the whole batch (a single process, a layer chain) the step is exactly
PyTorch's. Where the batch is split into sample groups (worker_o's, worker_s's and worker_l's
samples, the fleet's devices), each group's samples are normalised on their own wherever they are
computed (:mod:`hiertrain.train.reference` says which rows run together): what PyTorch's
DistributedDataParallel does by default (SyncBatchNorm is its opt-in), equal to it run with those
groups of samples.

The running statistics are three *buffers* per layer, ``<prefix>.running_mean``, ``.running_var``
and ``.num_batches_tracked`` (PyTorch's names): parameters without a gradient, held, moved,
checkpointed and exported with the layer's unit like its weights. What travels in their gradient's
place are sums that add up across workers like gradients do: a segment that runs the layer on
``n`` samples outputs ``sum(x)`` and ``sum(x*x)`` per channel and the count ``n*H*W`` of values it
summed. The owner's optimizer step (:func:`update`) turns the totals, which cover every sample of
the batch whatever the split, into the whole batch's mean and unbiased variance and moves the
running statistics by the layer's momentum: the running statistics are those of single-process
training even when the normalisation is per worker.

Evaluation and ``hiertrain model export`` use the running statistics (PyTorch's ``model.eval()``).
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import onnx
from onnx import TensorProto, helper

DOMAIN = "hiertrain"             # the marker node a unit keeps until its graph is built
SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


def is_buffer(name: str) -> bool:
    """Whether a parameter name is a BatchNorm buffer (its "gradient" is a sum, never scaled)."""
    return name.rsplit(".", 1)[-1] in SUFFIXES


def buffers(prefix: str) -> tuple[str, str, str]:
    return tuple(f"{prefix}.{s}" for s in SUFFIXES)  # type: ignore[return-value]


def marker(x: str, scale: str, bias: str, prefix_params: tuple[str, str, str], out: str, *, name: str,
           epsilon: float, momentum: float, rank: int) -> onnx.NodeProto:
    """The node a unit keeps for a training-mode BatchNormalization until :func:`expand` builds it:
    inputs x, scale, bias and the three buffers; ``momentum`` is PyTorch's (ONNX's is 1 minus it)."""
    return helper.make_node("BatchNormalization", [x, scale, bias, *prefix_params], [out], name=name, domain=DOMAIN,
                            epsilon=float(epsilon), momentum=float(momentum), rank=int(rank))


def _attr(node: onnx.NodeProto, name: str):
    return next(helper.get_attribute_value(a) for a in node.attribute if a.name == name)


def expand(node: onnx.NodeProto, training: bool, consts: dict[str, np.ndarray]) -> tuple[list[onnx.NodeProto], list[str]]:
    """The standard ONNX nodes of a :func:`marker` node (its inputs already named as in the graph):
    batch statistics and the buffers' sums when ``training`` (returns their names: outputs the
    graph must expose), else the running statistics. ``consts`` gets the constants they use."""
    x, scale, bias, mean, var, _count = node.input
    eps, rank = _attr(node, "epsilon"), _attr(node, "rank")
    base, out = node.name, node.output[0]
    per_channel = [-1, *([1] * (rank - 2))]
    consts[f"{base}.eps"] = np.array(eps, np.float32)
    consts[f"{base}.per_channel"] = np.array(per_channel, np.int64)

    def mk(op, inputs, output, **attrs):
        return helper.make_node(op, inputs, [output], name=f"{base}/{output.rsplit('/', 1)[-1]}", **attrs)

    nodes: list[onnx.NodeProto] = []
    stats: list[str] = []
    if training:
        axes = [0, *range(2, rank)]
        nodes += [mk("ReduceMean", [x], f"{base}/mean", axes=axes, keepdims=1),
                  mk("Sub", [x, f"{base}/mean"], f"{base}/centred"),
                  mk("Mul", [f"{base}/centred", f"{base}/centred"], f"{base}/sq"),
                  mk("ReduceMean", [f"{base}/sq"], f"{base}/var", axes=axes, keepdims=1)]
        # what the running statistics need, summed (they add up across workers)
        s1, s2, n = (f"{b}_grad" for b in node.input[3:6])
        nodes += [mk("ReduceSum", [x, f"{base}.axes"], s1, keepdims=0),
                  mk("Mul", [x, x], f"{base}/xx"),
                  mk("ReduceSum", [f"{base}/xx", f"{base}.axes"], s2, keepdims=0),
                  mk("Shape", [x], f"{base}/shape"),
                  mk("Cast", [f"{base}/shape"], f"{base}/shape_f", to=TensorProto.FLOAT),
                  mk("ReduceProd", [f"{base}/shape_f"], f"{base}/size", keepdims=1),
                  mk("Shape", [scale], f"{base}/c"),
                  mk("Cast", [f"{base}/c"], f"{base}/c_f", to=TensorProto.FLOAT),
                  mk("Div", [f"{base}/size", f"{base}/c_f"], n)]
        consts[f"{base}.axes"] = np.array(axes, np.int64)
        stats = [s1, s2, n]
    else:
        nodes += [mk("Reshape", [mean, f"{base}.per_channel"], f"{base}/mean"),
                  mk("Sub", [x, f"{base}/mean"], f"{base}/centred"),
                  mk("Reshape", [var, f"{base}.per_channel"], f"{base}/var")]
    nodes += [mk("Add", [f"{base}/var", f"{base}.eps"], f"{base}/vare"),
              mk("Sqrt", [f"{base}/vare"], f"{base}/std"),
              mk("Reciprocal", [f"{base}/std"], f"{base}/inv"),
              mk("Mul", [f"{base}/centred", f"{base}/inv"], f"{base}/normed"),
              mk("Reshape", [scale, f"{base}.per_channel"], f"{base}/scale"),
              mk("Reshape", [bias, f"{base}.per_channel"], f"{base}/bias"),
              mk("Mul", [f"{base}/normed", f"{base}/scale"], f"{base}/scaled"),
              mk("Add", [f"{base}/scaled", f"{base}/bias"], out)]
    return nodes, stats


def update(params: Mapping[str, np.ndarray], sums: Mapping[str, np.ndarray],
           momenta: Mapping[str, float]) -> dict[str, np.ndarray]:
    """New running statistics of every layer in ``momenta`` (prefix -> PyTorch's momentum) whose sums
    arrived: the batch's mean and unbiased variance, by the momentum; ``num_batches_tracked`` + 1.
    A layer without sums (no sample passed it) keeps its statistics."""
    new: dict[str, np.ndarray] = {}
    for prefix, m in momenta.items():
        mean_n, var_n, count_n = buffers(prefix)
        if mean_n not in params or count_n not in sums:
            continue
        count = float(np.asarray(sums[count_n], np.float64).reshape(-1)[0])
        if count <= 0:
            continue
        mean = np.asarray(sums[mean_n], np.float64) / count
        var = np.maximum(np.asarray(sums[var_n], np.float64) / count - mean * mean, 0.0)
        unbiased = var * count / (count - 1) if count > 1 else var
        new[mean_n] = ((1 - m) * params[mean_n].astype(np.float64) + m * mean).astype(np.float32)
        new[var_n] = ((1 - m) * params[var_n].astype(np.float64) + m * unbiased).astype(np.float32)
        new[count_n] = (params[count_n] + 1).astype(np.float32)
    return new
