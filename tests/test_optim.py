import numpy as np
import pytest

from hiertrain.errors import PlanError
from hiertrain.train.optim import Optimizer, OptimizerConfig

pytestmark = pytest.mark.compute
SHAPES = {"a": (3, 4), "b": (5,)}


@pytest.mark.parametrize("config", [OptimizerConfig("sgd", lr=0.1),
                                    OptimizerConfig("adamw", lr=0.01, weight_decay=0.05, beta1=0.8, beta2=0.95)])
def test_ort_optimizer_steps_equal_pytorch(config):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    params = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
    t = {k: torch.tensor(v.copy(), requires_grad=True) for k, v in params.items()}
    ref = (torch.optim.SGD(list(t.values()), lr=config.lr) if config.kind == "sgd" else
           torch.optim.AdamW(list(t.values()), lr=config.lr, betas=(config.beta1, config.beta2), eps=config.eps,
                             weight_decay=config.weight_decay))
    opt = Optimizer(config, SHAPES)
    for _ in range(5):
        grads = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
        params = opt.step(params, grads)
        for k, p in t.items():
            p.grad = torch.tensor(grads[k])
        ref.step()
    for k in SHAPES:
        np.testing.assert_allclose(params[k], t[k].detach().numpy(), rtol=1e-5, atol=1e-6)


def test_missing_gradients_count_as_zero():
    opt = Optimizer(OptimizerConfig("sgd", lr=0.5), SHAPES)
    params = {k: np.ones(s, np.float32) for k, s in SHAPES.items()}
    new = opt.step(params, {"a": np.ones(SHAPES["a"], np.float32)})
    assert np.all(new["a"] == 0.5) and np.all(new["b"] == 1.0)


def test_bad_optimizer_settings():
    with pytest.raises(PlanError, match="unknown optimizer 'adam'"):
        OptimizerConfig("adam")
    with pytest.raises(PlanError, match="learning rate"):
        OptimizerConfig("sgd", lr=0)
