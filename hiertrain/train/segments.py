"""Training segments: forward and backward of units a..b as ONNX graphs that any onnxruntime runs.

A *body* segment (units a..b of a model, not the loss) is trained against an upstream gradient
``gy`` with the surrogate loss ``ReduceSum(y * gy)``, whose parameter gradients are the true
ones. ORT's gradient graph builder (``GradientGraphBuilder``, onnxruntime-training's, x86-64 only)
differentiates it; :mod:`hiertrain.train.lowering` rewrites the training-only ops it emits into standard
ONNX ops; we then cut the gradient graph in two:

- ``forward``: (x, params) -> y and a *stash* of the intermediates the backward needs;
- ``backward``: (stash, gy, params) -> parameter gradients and, if a > 1, the input gradient.

So a worker that must send its activations before the upstream gradient arrives runs its forward
once, not twice (ORT's fused ``TrainStep`` would recompute it). A *head* segment (units a..N and
the cross-entropy loss over all the samples it sees) needs no cut: one fused graph gives the loss,
the logits, the parameter gradients and the input gradient.

Built graphs are cached on disk under a key naming what they compute (:func:`key`);
:mod:`hiertrain.train.runtime` runs them (and, where this onnxruntime cannot build, gets them from
a provider, :mod:`hiertrain.train.artifacts`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, shape_inference

from hiertrain.train import batchnorm, lowering
from hiertrain.errors import PlanError
from hiertrain.train.models import IR_VERSION, OPSET, ModelSpec, segment_graph

FORMAT = 1
LOSS = "__loss"
ort.set_default_logger_severity(4)  # kernel failures are raised as SegmentError, not logged twice


def cache_dir() -> Path:
    return Path(os.environ.get("HIERTRAIN_CACHE", Path.home() / ".cache" / "hiertrain")) / "segments"


def session_options(threads: int = 0) -> ort.SessionOptions:
    """Options of every ORT session hiertrain runs (segments and optimizers).

    Threads spin between the parallel sections of one run (waking sleeping threads cost LeNet-5's
    step a quarter of its time) and stop spinning when the run returns: every segment has sessions
    of its own, and idle pools that kept spinning would steal the cores from the one running and
    from the tier's network threads."""
    so = ort.SessionOptions()
    so.log_severity_level = 4
    so.add_session_config_entry("session.intra_op.allow_spinning", "1")
    so.add_session_config_entry("session.force_spinning_stop", "1")
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    return so


def _model(graph: onnx.GraphProto) -> onnx.ModelProto:
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)],
                          producer_name="hiertrain")
    m.ir_version = IR_VERSION
    return m


def _gradient_model(model: onnx.ModelProto, requires: set[str]) -> onnx.ModelProto:
    # onnxruntime-training only; imported here so that plain onnxruntime runs everything else
    from onnxruntime.capi._pybind_state import GradientGraphBuilder, get_optimized_model

    so = session_options()
    # every tensor's shape written into the graph first: onnxruntime's optimizer leaves some uninferred
    # (behind a Where), and a gradient whose shapes are not static lowers to no standard op
    model = shape_inference.infer_shapes(model)
    optimized = get_optimized_model(model.SerializeToString(), requires, so)
    builder = GradientGraphBuilder(optimized, {LOSS}, requires, LOSS, so)
    builder.build()
    return onnx.load_from_string(builder.get_model())


def _topological(nodes: list[onnx.NodeProto], available: set[str]) -> list[onnx.NodeProto]:
    """Kahn's algorithm over tensor names (``available``: graph inputs and initializers)."""
    producers = {o: i for i, n in enumerate(nodes) for o in n.output}
    deps = [{producers[t] for t in n.input if t and t in producers} for n in nodes]
    users = defaultdict(list)
    for i, d in enumerate(deps):
        for j in d:
            users[j].append(i)
    ready = [i for i, d in enumerate(deps) if not d]
    order, missing = [], [len(d) for d in deps]
    while ready:
        i = ready.pop(0)
        order.append(i)
        for u in users[i]:
            missing[u] -= 1
            if missing[u] == 0:
                ready.append(u)
    if len(order) != len(nodes):
        raise PlanError("gradient graph has a cycle")
    return [nodes[i] for i in order]


def _ancestors(nodes: list[onnx.NodeProto], targets: set[str]) -> list[bool]:
    need, wanted = [False] * len(nodes), set(targets)
    for i in range(len(nodes) - 1, -1, -1):
        if any(o in wanted for o in nodes[i].output):
            need[i] = True
            wanted.update(t for t in nodes[i].input if t)
    return need


_ELEM = {"tensor(float)": TensorProto.FLOAT, "tensor(int64)": TensorProto.INT64, "tensor(int32)": TensorProto.INT32,
         "tensor(bool)": TensorProto.BOOL, "tensor(float16)": TensorProto.FLOAT16}


