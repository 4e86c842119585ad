"""Every lowered op against the onnxruntime-training kernel it replaces, and whole segments of the zoo."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from hiertrain.train import lowering, models, segments
from hiertrain.train.runtime import Segment
from hiertrain.errors import PlanError

pytestmark = pytest.mark.compute
MS = "com.microsoft"


def _model(nodes, inputs, outputs, inits=()):
    g = helper.make_graph(nodes, "t", inputs, outputs, list(inits))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(MS, 1)])
    m.ir_version = 8
    return m


def _run(model, feed):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {i.name: feed[i.name] for i in sess.get_inputs()})


def _compare(model, feed, *, what="a test graph", tol=2e-6, exact=False):
    low = lowering.lower(model, what)
    assert lowering.nonstandard_ops(low) == []
    ref, got = _run(model, feed), _run(low, feed)
    assert len(ref) == len(got)
    for r, g in zip(ref, got):
        assert r.shape == g.shape and r.dtype == g.dtype
        if exact:
            np.testing.assert_array_equal(g, r)
        else:
            np.testing.assert_allclose(g, r, rtol=tol, atol=tol * max(1.0, float(np.abs(r).max())))
    return low


def _f(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


rng = np.random.default_rng(7)


@pytest.mark.parametrize("k,s,pads,d,g,c,o,hw", [
    (3, 1, [1, 1, 1, 1], 1, 1, 3, 4, (9, 9)),
    (5, 2, [2, 2, 2, 2], 1, 1, 3, 5, (11, 10)),        # stride with leftover rows and columns
    (3, 2, [1, 0, 2, 1], 2, 1, 2, 3, (12, 13)),        # asymmetric pads and dilation
    (3, 1, [1, 1, 1, 1], 1, 2, 4, 6, (7, 7)),          # groups
    (3, 2, [1, 1, 1, 1], 1, 4, 4, 4, (8, 8)),          # depthwise
    (1, 1, [0, 0, 0, 0], 1, 1, 6, 5, (5, 7)),          # 1x1: one GEMM
    (1, 1, [0, 0, 0, 0], 1, 2, 6, 4, (5, 7)),          # 1x1 with groups: a GEMM per group
    (1, 2, [0, 0, 0, 0], 1, 1, 6, 5, (7, 7)),          # 1x1 strided: the general path
    ((2, 3), (2, 1), [0, 1, 1, 0], (1, 2), 1, 2, 3, (9, 8)),  # rectangular everything
    (5, 1, [2, 2, 2, 2], 1, 2, 4, 6, (9, 9)),          # 5x5 and larger: dW by the Conv of transposes, groups
    (5, 2, [1, 2, 0, 1], 2, 1, 3, 4, (15, 14)),        # ... with stride, dilation, asymmetric pads
    (3, 1, [1, 0, 2, 1], 2, 1, 16, 24, (10, 9)),       # stride 1, 16..128 channels: dX by a Conv (flipped kernel)
])
def test_conv_grad(k, s, pads, d, g, c, o, hw):
    k, s, d = ((v, v) if isinstance(v, int) else v for v in (k, s, d))
    n = 3
    attrs = dict(kernel_shape=list(k), strides=list(s), pads=pads, dilations=list(d), group=g)
    oh = [(hw[i] + pads[i] + pads[i + 2] - d[i] * (k[i] - 1) - 1) // s[i] + 1 for i in range(2)]
    nodes = [helper.make_node("ConvGrad", ["dY", "X", "W"], ["dX", "dW", "dB"], domain=MS, **attrs)]
    m = _model(nodes, [_f("dY", [n, o, *oh]), _f("X", [n, c, *hw]), _f("W", [o, c // g, *k])],
               [_f("dX", [n, c, *hw]), _f("dW", [o, c // g, *k]), _f("dB", [o])])
    feed = {"dY": rng.standard_normal((n, o, *oh)).astype(np.float32),
            "X": rng.standard_normal((n, c, *hw)).astype(np.float32),
            "W": rng.standard_normal((o, c // g, *k)).astype(np.float32)}
    _compare(m, feed)


def test_conv_grad_without_input_gradient_and_with_a_symbolic_batch():
    nodes = [helper.make_node("ConvGrad", ["dY", "X", "W"], ["", "dW", "dB"], domain=MS, kernel_shape=[3, 3],
                              strides=[1, 1], pads=[0, 0, 0, 0], group=1)]
    m = _model(nodes, [_f("dY", ["N", 2, 4, 4]), _f("X", ["N", 3, 6, 6]), _f("W", [2, 3, 3, 3])],
               [_f("dW", [2, 3, 3, 3]), _f("dB", [2])])
    feed = {"dY": rng.standard_normal((5, 2, 4, 4)).astype(np.float32),
            "X": rng.standard_normal((5, 3, 6, 6)).astype(np.float32),
            "W": rng.standard_normal((2, 3, 3, 3)).astype(np.float32)}
    low = _compare(m, feed)
    assert "ConvTranspose" not in {n.op_type for n in low.graph.node}


@pytest.mark.parametrize("k,s,p,ties", [
    (2, 2, 0, False), (2, 2, 0, True),          # non-overlapping: MaxUnpool
    (3, 2, 1, False), (3, 2, 1, True),          # overlapping: ScatterElements(add)
    (3, 1, 1, True), (3, 3, 1, False),
])
def test_maxpool_grad(k, s, p, ties):
    n, c, h = 2, 3, 9
    x = rng.standard_normal((n, c, h, h)).astype(np.float32)
    if ties:  # relu'd activations: many equal values in a window
        x = np.maximum(np.round(x), 0).astype(np.float32)
    oh = (h + 2 * p - k) // s + 1
    attrs = dict(kernel_shape=[k, k], strides=[s, s], pads=[p] * 4)
    nodes = [helper.make_node("MaxPool", ["X"], ["Y", "I"], **attrs),
             helper.make_node("MaxPoolGrad", ["dY", "I"], ["dX"], **attrs)]
    m = _model(nodes, [_f("X", [n, c, h, h]), _f("dY", [n, c, oh, oh])], [_f("Y", [n, c, oh, oh]), _f("dX", [n, c, h, h])])
    low = _compare(m, {"X": x, "dY": rng.standard_normal((n, c, oh, oh)).astype(np.float32)}, exact=True)
    ops = {node.op_type for node in low.graph.node}
    assert ("MaxUnpool" in ops) == (k <= s)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("ignore", [None, 2])
def test_softmax_cross_entropy_loss_grad(reduction, ignore):
    n, c = 7, 5
    extra = {} if ignore is None else {"ignore_index": ignore}
    labels = np.array([0, 2, 4, 1, 2, 3, 0], np.int64)
    nodes = [helper.make_node("SoftmaxCrossEntropyLoss", ["L", "y"], ["loss", "logp"], reduction=reduction, **extra),
             helper.make_node("SoftmaxCrossEntropyLossGrad", ["dY", "logp", "y"], ["dL"], domain=MS,
                              reduction=reduction, **extra)]
    dy_shape = [n] if reduction == "none" else []
    m = _model(nodes, [_f("L", [n, c]), helper.make_tensor_value_info("y", TensorProto.INT64, [n]), _f("dY", dy_shape)],
               [_f("dL", [n, c])])
    dy = rng.uniform(0.5, 2, dy_shape).astype(np.float32)
    _compare(m, {"L": rng.standard_normal((n, c)).astype(np.float32), "y": labels, "dY": dy}, tol=1e-6)


def test_relu_grad_scale_split_and_concat_training():
    n = 4
    nodes = [helper.make_node("Relu", ["X"], ["R"]),
             helper.make_node("ReluGrad", ["dY", "R"], ["dR"], domain=MS),
             helper.make_node("Scale", ["dR", "s"], ["up"], domain=MS, scale_down=0),
             helper.make_node("Scale", ["dR", "s"], ["down"], domain=MS, scale_down=1),
             helper.make_node("ConcatTraining", ["up", "down", "X"], ["cat", "lens"], domain=MS, axis=1),
             helper.make_node("SplitTraining", ["cat", "lens"], ["a", "b", "c"], domain=MS, axis=1)]
    shape = [n, 3, 5]
    m = _model(nodes, [_f("X", shape), _f("dY", shape), _f("s", [])],
               [_f("cat", [n, 9, 5]), helper.make_tensor_value_info("lens", TensorProto.INT64, [3]),
                _f("a", shape), _f("b", shape), _f("c", shape)])
    x = rng.standard_normal(shape).astype(np.float32)
    x[0, 0, :2] = 0.0  # the boundary: ReluGrad passes nothing at exactly 0
    _compare(m, {"X": x, "dY": rng.standard_normal(shape).astype(np.float32), "s": np.array(3.0, np.float32)}, exact=True)


@pytest.mark.parametrize("op,attrs", [
    ("SigmoidGrad", {}), ("TanhGrad", {}), ("LeakyReluGrad", {"alpha": 0.1}), ("GeluGrad", {}),
    ("QuickGeluGrad", {"alpha": 1.702}), ("QuickGeluGrad", {"alpha": 1.0}),
])
def test_activation_grads(op, attrs):
    # (dY, Y) for Sigmoid/Tanh/LeakyRelu, (dY, X) for the GELUs: the kernel's value at random points
    shape = ["N", 4, 7]
    m = _model([helper.make_node(op, ["dY", "Y"], ["dX"], domain=MS, **attrs)], [_f("dY", shape), _f("Y", shape)],
               [_f("dX", shape)])
    y = rng.standard_normal((3, 4, 7)).astype(np.float32)
    y = 1 / (1 + np.exp(-y)) if op == "SigmoidGrad" else np.tanh(y) if op == "TanhGrad" else y
    _compare(m, {"dY": rng.standard_normal((3, 4, 7)).astype(np.float32), "Y": y.astype(np.float32)}, tol=1e-5)


@pytest.mark.parametrize("op,attrs", [("Gelu", {}), ("QuickGelu", {"alpha": 1.702})])
def test_fused_forward_activations(op, attrs):
    m = _model([helper.make_node(op, ["X"], ["Y"], domain=MS, **attrs)], [_f("X", ["N", 9])], [_f("Y", ["N", 9])])
    low = _compare(m, {"X": (3 * rng.standard_normal((5, 9))).astype(np.float32)}, tol=1e-5)
    assert not any(n.name.startswith(lowering.PREFIX) for n in low.graph.node)  # stays in the forward graph


@pytest.mark.parametrize("k,s,p,hw", [
    (2, 2, [0, 0, 0, 0], (8, 8)),      # non-overlapping
    (3, 2, [0, 0, 0, 0], (9, 8)),      # overlapping, a leftover column
    (3, 1, [1, 1, 1, 1], (6, 7)),      # padded, padding counted
])
def test_average_pool_grad(k, s, p, hw):
    xs, attrs = [2, 3, *hw], {"kernel_shape": [k, k], "strides": [s, s], "pads": p}
    if any(p):
        attrs["count_include_pad"] = 1
    ys = [2, 3, *((d + p[0] + p[2] - k) // s + 1 for d in hw)]
    m = _model([helper.make_node("AveragePoolGrad", ["dY"], ["X_grad"], **attrs)], [_f("dY", ys), _f("X", xs)],
               [_f("X_grad", xs)])
    _compare(m, {"dY": rng.standard_normal(ys).astype(np.float32), "X": np.zeros(xs, np.float32)}, tol=1e-5)


@pytest.mark.parametrize("node,why", [
    (helper.make_node("ConvGrad", ["dY", "X", "W"], ["dX", "dW", "dB"], domain=MS, kernel_shape=[3, 3],
                      auto_pad="SAME_UPPER"), "auto_pad"),
    (helper.make_node("SoftmaxCrossEntropyLossGrad", ["dY", "X", "y", "W"], ["dX"], domain=MS), "class weights"),
    (helper.make_node("FastGelu", ["X"], ["dX"], domain=MS), "no rule"),
    (helper.make_node("AveragePoolGrad", ["dY"], ["X_grad"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]), "count"),
])
def test_what_cannot_be_lowered_is_a_clear_error(node, why):
    m = _model([node], [_f("X", [2, 3, 5, 5]), _f("dY", [2, 3, 5, 5]), _f("W", [3, 3, 3, 3]),
                        helper.make_tensor_value_info("y", TensorProto.INT64, [2])], [_f("dX", None)])
    with pytest.raises(PlanError, match=f"cannot lower .*{node.op_type}.* of mymodel: .*{why}"):
        lowering.lower(m, "mymodel")


@pytest.mark.parametrize("name", ["lenet5", "alexnet-small", "resnet34", "googlenet"])
def test_lowered_segments_equal_the_training_kernels(name, tmp_path):
    """Whole segments of the zoo: the lowered graphs (run by any onnxruntime) give the gradients
    of the training kernels' graphs."""
    spec = models.get(name)
    n, cut = 4, spec.n_units // 2
    params = models.init_params(spec)
    x = rng.standard_normal((n, *spec.input_shape)).astype(np.float32)
    labels = rng.integers(0, spec.classes, n)
    runs = {}
    for lowered in (True, False):
        body = Segment(segments.build(spec, 1, cut, kind="body", input_grad=False, root=tmp_path,
                                               lowered=lowered))
        head = Segment(segments.build(spec, cut + 1, spec.n_units, kind="head", input_grad=True,
                                               root=tmp_path, lowered=lowered))
        y, stash = body.forward(params, x)
        loss, _, gy, head_grads = head.step(params, y, labels)
        _, body_grads = body.backward(params, stash, gy)
        runs[lowered] = (loss, {**head_grads, **body_grads})
        ops = {op for seg in (body, head) for f in seg.built.path.glob("*.onnx")
               for op in lowering.nonstandard_ops(onnx.load(str(f)))}
        assert (not ops) == lowered, ops
    (l1, g1), (l0, g0) = runs[True], runs[False]
    assert l1 == pytest.approx(l0, rel=1e-6)
    assert set(g1) == set(g0) == set(spec.param_shapes())
    for k in g0:
        np.testing.assert_allclose(g1[k], g0[k], rtol=1e-4, atol=1e-5 * float(np.abs(g0[k]).max()) + 1e-9)
