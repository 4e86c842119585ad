"""The architectures of PyTorch's model libraries (written after their published code, as ``bench
families`` trains them), exported with BatchNorm in training mode: each imports and its steps equal
PyTorch's own training in ``model.train()``, running statistics included."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest

from hiertrain.train import models, onnxmodel
from hiertrain.train.reference import SingleProcess
from hiertrain.train.optim import OptimizerConfig
from hiertrain.train.runtime import Runtime

torch = pytest.importorskip("torch")
from hiertrain.bench.families import RATES, RECIPES, export, families  # noqa: E402 (needs torch)

pytestmark = pytest.mark.compute
FAMILIES = families(1, 10)


@pytest.fixture(scope="module")
def runtime(tmp_path_factory):
    return Runtime(root=tmp_path_factory.mktemp("segments"))


def test_every_family_has_a_recipe():
    assert list(RECIPES) == list(FAMILIES)


@pytest.mark.parametrize("name", FAMILIES)
def test_a_family_trains_as_pytorch_trains_it_in_training_mode(name, runtime):
    torch.manual_seed(0)
    m = FAMILIES[name]()
    path = export(m, (1, 16, 16), Path(tempfile.mkdtemp()) / f"{name}.onnx")  # (runs a batch: the file's statistics)
    spec = models.get(str(path))
    found = onnxmodel.inspect(path)[1]
    # the optimizer bench families trains it with; AdamW's eps above rounding noise: a ViT's key bias has
    # no gradient in exact arithmetic (softmax ignores a shift shared by all keys), and AdamW would turn
    # the 1e-9 of rounding each framework leaves there into a step of lr, in a direction of its own
    kind = RECIPES[name]
    ours = SingleProcess(spec, optimizer=OptimizerConfig(kind, lr=RATES[kind], eps=1e-4), runtime=runtime)
    opt = (torch.optim.SGD(m.parameters(), lr=RATES[kind]) if kind == "sgd" else
           torch.optim.AdamW(m.parameters(), lr=RATES[kind], eps=1e-4, weight_decay=0.0))
    rng = np.random.default_rng(0)
    for step in range(3):
        x, y = rng.standard_normal((8, 1, 16, 16)).astype(np.float32), rng.integers(0, 10, 8)
        loss = ours.step(x, y)
        opt.zero_grad()
        expected = torch.nn.functional.cross_entropy(m(torch.from_numpy(x)), torch.from_numpy(y))
        expected.backward()
        opt.step()
        assert loss == pytest.approx(expected.item(), rel=1e-4), f"step {step}"
    state = m.state_dict()
    for ours_name, file_name in found.original.items():
        np.testing.assert_allclose(ours.params[ours_name], state[file_name].numpy(), rtol=1e-4, atol=1e-6,
                                   err_msg=file_name)
    m.eval()
    x = rng.standard_normal((4, 1, 16, 16)).astype(np.float32)
    np.testing.assert_allclose(ours.predict(x), m(torch.from_numpy(x)).detach().numpy(), rtol=1e-3, atol=1e-4)
