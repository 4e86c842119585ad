"""BatchNorm in training mode, against PyTorch: one worker with the whole batch trains exactly as
``model.train()``; a split normalises per worker as DistributedDataParallel does, while the running
statistics are the whole batch's; evaluation and ``model export`` use the running statistics."""

from __future__ import annotations

import numpy as np
import pytest

import byo
from hiertrain.schedule import Schedule
from hiertrain.train import models, onnxmodel
from hiertrain.train.reference import InProcessPlan, SingleProcess
from hiertrain.train.optim import OptimizerConfig
from hiertrain.train.runtime import Runtime

torch = pytest.importorskip("torch")
nn = torch.nn
pytestmark = pytest.mark.compute
LR = 0.1


def net():
    """BatchNorm2d after convolutions, BatchNorm1d after a linear layer; 7 units."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                      nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4, momentum=0.3), nn.ReLU(), nn.Flatten(),
                      nn.Linear(64, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    byo._stats(m)
    return m


@pytest.fixture(scope="module")
def runtime(tmp_path_factory):
    return Runtime(root=tmp_path_factory.mktemp("segments"))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    m = net()
    path = byo.export(m, (3, 4, 4), tmp_path_factory.mktemp("bn") / "bn.onnx", train=True)
    return m.state_dict(), path  # (exporting in training mode ran a batch through it: the file's statistics)


def _torch(state):
    m = net()
    m.load_state_dict(state)
    return m


def _batches(n, size):
    rng = np.random.default_rng(1)
    return [(rng.standard_normal((size, 3, 4, 4)).astype(np.float32) * 2 + 0.5, rng.integers(0, 3, size))
            for _ in range(n)]


def _ours(params, spec):
    """Our parameters by PyTorch's names (the file's initializers, and the batch counters)."""
    found = onnxmodel.inspect(spec.source)[1]
    out = {found.original[k]: v for k, v in params.items() if k in found.original}
    out.update({k.split(".", 1)[1]: v for k, v in params.items() if k.endswith("num_batches_tracked")})
    return out


def _close(ours, m):
    for k, v in m.state_dict().items():
        if k.endswith("num_batches_tracked"):
            continue
        ref = v.numpy()  # against the tensor's scale too: an element near 0 holds only the sums' rounding
        np.testing.assert_allclose(ours[k], ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max() + 1e-7, err_msg=k)


def test_one_worker_trains_batchnorm_exactly_as_pytorch_in_training_mode(exported, runtime, tmp_path):
    state, path = exported
    m = _torch(state)
    spec = models.get(str(path))
    assert len(spec.momentum) == 3 and spec.momentum[next(p for p in spec.momentum if p.startswith("layer4"))] == 0.3
    ours = SingleProcess(spec, optimizer=OptimizerConfig("sgd", lr=LR), runtime=runtime)
    opt = torch.optim.SGD(m.parameters(), lr=LR)
    m.train()
    for step, (x, y) in enumerate(_batches(4, 6)):
        loss = ours.step(x, y)
        opt.zero_grad()
        expected = nn.functional.cross_entropy(m(torch.from_numpy(x)), torch.from_numpy(y))
        expected.backward()
        opt.step()
        assert loss == pytest.approx(expected.item(), rel=1e-5), f"step {step}"
    mine = _ours(ours.params, spec)
    _close(mine, m)
    assert all(mine[k][0] == 4 for k in mine if k.endswith("num_batches_tracked"))

    # evaluation uses the running statistics, as model.eval() does; so does the exported file
    m.eval()
    x = _batches(1, 5)[0][0]
    expected = m(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(ours.predict(x), expected, rtol=1e-4, atol=1e-5)
    import onnxruntime as ort

    assert onnxmodel.export(path, ours.params, tmp_path / "trained.onnx") == 4 * 2 + 3 * 4  # weights, statistics
    got = ort.InferenceSession(str(tmp_path / "trained.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def _per_group_step(m, opt, x, y, schedule):
    """PyTorch with a split's statistics as DistributedDataParallel has them: each BatchNorm normalises
    each worker's samples (o's, s's, l's) on their own, wherever they are computed, and its running
    statistics move by the whole batch's."""
    cuts = [0, schedule.b_o, schedule.b_o + schedule.b_s, schedule.batch]
    h = [torch.from_numpy(x[a:b]) for a, b in zip(cuts, cuts[1:]) if b > a]  # o's, s's, l's samples
    for layer in m:
        if isinstance(layer, (nn.BatchNorm1d, nn.BatchNorm2d)):
            whole = torch.cat(h).detach()
            axes = [0, *range(2, whole.dim())]
            n = whole.numel() / whole.shape[1]
            with torch.no_grad():
                layer.running_mean.mul_(1 - layer.momentum).add_(layer.momentum * whole.mean(axes))
                layer.running_var.mul_(1 - layer.momentum).add_(layer.momentum * whole.var(axes, unbiased=False)
                                                                 * n / (n - 1))
            h = [nn.functional.batch_norm(r, None, None, layer.weight, layer.bias, True, 0.0, layer.eps) for r in h]
        else:
            h = [layer(r) for r in h]
    loss = nn.functional.cross_entropy(torch.cat(h), torch.from_numpy(y))
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.item()


