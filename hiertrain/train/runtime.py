"""Running built segments: ORT sessions of a segment's graphs, the evaluation model, and the runtime
that builds (or fetches) each unit range once and keeps its sessions.

Every tier computes through a :class:`Runtime`: on a machine with the gradient builder it builds
segments (:mod:`hiertrain.train.segments`); on plain onnxruntime (a Raspberry Pi) it gets them from a
provider, a directory of artifacts or a builder tier over MQTT (:mod:`hiertrain.train.artifacts`).
A kernel that fails on its inputs is one :class:`~hiertrain.errors.SegmentError` naming the segment.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import onnxruntime as ort

from hiertrain.errors import PlanError, SegmentError
from hiertrain.train.models import ModelSpec, segment_graph
from hiertrain.train.segments import LOSS, Built, build, cache_dir, can_build, key, load, session_options

_pybind = ort.capi.onnxruntime_pybind11_state
ORT_FAILURES: tuple[type[Exception], ...] = tuple(
    c for c in (getattr(_pybind, n, None) for n in ("Fail", "RuntimeException", "InvalidArgument", "EPFail"))
    if isinstance(c, type))
"""What onnxruntime raises when a kernel fails on its inputs (its pybind classes derive from Exception only)."""


class Segment:
    """ORT sessions of one built segment; parameters are passed in on every call (by name).

    ``dilation`` (>= 1, an emulated device only: :mod:`hiertrain.lab.emulation`) stretches every kernel
    run to that many times its measured seconds, by sleeping the difference after it: a device's
    kernels are emulated slower than its interpreter, which only its CPU quota slows."""

    def __init__(self, built: Built, *, threads: int = 0, dilation: float = 1.0) -> None:
        self.built = built
        self.dilation = dilation
        so = session_options(threads)
        names = ("step",) if built.kind == "head" else ("forward", "backward", "fused")
        self._sessions: dict[str, ort.InferenceSession] = {}
        self._paths = {n: str(built.path / f"{n}.onnx") for n in names}
        self._so = so
        self.grad_names = [f"{p}_grad" for p in built.params]

    def _session(self, name: str) -> ort.InferenceSession:
        sess = self._sessions.get(name)
        if sess is None:
            sess = ort.InferenceSession(self._paths[name], self._so, providers=["CPUExecutionProvider"])
            sess._hiertrain_inputs = [i.name for i in sess.get_inputs()]  # type: ignore[attr-defined]
            self._sessions[name] = sess
        return sess

    def _run(self, name: str, outputs: list[str], feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        sess = self._session(name)
        try:
            t0 = time.perf_counter()
            out = sess.run(outputs, {k: feed[k] for k in sess._hiertrain_inputs})  # type: ignore[attr-defined]
            if self.dilation > 1.0:
                time.sleep((self.dilation - 1.0) * (time.perf_counter() - t0))
            return out
        except ORT_FAILURES as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            hint = "; non-finite values inside the model fail so: training diverged?" if "narrowing" in first else ""
            raise SegmentError(f"onnxruntime failed running {name} of segment {self.built.path.name}: "
                               f"{first}{hint}") from None

    def forward(self, params: dict[str, np.ndarray], x: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """Activations at the segment's end, and the stash its backward will need."""
        outs = self._run("forward", ["y", *(s for s in self.built.stash if s not in ("x", "y"))], {**params, "x": x})
        y, rest = outs[0], iter(outs[1:])
        return y, [x if s == "x" else y if s == "y" else next(rest) for s in self.built.stash]

    def backward(self, params: dict[str, np.ndarray], stash: list[np.ndarray], gy: np.ndarray
                 ) -> tuple[Optional[np.ndarray], dict[str, np.ndarray]]:
        """(input gradient or None, parameter gradients) from the stash and the upstream gradient."""
        feed = {**params, **dict(zip(self.built.stash, stash)), "gy": gy}
        return self._gradients(self._run("backward", self._outputs(), feed))

    def fused(self, params: dict[str, np.ndarray], x: np.ndarray, gy: np.ndarray
              ) -> tuple[Optional[np.ndarray], dict[str, np.ndarray]]:
        """Forward and backward in one run (what ORT's TrainStep does); for measuring recompute."""
        return self._gradients(self._run("fused", self._outputs(), {**params, "x": x, "gy": gy}))

    def step(self, params: dict[str, np.ndarray], x: np.ndarray, labels: np.ndarray
             ) -> tuple[float, np.ndarray, Optional[np.ndarray], dict[str, np.ndarray]]:
        """Head: (mean loss, logits, input gradient or None, parameter gradients)."""
        outs = self._run("step", [LOSS, "y", *self._outputs()], {**params, "x": x, "labels": labels})
        gx, grads = self._gradients(outs[2:])
        return float(outs[0]), outs[1], gx, grads

    def _outputs(self) -> list[str]:
        return self.grad_names + (["x_grad"] if self.built.input_grad else [])

    def _gradients(self, outs: list[np.ndarray]) -> tuple[Optional[np.ndarray], dict[str, np.ndarray]]:
        grads = dict(zip(self.built.params, outs[:len(self.built.params)]))
        return (outs[-1] if self.built.input_grad else None), grads


