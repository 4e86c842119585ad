"""Segments: split forward/backward equals the fused gradient graph, and both equal PyTorch."""

import time

import numpy as np
import pytest

from hiertrain.train import models, segments
from hiertrain.train.runtime import Runtime
from hiertrain.errors import PlanError

pytestmark = pytest.mark.compute


@pytest.fixture(scope="module")
def runtime(tmp_path_factory):
    return Runtime(root=tmp_path_factory.mktemp("segments"))


def _inputs(spec, first, last, batch, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.random((batch, *spec.shape_at(first - 1)), dtype=np.float32)
    gy = rng.standard_normal((batch, *spec.shape_at(last))).astype(np.float32)
    return x, gy


@pytest.mark.parametrize("name,first,last", [("lenet5", 1, 5), ("lenet5", 2, 6), ("lenet5", 7, 7),
                                             ("alexnet-small", 3, 7), ("resnet34", 2, 4), ("googlenet", 3, 4)])
def test_split_forward_backward_equals_the_fused_graph(runtime, name, first, last):
    spec = models.get(name)
    params = models.init_params(spec)
    seg = runtime.segment(spec, first, last)
    x, gy = _inputs(spec, first, last, 3)
    y, stash = seg.forward(params, x)
    assert y.shape == (3, *spec.shape_at(last))
    gx, grads = seg.backward(params, stash, gy)
    fx, fgrads = seg.fused(params, x, gy)
    assert set(grads) == set(spec.param_shapes(first, last))
    for k in grads:
        np.testing.assert_allclose(grads[k], fgrads[k], rtol=1e-5, atol=1e-6)
    assert (gx is None) == (first == 1)
    if gx is not None:
        np.testing.assert_allclose(gx, fx, rtol=1e-5, atol=1e-6)


def test_segments_chain_to_the_whole_model(runtime):
    """Units 1..3 then 4..7 (head) give the same loss and gradients as the whole model at once."""
    spec = models.get("lenet5")
    params = models.init_params(spec)
    x, _ = _inputs(spec, 1, 7, 8)
    labels = np.arange(8, dtype=np.int64) % 10
    whole_loss, _, _, whole = runtime.head(spec, 1).step(params, x, labels)
    body = runtime.segment(spec, 1, 3)
    h, stash = body.forward(params, x)
    loss, _, gh, head_grads = runtime.head(spec, 4).step(params, h, labels)
    _, body_grads = body.backward(params, stash, gh)
    assert loss == pytest.approx(whole_loss, rel=1e-6)
    for k, g in {**head_grads, **body_grads}.items():
        np.testing.assert_allclose(g, whole[k], rtol=1e-4, atol=1e-6)


def test_gradients_match_pytorch(runtime):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    spec = models.get("lenet5")
    p = models.init_params(spec, 5)
    x, _ = _inputs(spec, 1, 7, 6, seed=2)
    labels = np.array([0, 3, 9, 1, 1, 7], np.int64)
    loss, logits, _, grads = runtime.head(spec, 1).step(p, x, labels)
    t = {k: torch.tensor(v, requires_grad=True) for k, v in p.items()}
    h = F.relu(F.conv2d(torch.tensor(x), t["conv1.conv.weight"], t["conv1.conv.bias"]))
    h = F.max_pool2d(h, 2)
    h = F.max_pool2d(F.relu(F.conv2d(h, t["conv2.conv.weight"], t["conv2.conv.bias"])), 2).flatten(1)
    h = F.relu(F.linear(h, t["fc1.fc.weight"], t["fc1.fc.bias"]))
    h = F.relu(F.linear(h, t["fc2.fc.weight"], t["fc2.fc.bias"]))
    out = F.linear(h, t["fc3.fc.weight"], t["fc3.fc.bias"])
    ref = F.cross_entropy(out, torch.tensor(labels))
    ref.backward()
    assert loss == pytest.approx(ref.item(), rel=1e-5)
    np.testing.assert_allclose(logits, out.detach().numpy(), rtol=1e-4, atol=1e-5)
    for k in p:
        np.testing.assert_allclose(grads[k], t[k].grad.numpy(), rtol=1e-3, atol=1e-5)


def test_artifacts_are_cached_on_disk_and_build_fast(tmp_path):
    spec = models.get("lenet5")
    t0 = time.perf_counter()
    a = segments.build(spec, 2, 5, kind="body", input_grad=True, root=tmp_path)
    first = time.perf_counter() - t0
    b = segments.build(spec, 2, 5, kind="body", input_grad=True, root=tmp_path)
    assert a.path == b.path and a.build_s == b.build_s and (a.path / "forward.onnx").is_file()
    c = segments.build(spec, 2, 6, kind="body", input_grad=True, root=tmp_path)
    assert c.path != a.path
    assert first < 5.0  # generous: the measured figure (milliseconds) is in the bench, not asserted


@pytest.mark.parametrize("args,match", [
    (dict(first=0, last=3, kind="body", input_grad=False), "not within"),
    (dict(first=4, last=3, kind="body", input_grad=True), "empty"),
    (dict(first=9, last=7, kind="head", input_grad=True), "head segment must start"),
])
def test_bad_ranges_are_refused(tmp_path, args, match):
    with pytest.raises(PlanError, match=match):
        segments.build(models.get("lenet5"), root=tmp_path, **args)


def test_a_dilated_segment_stretches_each_kernel_run_by_sleeping_the_difference(monkeypatch):
    """An emulated device's kernels (kernel_dilation F): after each ORT run of t seconds the segment
    sleeps (F - 1) t, and computes the same numbers."""
    from hiertrain.train import runtime as R

    spec = models.get("lenet5")
    params = models.init_params(spec, seed=0)
    x = np.random.default_rng(0).standard_normal((4, *spec.input_shape)).astype(np.float32)
    plain = Runtime(threads=1).segment(spec, 1, 3)
    slept: list[float] = []
    monkeypatch.setattr(R.time, "sleep", slept.append)
    dilated = Runtime(threads=1, dilation=3.0).segment(spec, 1, 3)
    mine = {k: params[k] for k in plain.built.params}
    y, _ = plain.forward(mine, x)
    assert slept == []
    y3, _ = dilated.forward(mine, x)
    np.testing.assert_array_equal(y, y3)
    assert len(slept) == 1 and slept[0] > 0  # twice the run's own seconds, which are > 0