def _split(grad: onnx.ModelProto, bwd_outputs: list[str]) -> tuple[onnx.ModelProto, onnx.ModelProto, list[str]]:
    """Cut a body segment's gradient graph into a forward graph (every node not downstream of
    ``gy`` or of the loss-gradient seed) and a backward graph; the tensors crossing the cut are
    the stash, extra outputs of the forward and inputs of the backward."""
    g = grad.graph
    inits = {i.name: i for i in g.initializer}
    inputs = {i.name: i for i in g.input}
    typed = {o.name: o for o in g.output if o.type.HasField("tensor_type")}  # (ORT's shape inference needs them)
    nodes = _topological(list(g.node), set(inits) | set(inputs))
    tainted = {"gy"} | {n for n in inits if n.endswith("_grad")}  # the loss-gradient seed
    is_bwd = []
    for n in nodes:
        t = any(i in tainted for i in n.input) or n.name.startswith(lowering.PREFIX)
        if t:
            tainted.update(n.output)
        is_bwd.append(t)
    need_b = _ancestors(nodes, set(bwd_outputs))
    bwd_nodes = [n for n, b, k in zip(nodes, is_bwd, need_b) if b and k]
    bwd_used = {t for n in bwd_nodes for t in n.input if t}
    bwd_inputs = bwd_used - {o for n in bwd_nodes for o in n.output}
    need_f = _ancestors(nodes, {"y"} | bwd_inputs)
    fwd_nodes = [n for n, b, k in zip(nodes, is_bwd, need_f) if not b and k]
    fwd_used = {t for n in fwd_nodes for t in n.input if t}
    stash = sorted((bwd_inputs & {o for n in fwd_nodes for o in n.output}) - {"y"})
    stash += [t for t in ("x", "y") if t in bwd_inputs]  # kept by the caller, not recomputed
    fwd = _model(helper.make_graph(
        fwd_nodes, "forward", [inputs[n] for n in inputs if n in fwd_used],
        [helper.make_empty_tensor_value_info(t) for t in ["y", *(s for s in stash if s not in ("x", "y"))]],
        [inits[n] for n in inits if n in fwd_used]))
    # the backward's stash inputs need element types: ask ORT, which infers the forward's outputs
    sess = ort.InferenceSession(fwd.SerializeToString(), session_options(1), providers=["CPUExecutionProvider"])
    types = {o.name: (_ELEM[o.type], [d if isinstance(d, int) else f"{o.name}_{i}" for i, d in enumerate(o.shape)])
             for o in sess.get_outputs()}
    # (a shape the graph states wins: ORT reports an output it could not infer as a scalar)
    stated = {v.name: v for v in g.value_info if v.type.tensor_type.HasField("shape")
              and len(v.type.tensor_type.shape.dim)}
    bwd = _model(helper.make_graph(
        bwd_nodes, "backward",
        [stated[t] if t in stated else helper.make_tensor_value_info(t, *types[t]) for t in stash if t in types]
        + [inputs[n] for n in inputs if n in bwd_used and n not in types],
        [typed.get(o) or helper.make_empty_tensor_value_info(o) for o in bwd_outputs],
        [inits[n] for n in inits if n in bwd_used],
        value_info=[v for v in g.value_info if v.name in bwd_used]))
    return fwd, bwd, stash


def _sums_with_gradients(grad: onnx.ModelProto, sums: list[str]) -> None:
    """BatchNorm's sums, computed in the forward, are output with the gradients (a body segment's
    backward): each is renamed where it is made and copied out by a node on the backward's side of
    the split, so the forward stashes it."""
    if not sums:
        return
    made = {t: f"{t}.sum" for t in sums}
    for n in grad.graph.node:
        for k, t in enumerate(n.output):
            if t in made:
                n.output[k] = made[t]
    grad.graph.node.extend(helper.make_node("Identity", [made[t]], [t], name=f"{lowering.PREFIX}sums/{t}")
                           for t in sums)


@dataclass(frozen=True)
class Built:
    """Paths and names of one built segment."""

    path: Path
    kind: str                  # "body" or "head"
    params: tuple[str, ...]
    stash: tuple[str, ...]
    input_grad: bool
    build_s: float


def _range(spec: ModelSpec, first: int, last: int, kind: str) -> int:
    """Check a segment's unit range; return its last unit (a head always ends at the model's end)."""
    if kind == "head":
        if not 1 <= first <= spec.n_units + 1:
            raise PlanError(f"head segment must start in 1..{spec.n_units + 1}, got {first}")
        return spec.n_units
    if kind != "body":
        raise PlanError(f"segment kind must be body or head, not {kind!r}")
    spec.check_range(first, last)
    if first > last:
        raise PlanError(f"body segment {first}..{last} of {spec.name} is empty")
    return last


