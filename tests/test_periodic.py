"""Periodic sync's pieces (hiertrain.train.periodic): who holds which rows, the local gradients, the
window's average by hand, a pending step rolled back, the plan model's kept copies, the cost model's
weight traffic per K steps, the config; and, in one process, K = 1 equal to exact mode."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from hiertrain import tierconfig
from hiertrain.errors import ConfigError, PlanError, ProtocolError
from hiertrain.exchanges import exchanges
from hiertrain.plan import Plan, for_fleet
from hiertrain.planner import fleet as F
from hiertrain.train import data, models, periodic
from hiertrain.train.fleetroles import Member, Round
from hiertrain.train.optim import Optimizer, OptimizerConfig

U = 7  # LeNet-5
MEMBERS = (Member("pi1", 4, 0, 2, 5), Member("pi2", 6, 0, 0, U), Member("pi3", 3, 0, U, U))


def test_each_copy_of_a_unit_is_trained_on_the_rows_of_those_who_hold_it():
    rows = periodic.rows_per_unit(MEMBERS, U)
    assert list(rows["pi1"]) == [0, 4, 4, 0, 0, 0, 0, 0]
    assert list(rows["pi3"]) == [0, 3, 3, 3, 3, 3, 3, 3]
    assert list(rows[periodic.SHARED]) == [0, 6, 6, 10, 10, 10, 10, 10]  # pi2's raw rows, then pi1's
    assert "pi2" not in rows                                               # (m = 0: it holds nothing)


def test_a_holder_steps_on_the_mean_loss_over_its_own_rows_and_a_unit_it_saw_none_of_stays():
    spec = models.get("lenet5")
    names = {u: list(spec.param_shapes(u, u)) for u in range(1, U + 1)}
    grads = {n: np.ones(s, np.float32) for n, s in spec.param_shapes().items()}
    rows = np.array([0, 0, 6, 10, 10, 10, 10, 13])
    out, frozen = periodic.local_grads(spec, grads, rows, 13)
    assert frozen == frozenset(names[1])
    assert all(n not in out for n in names[1])
    assert all(np.allclose(out[n], 13 / 6) for n in names[2])
    assert all(np.allclose(out[n], 1.0) for n in names[7])


def test_the_window_averages_each_unit_over_its_copies_weighted_by_their_rows():
    spec = models.get("lenet5")
    shapes = spec.param_shapes()
    u1, u3 = list(spec.param_shapes(1, 1)), list(spec.param_shapes(3, 3))
    w = periodic.Window()
    w.add(MEMBERS, U, fresh=["pi1", "pi3"])
    assert not w.due(3, 1, 10) and w.due(3, 1, 2)  # the second step of three: no; the run's last: yes
    w.add(MEMBERS, U, fresh=[])
    assert w.steps == 2 and w.due(3, 2, 10)
    shared = {n: np.full(s, 1.0, np.float32) for n, s in shapes.items()}
    shared.update({f"m:{n}": np.full(s, 1.0, np.float32) for n, s in shapes.items()})
    pi1 = {n: np.full(s, 2.0, np.float32) for n, s in spec.param_shapes(1, 2).items()}
    pi1.update({f"m:{n}": np.full(s, 5.0, np.float32) for n, s in spec.param_shapes(1, 2).items()})
    pi3 = {n: np.full(s, 4.0, np.float32) for n, s in shapes.items()}
    pi3.update({f"m:{n}": np.full(s, 3.0, np.float32) for n, s in shapes.items()})
    avg = w.average(spec, shared, {"pi1": pi1, "pi3": pi3})
    # unit 1: edge 12 rows of 1.0, pi1 8 of 2.0, pi3 6 of 4.0; unit 3: edge 20 of 1.0, pi3 6 of 4.0
    assert np.allclose(avg[u1[0]], (12 * 1 + 8 * 2 + 6 * 4) / 26)
    assert np.allclose(avg[f"m:{u1[0]}"], (12 * 1 + 8 * 5 + 6 * 3) / 26)
    assert np.allclose(avg[u3[0]], (20 * 1 + 6 * 4) / 26)
    assert w.steps == 0 and w.rows == {}
    w.add(MEMBERS, U, fresh=[])
    w.add(MEMBERS, U, fresh=["pi1"])  # a fresh copy: what pi1 trained before it is gone
    assert list(w.rows["pi1"][:3]) == [0, 4, 4] and list(w.rows["pi3"][:2]) == [0, 6]


def test_a_copy_that_is_not_whole_is_refused_naming_its_sender():
    spec = models.get("lenet5")
    whole = {n: np.zeros(s, np.float32) for n, s in spec.param_shapes(1, 3).items()}
    periodic.check_copy(spec, "pi1", 3, whole, "sgd")
    with pytest.raises(ProtocolError, match="pi1 sent a copy of units 1..3 without") as exc:
        periodic.check_copy(spec, "pi1", 3, whole, "adamw")  # its moments missing
    assert exc.value.sender == "pi1"
    with pytest.raises(ProtocolError, match="or with"):
        periodic.check_copy(spec, "pi1", 1, whole, "sgd")
    with pytest.raises(ProtocolError, match="not an optimizer"):
        periodic.opt_from(["rmsprop", 0.1, 0.9, 0.99, 1e-8, 0, 3])
    assert periodic.opt_from(periodic.opt_meta(OptimizerConfig("adamw", 1e-3), 7)) == (OptimizerConfig("adamw", 1e-3), 7)


def test_a_kept_copy_is_in_the_plan_the_exchanges_and_the_round():
    plan = for_fleet([("pi1", 4, 2, 5), ("pi2", 6, 0, U), ("pi3", 3, U, U)], units=U, keep=True)
    assert plan.keeps == {"pi1", "pi3"}
    assert Plan.from_json(plan.to_json()) == plan
    assert "pi1, pi3 keep their own copies" in plan.describe()[-1]
    assert {x.kind for x in exchanges(plan, "pi1")} == {"act", "grad"}      # no weights, no gradients
    assert [(x.op, x.kind, x.layer) for x in exchanges(plan, "pi3")] == [("send", "wgrad", U)]  # its loss alone
    assert not any(x.peer in ("pi1", "pi3") and x.kind == "weights" for x in exchanges(plan, "edge"))
    with pytest.raises(PlanError, match="keeps a copy"):
        replace(plan, keeps=frozenset({"edge"}))
    rnd = Round(3, 2, 1, U, MEMBERS, every=4, upload=True)
    assert Round.from_meta(rnd.to_meta()) == rnd and rnd.plan().keeps == {"pi1", "pi3"}
    assert Round(3, 2, 1, U, MEMBERS).plan().keeps == frozenset()
    with pytest.raises(ProtocolError, match="not a fleet round"):
        Round.from_meta({**rnd.to_meta(), "sync_upload": "yes"})


def test_the_cost_model_charges_a_devices_weights_once_every_k_steps_and_picks_k_within_the_bound():
    import random

    fleet = F.random_fleet(random.Random(3), 6, 5)
    d = fleet.devices[0]
    up1, down1 = F.device_bytes(fleet, d, 3)
    up4, down4 = F.device_bytes(replace(fleet, sync_every=4), d, 3)
    params = sum(fleet.param_bytes[:3])
    assert up1 - up4 == pytest.approx(params * 3 / 4) and down1 - down4 == pytest.approx(params * 3 / 4)
    local = [F.Path(fleet.units, fleet.units)] * len(fleet.devices)  # weights dominate: every device trains all
    times = [F.iteration_time(replace(fleet, sync_every=k), local)[0] for k in (1, 2, 8, 32)]
    assert times == sorted(times, reverse=True) and times[0] > times[-1]
    k = F.every_within(fleet, local, 32)
    assert 1 < k <= 32
    assert F.iteration_time(replace(fleet, sync_every=k), local)[0] <= 1.02 * times[-1]
    assert F.iteration_time(replace(fleet, sync_every=k - 1), local)[0] > 1.02 * times[-1]
    raw = [F.Path(0, fleet.units) if not dv.private else F.Path(1, fleet.units) for dv in fleet.devices]
    assert F.every_within(replace(fleet, param_bytes=(1.0,) * fleet.units), raw, 32) == 1  # weights cost nothing
    with pytest.raises(PlanError, match="sync_every"):
        replace(fleet, sync_every=0)


@pytest.mark.parametrize("value,want", [('"exact"', periodic.Sync()), ("{ every = 4 }", periodic.Sync(every=4)),
                                        ("{ up_to = 16 }", periodic.Sync(up_to=16))])
def test_fleet_sync_is_read_from_the_edges_config(tmp_path, broker_dir, value, want):
    cfg = tmp_path / "edge.toml"
    (tmp_path / "fleet.toml").write_text("")
    cfg.write_text(f'job = "t"\n[broker]\ncredentials = "{broker_dir.credentials_file("edge")}"\n'
                   f'[fleet]\nfile = "fleet.toml"\nsync = {value}\n')
    assert tierconfig.load("edge", cfg).fleet_sync == want


@pytest.mark.parametrize("value", ['"often"', "{ every = 0 }", "{ every = 2, up_to = 3 }", "{ each = 2 }",
                                   "{ every = true }", "3"])
def test_a_bad_fleet_sync_is_one_line_naming_it(tmp_path, broker_dir, value):
    cfg = tmp_path / "edge.toml"
    cfg.write_text(f'job = "t"\n[broker]\ncredentials = "{broker_dir.credentials_file("edge")}"\n'
                   f'[fleet]\nfile = "fleet.toml"\nsync = {value}\n')
    with pytest.raises(ConfigError, match=r"\[fleet\] sync = .*expected \"exact\"") as exc:
        tierconfig.load("edge", cfg)
    assert "\n" not in str(exc.value)


def test_fleet_sync_is_the_edges_alone(tmp_path, broker_dir):
    cfg = tmp_path / "cloud.toml"
    cfg.write_text(f'job = "t"\n[broker]\ncredentials = "{broker_dir.credentials_file("cloud")}"\n'
                   f'[fleet]\nsync = {{ every = 2 }}\n')
    with pytest.raises(ConfigError, match="sync is the edge's"):
        tierconfig.load("cloud", cfg)


# ---------------------------------------------------------------- with ORT

@pytest.mark.compute
def test_a_pending_local_step_is_kept_by_a_later_round_and_rolled_back_by_a_redone_one():
    spec = models.get("lenet5")
    state = {n: np.full(s, 0.5, np.float32) for n, s in spec.param_shapes(1, 2).items()}
    copy = periodic.Replica(spec, OptimizerConfig("adamw", 1e-2), state, steps=4)
    grads = {n: np.ones_like(v) for n, v in state.items()}
    copy.begin(5)
    copy.step(5, grads, 2.0)
    after = copy.state()
    assert copy.optimizer.step_count == 5 and not np.allclose(after[next(iter(state))], 0.5)
    copy.begin(5)                                    # step 5 redone: back to before it
    assert copy.optimizer.step_count == 4 and all(np.allclose(v, 0.5) for v in copy.params.values())
    copy.step(5, grads, 2.0)
    copy.begin(6)                                    # step 5 made: kept
    assert all(np.array_equal(copy.state()[k], after[k]) for k in after)


@pytest.mark.compute
def test_a_frozen_parameter_and_its_moments_stay_as_they_were():
    shapes = {"a": (3,), "b": (2,)}
    opt = Optimizer(OptimizerConfig("adamw", 1e-2), shapes)
    params = {"a": np.ones(3, np.float32), "b": np.ones(2, np.float32)}
    grads = {"a": np.ones(3, np.float32), "b": np.ones(2, np.float32)}
    new = opt.step(params, grads)
    moments = dict(opt.moments)
    newer = opt.step(new, grads, frozenset({"b"}))
    assert np.array_equal(newer["b"], new["b"]) and not np.array_equal(newer["a"], new["a"])
    assert np.array_equal(opt.moments["m:b"], moments["m:b"]) and not np.array_equal(opt.moments["m:a"], moments["m:a"])


@pytest.mark.compute
@pytest.mark.parametrize("paths", [[(2, 5), (0, U), (U, U)], [(1, U), (3, U), (5, U)], [(U, U), (U, U)],
                                   [(3, 3), (3, 6), (0, 2)]])
def test_in_one_process_k_1_is_exact_mode_step_for_step(paths):
    from hiertrain.train.reference import InProcessPlan, Periodic

    spec = models.get("lenet5")
    sgd = OptimizerConfig("sgd", 0.05)
    exact, ours = InProcessPlan(spec, optimizer=sgd), Periodic(spec, optimizer=sgd)
    names = [f"pi{i}" for i in range(len(paths))]
    sets = {n: data.synthetic(spec.input_shape, spec.classes, n=64, seed=i) for i, n in enumerate(names)}
    for step in range(3):
        members = tuple(Member(n, 3 + i, 8 * step, m, k) for i, (n, (m, k)) in enumerate(zip(names, paths)))
        got = [sets[mb.name].take_raw(np.arange(mb.offset, mb.offset + mb.n)) for mb in members]
        x, y = np.concatenate([g[0] for g in got]), np.concatenate([g[1] for g in got])
        rnd = Round(step, step, 1, U, members, every=1, upload=True)
        fresh = [mb.name for mb in members if mb.m]
        assert ours.step(rnd, x, y, fresh) == pytest.approx(exact.step(Round(step, step, 1, U, members).plan(), x, y),
                                                            rel=1e-5)
    for k, v in exact.params.items():
        np.testing.assert_allclose(ours.params[k], v, rtol=0, atol=1e-5 * np.abs(v).max() + 1e-7)
