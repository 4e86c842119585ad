import math

import numpy as np
import onnx
import pytest

from hiertrain.train import models
from hiertrain.errors import PlanError


UNITS = {"lenet5": 7, "alexnet": 8, "alexnet-small": 8, "vgg16": 16, "vgg19": 19, "resnet34": 18, "googlenet": 12}


@pytest.mark.parametrize("name", sorted(models.MODELS))
def test_every_model_is_a_chain_of_named_units(name):
    spec = models.get(name)
    assert spec.n_units == UNITS[name]
    shapes, params, momenta = spec.layout
    assert momenta == {}  # the zoo has no BatchNorm
    assert shapes[0] == spec.input_shape and shapes[-1] == (spec.classes,)
    for i, unit_params in enumerate(params, 1):
        for p in unit_params:
            assert spec.unit_index(p) == i  # the name says which unit a weight belongs to
    assert all(b > 0 for b in spec.output_bytes())
    assert sum(spec.param_bytes()) == 4 * sum(math.prod(s) for s in spec.param_shapes().values())


@pytest.mark.parametrize("name,first,last", [("lenet5", 1, 7), ("lenet5", 3, 5), ("resnet34", 2, 9), ("googlenet", 3, 4)])
def test_segment_graphs_are_valid_onnx_for_ort_1_19(name, first, last):
    spec = models.get(name)
    model, params = models.segment_graph(spec, first, last)
    onnx.checker.check_model(model)
    assert model.ir_version <= 10 and model.opset_import[0].version <= 17
    assert set(params) == set(spec.param_shapes(first, last))


def test_lenet5_sizes_match_the_paper_architecture():
    spec = models.get("lenet5")
    assert [s for s in spec.layout[0]] == [(3, 32, 32), (6, 28, 28), (6, 14, 14), (16, 10, 10), (16, 5, 5), (120,), (84,), (10,)]
    assert spec.output_bytes()[0] == 6 * 28 * 28 * 4 and spec.sample_bytes() == 3 * 32 * 32 * 4


def test_init_is_deterministic_per_name():
    spec = models.get("lenet5")
    a, b = models.init_params(spec, 3), models.init_params(spec, 3)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["conv1.conv.weight"], models.init_params(spec, 4)["conv1.conv.weight"])


@pytest.mark.parametrize("call,match", [
    (lambda: models.get("mobilenet"), "unknown model 'mobilenet'"),
    (lambda: models.segment_graph(models.get("lenet5"), 0, 3), "not within 1..7"),
    (lambda: models.segment_graph(models.get("lenet5"), 3, 9), "not within 1..7"),
    (lambda: models.get("lenet5").unit_index("conv9.w"), "belongs to no unit"),
])
def test_bad_arguments_raise_clear_errors(call, match):
    with pytest.raises(PlanError, match=match):
        call()
