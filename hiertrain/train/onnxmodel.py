"""A user's ONNX model as a chain of units: ``hiertrain model import FILE.onnx``, ``model = "FILE.onnx"``.

Any model whose graph runs from one float input ``[N, ...]`` to one logits output ``[N, classes]``
(what ``torch.onnx.export`` writes for a classifier) becomes a :class:`~hiertrain.train.models.ModelSpec`
like the zoo's:

- **Cut points** are the places in the graph's node order where exactly one activation tensor
  ``[N, ...]`` crosses and no parameter is used on both sides (between a ResNet's blocks, not inside
  one). The nodes between two cut points are a *unit*; a unit without parameters (a ReLU, a pool)
  joins the unit before it. A unit is named after the modules its parameters belong to (torch's node
  names, ``/features/features.3/Conv`` -> ``features_3``); its parameters keep their names in the file
  (``features_3.features.3.weight``), so trained weights map back to it (:func:`export`).
- **Parameters** are the float initializers (rank >= 1) that reach, directly or through ops that only
  reshape them, a slot where a weight goes (Conv's and Gemm's weight and bias, either side of
  MatMul/Add/Mul/..., a normalization's scale and bias).
  Everything else (shapes, clip bounds, scalars, running statistics) is a constant, folded into the
  unit that uses it. Training starts from the file's weights.
- **Every op is checked** against what segments differentiate exactly and lower to standard ONNX
  (:data:`SUPPORTED`); anything else is refused naming the op, the node and what to do
  (:data:`REFUSED` for the ops with a known reason).

BatchNormalization: in inference mode (``model.eval()`` before exporting) its statistics are
constants and its scale and bias train: the step is exactly single-process SGD whatever the split.
(torch's exporter folds it into the Conv before it unless ``do_constant_folding=False``; the folded
Conv's weights then train instead, exactly too.) In training mode (``training=TrainingMode.TRAINING``)
it normalises by the batch and keeps running statistics: :mod:`hiertrain.train.batchnorm`.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper, shape_inference

from hiertrain.errors import ConfigError
from hiertrain.train import batchnorm
from hiertrain.train.cutpoints import common, cut_points, sanitize, unit_fn, unit_groups
from hiertrain.train.folding import at_two_batch_sizes, attr, constant_value, fold, static
from hiertrain.train.models import OPSET, ModelSpec, Shape, Unit
from hiertrain.train.opset import converted
from hiertrain.train.rewrite import rewrite

# op -> the input slots where a float initializer is a trainable parameter
SUPPORTED: dict[str, tuple[int, ...]] = {
    "Conv": (1, 2), "Gemm": (0, 1, 2), "MatMul": (0, 1),
    "Add": (0, 1), "Sub": (0, 1), "Expand": (0,),  # rewritten into an Add of zeros
    "Gather": (), "Slice": (),      # of an activation at constant positions: a 0/1 selection (rewrite.py)
    "Mul": (0, 1), "Div": (),  # by a constant only: rewritten into a Mul
    "Relu": (), "LeakyRelu": (), "Sigmoid": (), "Tanh": (), "Clip": (),  # Clip rewritten into Where (rewrite.py)
    "Where": (), "Greater": (), "Less": (), "GreaterOrEqual": (), "LessOrEqual": (), "And": (), "Not": (),
    "MaxPool": (), "AveragePool": (), "GlobalAveragePool": (),
    "Flatten": (), "Reshape": (), "Transpose": (), "Concat": (), "Identity": (), "Unsqueeze": (), "Squeeze": (),
    "Split": (),                    # not along the batch (folding.AXIS_OPS)
    "Pad": (),                      # constant mode, constant pads, the batch unpadded (TF-style "same")
    "ReduceMean": (), "Sqrt": (), "Reciprocal": (),
    "BatchNormalization": (1, 2),   # inference mode: constant statistics; training mode: batchnorm.py
    "Dropout": (),                  # inference mode only: an Identity
    "Erf": (),                      # torch's exact GELU: onnxruntime fuses it into Gelu
    "HardSigmoid": (), "HardSwish": (),  # rewritten into Mul/Add/Clip
    "LayerNormalization": (1, 2), "InstanceNormalization": (1, 2),  # rewritten into ReduceMean arithmetic
}

REFUSED: dict[str, str] = {
    "LSTM": "recurrent layers are not split into units; train a convolutional or MLP model",
    "GRU": "recurrent layers are not split into units; train a convolutional or MLP model",
    "RNN": "recurrent layers are not split into units; train a convolutional or MLP model",
    "Loop": "control flow has no gradient here; export a model without loops",
    "If": "control flow has no gradient here; export with a fixed branch",
    "Scan": "control flow has no gradient here",
    "RandomNormal": "random ops differ between workers; export in inference mode (model.eval())",
    "RandomUniform": "random ops differ between workers; export in inference mode (model.eval())",
    "RandomNormalLike": "random ops differ between workers; export in inference mode (model.eval())",
    "RandomUniformLike": "random ops differ between workers; export in inference mode (model.eval())",
    "Bernoulli": "random ops differ between workers; export in inference mode (model.eval())",
    "Softplus": "onnxruntime-training has no gradient for it; use ReLU, SiLU or GELU",
    "Elu": "onnxruntime-training has no gradient for it; use ReLU, LeakyReLU, SiLU or GELU",
    "Softmax": "the loss applies the softmax: export the logits (drop the final Softmax)",
    "LogSoftmax": "the loss applies the softmax: export the logits (drop the final LogSoftmax)",
}

# ops that move a parameter's values without changing them (its gradient flows through)
_PASS_THROUGH = {"Unsqueeze", "Squeeze", "Reshape", "Transpose", "Identity", "Flatten"}
# ops whose value never depends on an activation's values (only on its shape): no gradient flows
_SHAPE_OPS = {"Shape", "Size", "ConstantOfShape"}
# a node whose inputs are all constants is evaluated once at import, whatever its op (transformers'
# models compute TF-style pads and interpolation checks with Shape, Equal, Where, ConstantOfShape...),
# except the ops that draw random numbers
_RANDOM = {op for op, why in REFUSED.items() if why.startswith("random ops")} | {"Multinomial", "Dropout"}


def _folded(n: onnx.NodeProto, consts: dict) -> list | None:
    """A node of constants evaluated, or None when the reference evaluator cannot (the node is then
    checked as any other: supported, or refused in one line)."""
    try:
        return fold(n, [consts[t] if t else None for t in n.input])
    except Exception:  # noqa: BLE001 - an op or attribute the evaluator lacks: not folded, judged later
        return None


def _bad(path: Path, what: str) -> ConfigError:
    return ConfigError(f"{path}: {what}")


@dataclass
class Imported:
    """What :func:`inspect` found, for ``hiertrain model import``."""

    path: Path
    name: str
    input_shape: Shape
    classes: int
    units: list[dict] = field(default_factory=list)   # name, ops, nodes, params (count), output shape
    cut_points: int = 0
    nodes: int = 0
    original: dict[str, str] = field(default_factory=dict)  # our parameter name -> the file's initializer


class _Importer:
    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read the model {path}: {exc.strerror}") from None
        try:
            model = onnx.load_from_string(raw)
            onnx.checker.check_model(model)
        except Exception as exc:  # noqa: BLE001 - any parse or check failure is one line
            raise _bad(path, f"not a valid ONNX model ({str(exc).splitlines()[0][:200]})") from None
        self.digest = hashlib.sha256(raw).hexdigest()
        self.name = f"{sanitize(path.stem)[:40]}-{self.digest[:8]}"
        opset = {o.domain: o.version for o in model.opset_import}
        if opset.get("", opset.get("ai.onnx", 0)) != OPSET:
            why = converted(model, OPSET)
            if isinstance(why, str):
                raise _bad(path, f"opset {opset.get('')} could not be converted to {OPSET} ({why}); "
                                 f"export with opset_version={OPSET}")
            model = why
        self.model = model
        self.problems: list[str] = []
        self.origin: dict[str, str] = {}  # a rewritten node's name -> the file's node it replaces
        self.origin_op: dict[str, str] = {}  # ... and that node's op
        self.synthetic: set[str] = set()  # parameters the file does not have (BatchNorm's batch counters)

    # -------------------------------------------------------------------- the graph's pieces
    def run(self) -> tuple[ModelSpec, Imported]:
        g = self.model.graph
        inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
        inputs = [i for i in g.input if i.name not in inits]
        if len(inputs) != 1 or len(g.output) != 1:
            raise _bad(self.path, f"a model must take one input and give one output (the logits); this one takes "
                                  f"{len(inputs)} and gives {len(g.output)}")
        x_info, y_info = inputs[0], g.output[0]
        for info, what in ((x_info, "input"), (y_info, "output")):
            if info.type.tensor_type.elem_type != TensorProto.FLOAT:
                raise _bad(self.path, f"its {what} {info.name!r} is not float32")
        dims = x_info.type.tensor_type.shape.dim
        if len(dims) < 2 or any(not d.HasField("dim_value") or d.dim_value <= 0 for d in dims[1:]):
            raise _bad(self.path, f"its input {x_info.name!r} must be [N, fixed per-sample shape]; export with "
                                  f"a concrete sample shape and dynamic_axes={{{x_info.name!r}: {{0: 'N'}}}}")
        self.input_shape = tuple(d.dim_value for d in dims[1:])
        # the batch dimension symbolic, whatever the export said, then shapes of every tensor
        dims[0].Clear()
        dims[0].dim_param = "N"
        ydims = y_info.type.tensor_type.shape.dim
        if len(ydims):
            ydims[0].Clear()
            ydims[0].dim_param = "N"
        nodes = [onnx.NodeProto.FromString(n.SerializeToString()) for n in g.node]  # (the file stays as it is)
        self.x, self.y = x_info.name, y_info.name
        params, consts, active = self._classify(nodes, inits)
        active = static(active, consts, model=self.model, x=self.x, y=self.y, input_shape=self.input_shape,
                        path=self.path, problems=self.problems)
        shapes = self._shapes(active, {**consts, **params})
        active = self._rewrite(active, params, consts, shapes)
        self._check(active, consts)
        self._refuse()
        ys = shapes.get(self.y)
        if ys is None or len(ys) != 1 or not isinstance(ys[0], int):
            raise _bad(self.path, f"its output must be logits [N, classes], not {['N', *ys] if ys else 'unknown'}")
        classes = ys[0]
        if classes < 2:
            raise _bad(self.path, f"its output has {classes} class; a classifier needs at least 2")
        cuts = cut_points(active, params, shapes, x=self.x, y=self.y)
        groups = unit_groups(active, params, cuts)
        return self._spec(groups, params, consts, shapes, self.input_shape, classes, len(cuts))

    def _classify(self, nodes, inits):
        """Split the graph into trainable parameters, constants (folded) and the activation nodes.

        An Identity of an initializer is an initializer of its own: torch's exporter writes one
        initializer for parameters that happen to be equal (two zero biases) and Identity nodes
        for the others; they are distinct parameters, trained apart."""
        copies = {n.output[0]: n.input[0] for n in nodes if n.op_type == "Identity" and n.input[0] in inits}
        for out, src in copies.items():
            inits[out] = inits[src].copy()
        nodes = [n for n in nodes if n.output[0] not in copies]
        if self.y in copies:
            raise _bad(self.path, "its output is a constant")
        # a float initializer is a parameter where it reaches a weight's slot, directly or through
        # ops that only reshape it (GroupNorm's Unsqueeze of its weight)
        wanted: set[str] = set()
        for n in reversed(nodes):
            if n.op_type in _PASS_THROUGH and any(o in wanted for o in n.output):
                wanted.add(n.input[0])
            wanted.update(t for k, t in enumerate(n.input) if k in SUPPORTED.get(n.op_type, ()))
            if n.op_type == "BatchNormalization" and attr(n, "training_mode", 0):
                wanted.update(n.input[3:5])  # its running statistics: buffers, kept with its unit
        params = {t: v for t, v in inits.items() if t in wanted and v.dtype == np.float32 and v.ndim >= 1}
        consts = {t: v for t, v in inits.items() if t not in params}
        active = []
        for n in nodes:
            if n.op_type == "Constant":
                consts[n.output[0]] = constant_value(n)
            elif (n.input and all(t in consts or not t for t in n.input) and n.op_type not in _RANDOM
                  and (values := _folded(n, consts)) is not None):
                consts.update(zip(n.output, values))
            else:
                active.append(n)
        return params, consts, active

    def _refuse(self) -> None:
        if self.problems:
            raise _bad(self.path, "cannot be trained exactly: " + "; ".join(self.problems[:6])
                       + (f"; and {len(self.problems) - 6} more" if len(self.problems) > 6 else ""))

    def _rewrite(self, nodes, params, consts, shapes):
        """Inference-mode BatchNormalization into constant-statistics arithmetic, Dropout into Identity,
        division by a constant into a multiplication, and the ops in :data:`hiertrain.train.rewrite.DECOMPOSE` into ops with
        gradients; each new node remembers the node it came from (:meth:`_module`)."""
        out: list[onnx.NodeProto] = []
        for n in nodes:
            before = len(out)
            rewrite(n, out, params, consts, shapes, self.problems, self.synthetic)
            for m in out[before:]:
                self.origin[m.name] = n.name
                self.origin_op[m.name] = n.op_type
        return out

    def _file_ops(self, nodes: list[onnx.NodeProto]) -> list[str]:
        """The ops of the file's nodes behind ``nodes`` (a Clip, not the Where it became), in order."""
        seen, ops = set(), []
        for n in nodes:
            origin = self.origin.get(n.name, n.name)
            if origin not in seen:
                seen.add(origin)
                ops.append(self.origin_op.get(n.name, n.op_type))
        return ops

    def _module(self, node: onnx.NodeProto) -> str:
        """The module a node belongs to, from torch's scoped node names: ``/features/features.3/Conv``
        -> ``features.3``, ``/1/a/Conv`` -> ``1.a``; "" when the name says nothing."""
        parts = [p for p in self.origin.get(node.name, node.name).split("/") if p][:-1]
        path, prev = "", ""
        for p in parts:  # torch repeats a level's parent in its name: /f/f.0/... is f.0, /4/b/b.0/... is 4.b.0
            if prev and p.startswith(prev + "."):
                path = path[:len(path) - len(prev)] + p
            else:
                path = f"{path}.{p}" if path else p
            prev = p
        return path

    def _check(self, nodes, consts):
        """Every node trains exactly: an op of SUPPORTED, or a computation on shapes only (``Shape``
        of an activation and integer arithmetic on it, which has no gradient)."""
        shape_valued: set[str] = set()
        for n in nodes:
            where = f"{n.op_type} (node {n.name or n.output[0]!r})"
            if n.op_type in _SHAPE_OPS or (n.op_type not in _RANDOM and n.input
                                           and all(t in shape_valued or t in consts or not t for t in n.input)):
                shape_valued.update(n.output)
            elif n.domain == batchnorm.DOMAIN:
                pass  # ours: a training-mode BatchNormalization
            elif n.domain not in ("", "ai.onnx"):
                self.problems.append(f"{n.domain}.{where}: only standard ONNX ops can be trained here")
            elif n.op_type == "Pad":
                pads = consts.get(n.input[1]) if len(n.input) > 1 else None
                mode = attr(n, "mode", b"constant")
                mode = mode.decode() if isinstance(mode, bytes) else mode
                if mode != "constant" or pads is None or len(n.input) > 3 and n.input[3]:
                    self.problems.append(f"{where}: only constant padding by constant pads trains here (this one: "
                                         f"mode {mode!r}{', computed pads' if pads is None else ''})")
                elif pads.reshape(-1)[0] or pads.reshape(-1)[pads.size // 2]:
                    self.problems.append(f"{where} pads the batch dimension: each sample must stay apart")
            elif n.op_type == "Softmax" and self.y not in n.output:
                pass  # inside the model (attention): checked along the samples (folding.static)
            elif n.op_type in REFUSED:
                last = n.op_type in ("Softmax", "LogSoftmax") and self.y in n.output
                self.problems.append(f"{where}: " + (REFUSED[n.op_type] if last or n.op_type not in (
                    "Softmax", "LogSoftmax") else "not among the ops hiertrain trains exactly"))
            elif n.op_type not in SUPPORTED:
                self.problems.append(f"{where}: not among the ops hiertrain trains exactly "
                                     f"({', '.join(sorted(SUPPORTED))})")
            elif n.op_type == "Reshape" and n.input[1] in consts and consts[n.input[1]].size \
                    and int(consts[n.input[1]].reshape(-1)[0]) not in (0, -1) \
                    and not n.name.endswith(("/scale_shape", "/bias_shape")):  # ours: a parameter's shape
                self.problems.append(f"{where} fixes the batch dimension to {int(consts[n.input[1]].reshape(-1)[0])}: "
                                     f"export with torch.flatten(x, 1) or x.reshape(x.shape[0], -1)")

    def _shapes(self, active: list[onnx.NodeProto], values: dict[str, np.ndarray]) -> dict[str, list]:
        """Per-sample shapes of the activations (ONNX shape inference, batch dimension N), inferred on
        the graph with its constants folded: a Pad whose pads the file computes (transformers' TF-style
        padding) then has a known output shape. What inference cannot tell (an Expand to a shape computed
        from the batch: a ViT's class token) is measured: the file run at two batch sizes."""
        g = self.model.graph
        used = {t for n in active for t in n.input if t in values}
        graph = helper.make_graph(active, g.name, [i for i in g.input if i.name == self.x],
                                  list(g.output), [numpy_helper.from_array(np.asarray(values[t]), t) for t in sorted(used)])
        model = helper.make_model(graph, opset_imports=list(self.model.opset_import))
        inferred = shape_inference.infer_shapes(model, strict_mode=False)
        out: dict[str, list] = {}
        for v in [*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input]:
            dims = v.type.tensor_type.shape.dim
            if len(dims) and dims[0].dim_param == "N":
                out[v.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims[1:]]
        unknown = [o for n in active for o in n.output
                   if o and o not in values and (o not in out or None in out[o]) and n.op_type not in _SHAPE_OPS]
        try:
            measured = at_two_batch_sizes(self.model, self.x, self.input_shape, self.path, unknown) if unknown else []
        except ConfigError:
            measured = []  # a file that does not run at two batch sizes: its refusal says why (_check)
        for o, (two, three) in zip(unknown, measured):
            if two.ndim and two.shape[:1] == (2,) and three.shape == (3, *two.shape[1:]):
                out[o] = list(two.shape[1:])
        return out

    def _spec(self, groups, params, consts, shapes, input_shape, classes, n_cuts) -> tuple[ModelSpec, Imported]:
        names: list[str] = []
        units, initial, original, info = [], {}, {}, []
        boundary = self.x
        for k, grp in enumerate(groups):
            owner = next((n for n in grp if any(t in params for t in n.input)), grp[0])
            module = common([self._module(n) for n in grp if any(t in params for t in n.input)] or [self._module(owner)])
            base = sanitize(module) if module else f"{owner.op_type.lower()}{k + 1}"
            base = f"layer{base}" if base[0].isdigit() else base
            name, j = base, 1
            while name in names:
                j += 1
                name = f"{base}_{j}"
            names.append(name)
            produced = {o for n in grp for o in n.output}
            out = self.y if k == len(groups) - 1 else next(
                t for t in produced if any(t in n.input for g2 in groups[k + 1:] for n in g2))
            short: dict[str, str] = {}
            for n in grp:
                if n.domain == batchnorm.DOMAIN:  # its buffers: <layer>.running_mean, ... (PyTorch's names)
                    layer = re.sub(r"[^\w.]", "_", self._module(n) or n.name) or "bn"
                    while f"{layer}.running_mean" in short.values():
                        layer += "_"
                    short.update(zip(n.input[3:6], batchnorm.buffers(layer)))
                    for t in n.input[3:6]:
                        initial[f"{name}.{short[t]}"] = params[t].astype(np.float32)
                        if t not in self.synthetic:
                            original[f"{name}.{short[t]}"] = t
                for slot, t in enumerate(n.input):
                    if t in params and t not in short:
                        mod = self._module(n) or n.op_type.lower()
                        s = t if re.fullmatch(r"[A-Za-z_][\w.]*", t) else f"{mod}.{('weight', 'bias')[slot - 1] if n.op_type in ('Conv', 'Gemm', 'BatchNormalization') and slot in (1, 2) else f'input{slot}'}"
                        s = re.sub(r"[^\w.]", "_", s)
                        while s in short.values() or batchnorm.is_buffer(s):  # (those names are BatchNorm's)
                            s += "_"
                        short[t] = s
                        initial[f"{name}.{s}"] = params[t].astype(np.float32)
                        original[f"{name}.{s}"] = t
            used_consts = sorted({t for n in grp for t in n.input if t in consts})
            units.append(Unit(name, unit_fn(tuple(grp), boundary, out, tuple((t, consts[t]) for t in used_consts),
                                             tuple((t, s, tuple(params[t].shape)) for t, s in short.items()),
                                             tuple(shapes[out]) if out != self.y else (classes,),
                                             tuple((t, tuple(shapes[t])) for n in grp for t in n.output
                                                   if t in shapes and all(isinstance(d, int) for d in shapes[t])))))
            info.append({"name": name, "ops": self._file_ops(grp), "nodes": len(grp),
                         "params": int(sum(params[t].size for t, s in short.items() if not batchnorm.is_buffer(s))), "output": list(shapes.get(out, [classes]))})
            boundary = out
        spec = ModelSpec(self.name, input_shape, classes, tuple(units), initial=initial, source=str(self.path))
        return spec, Imported(self.path, self.name, input_shape, classes, info, n_cuts, sum(len(g) for g in groups),
                              original)


def inspect(path: Path) -> tuple[ModelSpec, Imported]:
    """Import ``path``: the model spec and what was found (units, cut points), or a ConfigError."""
    return _Importer(Path(path)).run()


def load(path: Path) -> ModelSpec:
    return inspect(path)[0]


def export(path: Path, params: dict[str, np.ndarray], out: Path) -> int:
    """Write the model at ``path`` with its parameters replaced by ``params`` (a checkpoint of it) to
    ``out``; returns how many initializers were replaced. The graph is the file's own, but for a
    BatchNormalization trained in training mode: it is written in inference mode, normalising by the
    running statistics training kept (PyTorch's ``model.eval()``)."""
    spec, found = inspect(Path(path))
    missing = sorted(set(found.original) - set(params))
    if missing:
        raise ConfigError(f"the checkpoint lacks {len(missing)} parameters of {spec.name} (e.g. {missing[0]}): "
                          f"it is not a checkpoint of this model")
    model = onnx.load(str(path))
    by_file = {found.original[k]: v for k, v in params.items() if k in found.original}
    g, n = model.graph, 0
    for node in g.node:  # trained BatchNorm: the model as evaluated (its running statistics)
        if node.op_type == "BatchNormalization" and attr(node, "training_mode", 0):
            for a in node.attribute:
                if a.name == "training_mode":
                    a.i = 0
            del node.output[1:]
    for init in g.initializer:
        if init.name in by_file:
            init.CopyFrom(numpy_helper.from_array(by_file[init.name].astype(np.float32), init.name))
            n += 1
    copies = [node for node in g.node if node.op_type == "Identity" and node.output[0] in by_file]
    for node in copies:  # a parameter the file shared with an equal one: now an initializer of its own
        g.node.remove(node)
        g.initializer.append(numpy_helper.from_array(by_file[node.output[0]].astype(np.float32), node.output[0]))
        n += 1
    tmp = Path(f"{out}.tmp")
    onnx.save(model, str(tmp))
    tmp.replace(out)
    return n


def check_gradients(spec: ModelSpec) -> float:
    """Build (and lower) the whole model's training graph once: every op's gradient exists and runs
    on plain onnxruntime. Needs the gradient builder; returns the seconds it took."""
    import tempfile
    import time

    from hiertrain.train import segments

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        segments.build(spec, 1, spec.n_units, kind="head", input_grad=False, root=Path(tmp))
    return time.perf_counter() - t0