class Predictor:
    """The whole model in evaluation mode (BatchNorm by its running statistics): logits of samples."""

    def __init__(self, spec: ModelSpec, *, threads: int = 0) -> None:
        graph, _ = segment_graph(spec, 1, spec.n_units, training=False)
        self._sess = ort.InferenceSession(graph.SerializeToString(), session_options(threads),
                                          providers=["CPUExecutionProvider"])
        self._inputs = [i.name for i in self._sess.get_inputs()]

    def __call__(self, params: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
        feed = {**params, "x": x}
        return self._sess.run(["y"], {k: feed[k] for k in self._inputs})[0]


class Runtime:
    """Builds segments on demand and keeps their sessions; one per process (or per emulated tier).

    Where this onnxruntime cannot build (plain onnxruntime, e.g. on a Raspberry Pi), a segment not
    yet in the cache comes from ``provider(segment identity, cache root)``: a directory of
    artifacts or a builder tier over MQTT (:mod:`hiertrain.train.artifacts`).
    """

    def __init__(self, *, threads: int = 0, root: Optional[Path] = None,
                 provider: Optional[Callable[[ModelSpec, int, int, str, bool, Path], Path]] = None,
                 dilation: float = 1.0) -> None:
        self.threads = threads
        self.dilation = dilation  # an emulated device's kernels (Segment)
        self.root = root
        self.provider = provider
        self.builds = can_build()
        self._segments: dict[tuple, Segment] = {}
        self._lock = threading.Lock()

    def _built(self, spec: ModelSpec, first: int, last: int, kind: str, input_grad: bool) -> Built:
        if self.builds or self.provider is None:
            return build(spec, first, last, kind=kind, input_grad=input_grad, root=self.root)
        root = self.root or cache_dir()
        path = root / key(spec, first, last, kind, input_grad)
        found = load(path, kind, input_grad)
        if found is None:
            found = load(self.provider(spec, first, last, kind, input_grad, root), kind, input_grad)
        if found is None:
            raise PlanError(f"segment {path.name} arrived without its meta.json")
        return found

    def segment(self, spec: ModelSpec, first: int, last: int, *, kind: str = "body",
                input_grad: Optional[bool] = None) -> Segment:
        input_grad = first > 1 if input_grad is None else input_grad
        key_ = (spec.name, first, last if kind == "body" else spec.n_units, kind, input_grad)
        with self._lock:
            seg = self._segments.get(key_)
            if seg is None:
                seg = Segment(self._built(spec, first, last, kind, input_grad), threads=self.threads,
                              dilation=self.dilation)
                self._segments[key_] = seg
            return seg

    def head(self, spec: ModelSpec, first: int) -> Segment:
        return self.segment(spec, first, spec.n_units, kind="head")