@pytest.mark.parametrize("m_s,m_l", [(2, 5), (1, 7), (4, 4)])
def test_a_split_normalises_per_worker_and_keeps_the_whole_batchs_running_statistics(exported, runtime, m_s, m_l):
    state, path = exported
    m = _torch(state)
    spec = models.get(str(path))
    # four samples a worker: statistics of two amplify rounding (1e-5 of a weight in one step, 2e-4 in three)
    schedule = Schedule(mapping={"o": "cloud", "s": "device", "l": "edge"}, m_s=m_s, m_l=m_l, b_o=4, b_s=4, b_l=4)
    ours = InProcessPlan(spec, optimizer=OptimizerConfig("sgd", lr=LR), runtime=runtime)
    plan = schedule.plan(units=spec.n_units, batch=schedule.batch)
    opt = torch.optim.SGD(m.parameters(), lr=LR)
    m.train()
    for step, (x, y) in enumerate(_batches(3, 12)):
        assert ours.step(plan, x, y) == pytest.approx(_per_group_step(m, opt, x, y, schedule), rel=1e-5), step
    _close(_ours(ours.params, spec), m)


def test_a_fleets_running_statistics_are_the_whole_rounds_whatever_the_members_paths(exported, runtime):
    """The first BatchNorm's input does not depend on how the batch is split (no BatchNorm before
    it), so its running statistics after a round equal one worker's on the whole batch: the sums
    reach the edge unweighted from the device's, the edge's and the cloud's parts alike."""
    from hiertrain.train.fleetroles import Member, Round

    _, path = exported
    spec = models.get(str(path))
    one = SingleProcess(spec, optimizer=OptimizerConfig("sgd", lr=LR), runtime=runtime)
    fleet = InProcessPlan(spec, optimizer=OptimizerConfig("sgd", lr=LR), runtime=runtime, params=one.params)
    members = (Member("pi0", 3, 0, 0, 7), Member("pi1", 2, 0, 2, 4), Member("pi2", 3, 0, 7, 7), Member("pi3", 2, 0, 1, 3))
    x, y = _batches(1, 10)[0]
    fleet.step(Round(0, 0, 1, spec.n_units, members).plan(), x, y)
    one.step(x, y)
    first = next(p for p in spec.momentum if p.startswith("layer1."))
    for name in (f"{first}.running_mean", f"{first}.running_var", f"{first}.num_batches_tracked"):
        np.testing.assert_allclose(fleet.params[name], one.params[name], rtol=1e-5, atol=1e-7, err_msg=name)
    later = next(p for p in spec.momentum if p.startswith("layer8."))  # after per-member normalisation
    assert not np.allclose(fleet.params[f"{later}.running_mean"], one.params[f"{later}.running_mean"], rtol=1e-5)
