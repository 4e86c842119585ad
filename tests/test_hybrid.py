"""The transparency test: any plan's step (HierTrain's O/S/L groups, a layer chain) run by the one
in-process reference equals single-process ORT training; a fleet's is in test_fleet_roles."""

import itertools

import numpy as np
import pytest

from hiertrain.train import data, models
from hiertrain.errors import PlanError
from hiertrain.train.reference import InProcessPlan, SingleProcess, split
from hiertrain.train.optim import OptimizerConfig
from hiertrain.plan import Stage
from hiertrain.schedule import Schedule
from hiertrain.train.runtime import Runtime

pytestmark = pytest.mark.compute
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


def plan_of(spec, schedule, batch=None):
    return schedule.check(n_units=spec.n_units).plan(units=spec.n_units, batch=batch or schedule.batch)


def assert_transparent(spec, schedule, optimizer, runtime, iterations, batch=None):
    plan = plan_of(spec, schedule, batch)
    bs = batches(spec, plan.batch, iterations)
    ref = SingleProcess(spec, optimizer=optimizer, runtime=runtime)
    hyb = InProcessPlan(spec, optimizer=optimizer, runtime=runtime)
    for x, y in bs:
        expected, got = ref.step(x, y), hyb.step(plan, x, y)
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


CHAINS = {
    "two-stage": (("device", 1, 3), ("cloud", 4, 7)),
    "three-stage": (("device", 1, 2), ("edge", 3, 5), ("cloud", 6, 7)),
}


@pytest.mark.parametrize("chain", CHAINS)
def test_lenet5_layer_chain_equals_single_process(runtime, chain):
    stages = CHAINS[chain]
    schedule = Schedule(mapping={"o": "cloud", "s": "device", "l": "edge"}, m_s=0, m_l=0, b_o=12, b_s=0, b_l=0,
                        policy="jointdnn+", chain=tuple(Stage(*st) for st in stages))
    assert_transparent(models.get("lenet5"), schedule, OptimizerConfig("adamw", lr=1e-3, weight_decay=0.01), runtime,
                       20, batch=12)


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
    plan = plan_of(spec, schedule)
    hyb = InProcessPlan(spec, optimizer=optimizer, runtime=runtime)
    for x, y in batches(spec, schedule.batch, iterations):
        ref = SingleProcess(spec, optimizer=optimizer, runtime=runtime, params=hyb.params)
        ref.optimizer.step_count, ref.optimizer.moments = hyb.optimizer.step_count, dict(hyb.optimizer.moments)
        expected, got = ref.step(x, y), hyb.step(plan, x, y)
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
    spec = models.get("lenet5")
    plan = plan_of(spec, Schedule(mapping=MAPPINGS[0], **CORNERS["three-way"]))
    with pytest.raises(ValueError, match="10 samples and 10 labels for a plan of B = 12"):
        split(plan, np.zeros((10, 3, 32, 32), np.float32), np.zeros(10, np.int64))
    with pytest.raises(PlanError, match="beyond the model's 7 units"):
        plan_of(spec, Schedule(mapping=MAPPINGS[0], m_s=2, m_l=9, b_o=4, b_s=4, b_l=4))