def key(spec: ModelSpec, first: int, last: int, kind: str, input_grad: bool, lowered: bool = True) -> str:
    """Names a segment by what it computes: the model's forward graph of the range, the kind and the
    lowering version (lowered graphs no longer depend on the runtime that runs them; the training
    kernels' graphs do, so they carry its version). Builders and runners compute the same key."""
    last = _range(spec, first, last, kind)
    fwd = segment_graph(spec, first, last)[0] if first <= last else None
    h = hashlib.sha256()
    runtime = f"lowering-{lowering.VERSION}" if lowered else f"ort-{ort.__version__}"
    h.update(json.dumps([FORMAT, runtime, spec.name, first, last, kind, input_grad]).encode())
    if fwd is not None:
        h.update(fwd.graph.SerializeToString(deterministic=True))
    tag = "" if lowered else "-kernels"
    return f"{spec.name}/{first}-{last}-{kind}{'-dx' if input_grad else ''}{tag}-{h.hexdigest()[:12]}"


def can_build() -> bool:
    """Whether this onnxruntime has the gradient graph builder (onnxruntime-training, x86-64 only)."""
    try:
        from onnxruntime.capi._pybind_state import GradientGraphBuilder  # noqa: F401
    except ImportError:
        return False
    return True


def load(path: Path, kind: str, input_grad: bool) -> Optional[Built]:
    """The built segment stored at ``path``, or None."""
    meta_file = path / "meta.json"
    if not meta_file.is_file():
        return None
    meta = json.loads(meta_file.read_text())
    return Built(path, kind, tuple(meta["params"]), tuple(meta["stash"]), input_grad, meta["build_s"])


def build(spec: ModelSpec, first: int, last: int, *, kind: str, input_grad: bool,
          root: Optional[Path] = None, lowered: bool = True) -> Built:
    """Build (or find in the disk cache) the graphs of units first..last: lowered to standard ONNX
    ops (plain onnxruntime runs them) unless ``lowered`` is false (then the training build's
    kernels: for measuring the lowering against them)."""
    last = _range(spec, first, last, kind)
    path = (root or cache_dir()) / key(spec, first, last, kind, input_grad, lowered)
    found = load(path, kind, input_grad)
    if found is not None:
        return found
    if not can_build():
        raise PlanError(f"cannot build {spec.name} units {first}..{last} here: this onnxruntime has no gradient "
                        f"builder (install hiertrain[train] on x86-64, or use segments built there with `hiertrain "
                        f"segments build`: [runtime] segments in a tier's config, profile --segments)")
    t0 = time.perf_counter()
    if first <= last:
        fwd, params = segment_graph(spec, first, last)
    else:  # loss only: the logits come in as x
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", spec.classes])
        fwd = _model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "logits", [x],
                                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", spec.classes])]))
        params = {}
    g = fwd.graph
    sums = [o.name for o in g.output if o.name != "y"]  # BatchNorm buffers' sums: their "gradients"
    requires = {p for p in params if not batchnorm.is_buffer(p)} | ({"x"} if input_grad else set())
    grads = [f"{p}_grad" for p in params] + (["x_grad"] if input_grad else [])
    if kind == "head":
        g.input.append(helper.make_tensor_value_info("labels", TensorProto.INT64, ["N"]))
        g.node.append(helper.make_node("SoftmaxCrossEntropyLoss", ["y", "labels"], [LOSS, "__log_prob"],
                                       reduction="mean"))
    else:
        g.input.append(helper.make_tensor_value_info("gy", TensorProto.FLOAT, ["N", *spec.shape_at(last)]))
        g.node.append(helper.make_node("Mul", ["y", "gy"], ["__ygy"]))
        g.node.append(helper.make_node("ReduceSum", ["__ygy"], [LOSS], keepdims=0))
    del g.output[:]
    g.output.extend([helper.make_tensor_value_info(LOSS, TensorProto.FLOAT, []),
                     helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
                    + [helper.make_tensor_value_info(t, TensorProto.FLOAT, None) for t in sums])
    grad = _gradient_model(fwd, requires) if requires else fwd
    if lowered:
        grad = lowering.lower(grad, f"{spec.name} units {first}..{last}")
    _sums_with_gradients(grad, sums)
    final, path = path, path.with_name(f"{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    path.mkdir(parents=True, exist_ok=True)  # build aside, then rename: other processes may share the cache
    if kind == "head":
        keep = [LOSS, "y", *grads]
        outs = {o.name: o for o in grad.graph.output}
        del grad.graph.output[:]
        grad.graph.output.extend([outs.get(n) or helper.make_empty_tensor_value_info(n) for n in keep])
        onnx.save(grad, path / "step.onnx")
        stash: list[str] = []
    else:
        fwd_m, bwd_m, stash = _split(grad, grads)
        onnx.save(fwd_m, path / "forward.onnx")
        onnx.save(bwd_m, path / "backward.onnx")
        onnx.save(grad, path / "fused.onnx")  # forward + backward in one run: the recompute baseline
    build_s = time.perf_counter() - t0
    (path / "meta.json").write_text(json.dumps({"params": list(params), "stash": stash, "build_s": build_s}))
    try:
        os.rename(path, final)
    except OSError:  # another process finished first: use its copy
        shutil.rmtree(path, ignore_errors=True)
    return Built(final, kind, tuple(params), tuple(stash), input_grad, build_s)
