"""Checkpoints collected in one place over real Mosquitto: stored with the newest N kept, fetched
back, and every bad push or request refused with a reason while the collector keeps going."""

from __future__ import annotations

import time

import numpy as np
import pytest

from hiertrain.train import checkpoint, collect, models
from hiertrain.train.checkpoint import Checkpoint
from hiertrain.errors import PlanError
from hiertrain.net.validate import max_message_bytes, validator
from hiertrain.net.wire import Message

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
    partial = state(5)  # one parameter of it: a part (as a chain stage sends), never written alone
    first = next(iter(partial.params))
    cloud.transport.send(Message(collect.KIND, "t", "cloud", "edge", 5, 0, {first: partial.params[first]}, 1,
                                 {"op": "push", **partial.meta()}))
    cloud.transport.send(Message(collect.KIND, "t", "cloud", "edge", 6, 0, {}, 1, {"op": "delete"}))
    cloud.transport.send(Message(collect.KIND, "t", "cloud", "edge", 7, 0, {}, 1, {"op": "push", "iteration": -1,
                                                                                 "optimizer_step": 0}))
    cloud.push(state(8), "edge", version=1)  # a good one after them all
    assert wait_for(lambda: stored == [8]), (stored, caplog.text)
    for why in ("does not collect checkpoints", "unknown checkpoint op 'delete'", "malformed checkpoint message"):
        assert why in caplog.text, caplog.text
    assert checkpoint.iterations(ck) == [8]  # not the part of 5


def part(ck: Checkpoint, names) -> Checkpoint:
    return Checkpoint(ck.iteration, {k: ck.params[k] for k in names},
                      {k: v for k, v in ck.moments.items() if k[2:] in names}, ck.optimizer_step, ck.schedule)


def test_a_chains_parts_are_written_and_held_once_they_cover_the_model(pair):
    """A layer chain's stages each push (and replicate) their own units: the collector writes an
    iteration's checkpoint, and the device holds its replica, only once the parts are whole."""
    (edge, cloud), stored, ck = pair
    names = list(SPEC.param_shapes())
    whole = state(11)
    cloud.push(part(whole, names[:3]), "edge", version=1)  # the cloud's stage
    assert not wait_for(lambda: stored, timeout=1)  # a part alone is never written
    edge.store_part(part(whole, names[3:]))  # the collector's own stage
    assert wait_for(lambda: stored == [11]), stored
    got = checkpoint.load(ck, names)
    assert got.iteration == 11 and all(np.array_equal(got.params[k], whole.params[k]) for k in names)
    assert set(got.moments) == set(whole.moments)
    edge.hold_part(part(state(15), names[3:]))  # the device's own stage
    assert edge.held is None
    cloud.push(part(state(15), names[:3]), "edge", version=1, op="replica")
    assert wait_for(lambda: edge.held is not None and edge.held.iteration == 15)


def test_a_push_behind_what_the_collector_holds_sets_the_other_runs_checkpoints_aside(pair, caplog):
    """A new run (its coordinator or worker_o started afresh) pushes iteration 4 to a collector that
    holds an earlier run's 9 and 14: those go aside, so that nobody resumes the new run from them."""
    (edge, cloud), stored, ck = pair
    for it in (9, 14):
        cloud.push(state(it), "edge", version=1)
    assert wait_for(lambda: stored == [9, 14]), stored
    cloud.push(state(4), "edge", version=1)
    assert wait_for(lambda: stored == [9, 14, 4]), stored
    assert checkpoint.iterations(ck) == [4]
    (aside,) = [p for p in ck.iterdir() if p.name.startswith("superseded-")]
    assert checkpoint.iterations(aside) == [9, 14]
    assert "behind those held: they are another run's" in caplog.text
    assert cloud.fetch(4, "edge", timeout=10).iteration == 4
