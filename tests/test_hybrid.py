"""The transparency test: HierTrain's hybrid iteration equals single-process ORT training."""

import itertools

import numpy as np
import pytest

from hiertrain.train import data, models
from hiertrain.errors import PlanError
from hiertrain.train.hybrid import InProcessHybrid, SingleProcess, split_batch
from hiertrain.train.optim import OptimizerConfig
from hiertrain.schedule import Schedule
from hiertrain.train.segments import Runtime

pytestmark = pytest.mark.unit
TIERS = ("device", "edge", "cloud")
MAPPINGS = [dict(zip("osl", p)) for p in itertools.permutations(TIERS)]


@pytest.fixture(scope="module")
def runtime(tmp_path_factory):
    return Runtime(root=tmp_path_factory.mktemp("segments"))


def batches(spec, batch, n):
    ds = data.synthetic(spec.input_shape, spec.classes, n=512, seed=1)
    return [ds.batch(i, batch) for i in range(n)]


def global_rel(a, b):
    return float(np.sqrt(sum(np.sum((a[k] - b[k]) ** 2) for k in b) / sum(np.sum(b[k] ** 2) for k in b)))


def assert_transparent(spec, schedule, optimizer, runtime, iterations):
    bs = batches(spec, schedule.batch, iterations)
    ref = SingleProcess(spec, optimizer=optimizer, runtime=runtime)
    hyb = InProcessHybrid(spec, schedule, optimizer=optimizer, runtime=runtime)
    for x, y in bs:
        expected, got = ref.step(x, y), hyb.step(x, y)
        assert got == pytest.approx(expected, rel=1e-4)
    assert global_rel(hyb.params, ref.params) < 1e-4
    for k in ref.params:  # and tensor by tensor, against the tensor's scale
        np.testing.assert_allclose(hyb.params[k], ref.params[k], rtol=0, atol=1e-4 * np.abs(ref.params[k]).max() + 1e-7)


CORNERS = {
    "three-way": dict(m_s=2, m_l=5, b_o=4, b_s=4, b_l=4),
    "m_s=0": dict(m_s=0, m_l=3, b_o=6, b_s=0, b_l=6),
    "m_s=m_l": dict(m_s=4, m_l=4, b_o=4, b_s=4, b_l=4),
    "m_l=N": dict(m_s=1, m_l=7, b_o=4, b_s=4, b_l=4),
    "b_o=0": dict(m_s=2, m_l=6, b_o=0, b_s=6, b_l=6),
    "b_s=0": dict(m_s=3, m_l=5, b_o=8, b_s=0, b_l=4),
    "all-o": dict(m_s=0, m_l=0, b_o=12, b_s=0, b_l=0),
}


@pytest.mark.parametrize("optimizer", [OptimizerConfig("sgd", lr=0.05), OptimizerConfig("adamw", lr=1e-3, weight_decay=0.01)],
                         ids=["sgd", "adamw"])
@pytest.mark.parametrize("corner", CORNERS)
def test_lenet5_hybrid_equals_single_process_over_50_iterations(runtime, corner, optimizer):
    spec = models.get("lenet5")
    schedule = Schedule(mapping=MAPPINGS[0], **CORNERS[corner])
    assert_transparent(spec, schedule, optimizer, runtime, 50)


@pytest.mark.parametrize("mapping", MAPPINGS, ids=lambda m: "o={o},s={s},l={l}".format(**m))
def test_lenet5_every_mapping(runtime, mapping):
    schedule = Schedule(mapping=mapping, **CORNERS["three-way"])
    assert_transparent(models.get("lenet5"), schedule, OptimizerConfig("sgd", lr=0.05), runtime, 50)


def assert_transparent_each_step(spec, schedule, optimizer, runtime, iterations):
    """Along the hybrid's own trajectory, every iteration's loss and update equal single-process
    training started from the same weights (and optimizer state).

    AlexNet's training is chaotic at the rounding level: single-process training whose weights
    are perturbed by one ulp drifts past 1e-4 within ~10 iterations (measured, see the issue
    note), so comparing two 50-iteration trajectories tests the hardware's rounding, not us.
    Comparing step by step tests every iteration exactly and does not compound.
    """
    hyb = InProcessHybrid(spec, schedule, optimizer=optimizer, runtime=runtime)
    for x, y in batches(spec, schedule.batch, iterations):
        ref = SingleProcess(spec, optimizer=optimizer, runtime=runtime, params=hyb.params)
        ref.optimizer.step_count, ref.optimizer.moments = hyb.owner.optimizer.step_count, dict(hyb.owner.optimizer.moments)
        expected, got = ref.step(x, y), hyb.step(x, y)
        assert got == pytest.approx(expected, rel=1e-5)
        assert global_rel(hyb.params, ref.params) < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", [OptimizerConfig("sgd", lr=0.01), OptimizerConfig("adamw", lr=1e-3)], ids=["sgd", "adamw"])
@pytest.mark.parametrize("corner", ["three-way", "m_s=0", "m_s=m_l", "m_l=N", "b_o=0", "b_s=0"])
def test_alexnet_small_every_iteration_equals_single_process(runtime, corner, optimizer):
    spec = models.get("alexnet-small")
    schedule = Schedule(mapping=MAPPINGS[3], **{**CORNERS[corner], **({"m_l": 8} if corner == "m_l=N" else {})})
    assert_transparent_each_step(spec, schedule, optimizer, runtime, 50)


@pytest.mark.slow
def test_alexnet_full_size_three_way_split(runtime):
    spec = models.get("alexnet")
    schedule = Schedule(mapping=MAPPINGS[1], m_s=2, m_l=6, b_o=2, b_s=2, b_l=2)
    assert_transparent_each_step(spec, schedule, OptimizerConfig("sgd", lr=0.01), runtime, 3)


def test_a_split_that_does_not_sum_to_the_batch_is_refused(runtime):
    schedule = Schedule(mapping=MAPPINGS[0], **CORNERS["three-way"])
    with pytest.raises(ValueError, match="batch of 10 samples for a schedule of B = 12"):
        split_batch(schedule, np.zeros((10, 3, 32, 32), np.float32))
    with pytest.raises(PlanError, match="beyond the model's 7 units"):
        InProcessHybrid(models.get("lenet5"), Schedule(mapping=MAPPINGS[0], m_s=2, m_l=9, b_o=4, b_s=4, b_l=4),
                        runtime=runtime)
