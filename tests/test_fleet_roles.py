"""A fleet round equals single-process SGD over every member's samples, whatever the paths."""

from __future__ import annotations

import random

import numpy as np
import pytest

from hiertrain.train import data, models
from hiertrain.errors import PlanError, ProtocolError
from hiertrain.train.fleetroles import Member, Round
from hiertrain.train.reference import InProcessPlan, SingleProcess
from hiertrain.train.optim import OptimizerConfig
from hiertrain.train.runtime import Runtime

pytestmark = pytest.mark.compute
U = 7  # LeNet-5's units


@pytest.fixture(scope="module")
def runtime(tmp_path_factory):
    return Runtime(root=tmp_path_factory.mktemp("segments"))


def shards(spec, names):
    return {n: data.synthetic(spec.input_shape, spec.classes, n=64, seed=10 + i) for i, n in enumerate(names)}


def assert_round_is_sgd(runtime, paths, optimizer, steps=3):
    spec = models.get("lenet5")
    names = [f"pi{i}" for i in range(len(paths))]
    ds = shards(spec, names)
    ref = SingleProcess(spec, optimizer=optimizer, runtime=runtime)
    fleet = InProcessPlan(spec, optimizer=optimizer, runtime=runtime, params=ref.params)
    offsets = dict.fromkeys(names, 0)
    for step in range(steps):
        members = tuple(Member(n, 3 + i, offsets[n], m, k) for i, (n, (m, k)) in enumerate(zip(names, paths)))
        rnd = Round(step, step, 1, U, members)
        batches = {mb.name: ds[mb.name].take_raw(np.arange(mb.offset, mb.offset + mb.n)) for mb in members}
        x = np.concatenate([data.normalize(batches[n][0]) for n in names])
        y = np.concatenate([batches[n][1] for n in names])
        raw = np.concatenate([batches[n][0] for n in names])
        expected, got = ref.step(x, y), fleet.step(rnd.plan(), raw, y)
        assert got == pytest.approx(expected, rel=1e-4)
        for mb in members:
            offsets[mb.name] += mb.n
    for k in ref.params:
        np.testing.assert_allclose(fleet.params[k], ref.params[k], rtol=0,
                                   atol=1e-4 * np.abs(ref.params[k]).max() + 1e-7)


CORNERS = {
    "edgesplit": [(1, U), (3, U), (5, U)],
    "all-local": [(U, U), (U, U), (U, U)],
    "raw-up-all-edge": [(0, U), (0, U), (2, U)],
    "all-cloud": [(0, 0), (1, 1), (0, 0)],
    "every-tier": [(2, 4), (1, 5), (U, U)],
    "edge-relays": [(3, 3), (3, 6), (0, 2)],
}


@pytest.mark.parametrize("corner", CORNERS)
def test_a_fleet_round_is_one_sgd_step_over_all_members_samples(runtime, corner):
    assert_round_is_sgd(runtime, CORNERS[corner], OptimizerConfig("sgd", lr=0.05))


def test_random_paths_with_adamw(runtime):
    rng = random.Random(4)
    for _ in range(4):
        paths = []
        for _ in range(rng.randint(1, 4)):
            m = rng.randint(0, U)
            paths.append((m, rng.randint(m, U)))
        assert_round_is_sgd(runtime, paths, OptimizerConfig("adamw", lr=1e-3, weight_decay=0.01), steps=2)


def test_a_round_travels_as_meta_and_bad_ones_are_refused():
    rnd = Round(7, 5, 2, U, (Member("pi3", 4, 40, 1, 3), Member("jetson", 8, 0, 0, U)))
    assert Round.from_meta(rnd.to_meta()) == rnd
    assert rnd.batch == 12 and rnd.kappa == 3 and rnd.weight(4) == pytest.approx(1 / 3)
    assert [rnd.loss_at(mb) for mb in rnd.members] == ["cloud", "edge"]
    assert rnd.cloud_groups() == [(3, (rnd.members[0],))]
    with pytest.raises(PlanError, match="distinct"):
        Round(0, 0, 1, U, (Member("a", 1, 0, 1, 1), Member("a", 1, 0, 1, 1)))
    with pytest.raises(PlanError, match="does not fit"):
        Round(0, 0, 1, U, (Member("a", 1, 0, 3, 2),))
    with pytest.raises(ProtocolError, match="not a fleet round"):  # from the wire: refused, not a plan
        Round.from_meta({**rnd.to_meta(), "members_m": [1]})
    with pytest.raises(ProtocolError, match="not a fleet round: member a: n = 0"):
        Round.from_meta({**rnd.to_meta(), "members_name": ["a"], "members_n": [0], "members_offset": [0],
                         "members_m": [1], "members_k": [1]})
