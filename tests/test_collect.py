"""Checkpoints collected in one place over real Mosquitto: stored with the newest N kept, fetched
back, and every bad push or request refused with a reason while the collector keeps going."""

from __future__ import annotations

import time

import numpy as np
import pytest

from hiertrain import checkpoint, collect, models
from hiertrain.checkpoint import Checkpoint
from hiertrain.errors import PlanError
from hiertrain.validate import max_message_bytes, validator
from hiertrain.wire import Message

pytestmark = pytest.mark.integration
SPEC = models.get("lenet5")


def state(iteration: int) -> Checkpoint:
    params = {k: np.full(v, iteration, np.float32) for k, v in SPEC.param_shapes().items()}
    return Checkpoint(iteration, params, {f"m:{k}": v * 0.5 for k, v in params.items()}, iteration + 1,
                      {"version": 1})


@pytest.fixture
def pair(mosquitto, connect, tmp_path):
    """The edge collects into tmp_path/ck (the newest 2 kept); the cloud plays worker_o."""
    opts = dict(validator=validator(SPEC), max_message_bytes=max_message_bytes(SPEC, 16))
    edge, cloud = connect("edge", **opts), connect("cloud", **opts)
    stored: list[int] = []
    keepers = [collect.Keeper(edge, SPEC, tmp_path / "ck", keep=2, collect=True, on_stored=stored.append).start(),
               collect.Keeper(cloud, SPEC, None, keep=3, collect=False, on_stored=stored.append).start()]
    yield keepers, stored, tmp_path / "ck"
    for k in keepers:
        k.stop(5)


def wait_for(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.02)
    return cond()


def test_pushed_checkpoints_are_kept_newest_n_and_fetched_back_exactly(pair):
    (edge, cloud), stored, ck = pair
    for it in (4, 9, 14):
        cloud.push(state(it), "edge", version=1)
    assert wait_for(lambda: stored == [4, 9, 14]), stored
    assert checkpoint.iterations(ck) == [9, 14]
    got = cloud.fetch(9, "edge", timeout=10)
    want = state(9)
    assert got.iteration == 9 and got.optimizer_step == 10 and got.schedule == {"version": 1}
    assert all(np.array_equal(got.params[k], want.params[k]) for k in want.params)
    assert all(np.array_equal(got.moments[k], want.moments[k]) for k in want.moments)
    with pytest.raises(PlanError, match="edge has no checkpoint of iteration 4"):  # pruned
        cloud.fetch(4, "edge", timeout=10)


def test_bad_pushes_and_requests_are_refused_and_the_collector_goes_on(pair, caplog):
    (edge, cloud), stored, ck = pair
    edge.push(state(3), "cloud", version=1)  # the cloud does not collect
    partial = state(5)
    first = next(iter(partial.params))
    cloud.transport.send(Message(collect.KIND, "t", "cloud", "edge", 5, 0, {first: partial.params[first]}, 1,
                                 {"op": "push", **partial.meta()}))
    cloud.transport.send(Message(collect.KIND, "t", "cloud", "edge", 6, 0, {}, 1, {"op": "delete"}))
    cloud.transport.send(Message(collect.KIND, "t", "cloud", "edge", 7, 0, {}, 1, {"op": "push", "iteration": -1,
                                                                                 "optimizer_step": 0}))
    cloud.push(state(8), "edge", version=1)  # a good one after them all
    assert wait_for(lambda: stored == [8]), (stored, caplog.text)
    for why in ("does not collect checkpoints", "lacks parameters", "unknown checkpoint op 'delete'",
                "malformed checkpoint message"):
        assert why in caplog.text, caplog.text
    assert checkpoint.iterations(ck) == [8]
