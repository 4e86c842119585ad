"""Cost model, exact solver and baselines: pure functions, checked against brute force and by hand."""

import itertools
import json
import subprocess

import numpy as np
import pytest

from hiertrain.errors import PlanError
from hiertrain.profile import Profile
from hiertrain.schedule import Schedule, Stage
from hiertrain.planner import milp, solver
from hiertrain.planner.baselines import POLICIES, plan
from hiertrain.planner.costmodel import Bandwidth, chain_time, evaluate, iteration_time, tables

from conftest import PYTHON, ROOT
from synthetic import random_profile



def brute_force(profile, bw, batch, cost_model="paper"):
    """Every mapping, every cut pair, every integer split (splits vectorised, nothing pruned)."""
    tab = tables(profile, bw, cost_model)
    b_o, b_s = (a.ravel() for a in np.meshgrid(np.arange(batch + 1), np.arange(batch + 1)))
    keep = b_o + b_s <= batch
    b_o, b_s = b_o[keep], b_s[keep]
    best = np.inf
    for o, s, l in itertools.permutations(range(3)):
        for m_s, m_l in itertools.combinations_with_replacement(range(profile.n_units + 1), 2):
            best = min(best, float(np.min(evaluate(tab, o, s, l, m_s, m_l, b_o, b_s, batch - b_o - b_s))))
    return best


def test_solver_is_exact_on_many_random_instances():
    rng = np.random.default_rng(42)
    tiers_used = set()
    for _ in range(200):
        n, batch = int(rng.integers(1, 7)), int(rng.integers(1, 33))
        can_train = tuple(bool(x) for x in rng.random(3) > 0.15)
        profile = random_profile(rng, n, can_train=can_train)
        bw = Bandwidth(float(rng.uniform(0.5, 50)), float(rng.choice([rng.uniform(0.05, 1), rng.uniform(1, 20)])))
        expected = brute_force(profile, bw, batch)
        if not np.isfinite(expected):
            with pytest.raises(PlanError):
                solver.solve(profile, bw, batch)
            continue
        got = solver.solve(profile, bw, batch)
        assert got.iteration_s == pytest.approx(expected, rel=1e-12)
        assert iteration_time(profile, bw, got) == pytest.approx(expected, rel=1e-12)
        tiers_used.add(sum(x > 0 for x in (got.b_o, got.b_s, got.b_l)))
    assert tiers_used == {1, 2, 3}  # the instances exercise one-, two- and three-tier optima


def calibrated(profile, overhead=(0.02, 0.005, 0.001)):
    return Profile.from_json({**profile.to_json(), "calibration": {"overhead_s": dict(zip(("device", "edge", "cloud"), overhead))}})


def test_solver_is_exact_under_the_calibrated_model_too():
    rng = np.random.default_rng(11)
    for _ in range(80):
        n, batch = int(rng.integers(1, 6)), int(rng.integers(1, 25))
        profile = calibrated(random_profile(rng, n), tuple(rng.uniform(0, 0.05, 3)))
        bw = Bandwidth(float(rng.uniform(0.5, 50)), float(rng.uniform(0.1, 20)))
        got = solver.solve(profile, bw, batch, cost_model="calibrated")
        assert got.iteration_s == pytest.approx(brute_force(profile, bw, batch, "calibrated"), rel=1e-12)
        assert iteration_time(profile, bw, got, cost_model="calibrated") == pytest.approx(got.iteration_s, rel=1e-12)


def test_calibrated_model_hand_computed():
    p, bw, batch = calibrated(hand_profile()), Bandwidth(8, 2), 10
    de, ec = 1 / (1_000_000 * 1448 / 1514), 1 / (250_000 * 1448 / 1514)  # payload rates
    # all-cloud: inputs are prefetched: the slower of compute (+ the cloud's overhead) and the
    # edge-cloud link (10 samples of 1000 B, plus their 10,000-B frame stored and forwarded at the edge)
    link, compute = 10 * 1000 * ec + 10 * 1000 * de, 10 * 0.0018 + 0.0002
    assert link > compute + 0.001
    assert plan(p, bw, batch, policy="all-cloud", cost_model="calibrated").iteration_s == pytest.approx(link)
    # all-device: no link is used; the device's overhead is on the critical path
    assert plan(p, bw, batch, policy="all-device", cost_model="calibrated").iteration_s == pytest.approx(
        10 * 0.09 + 0.008 + 0.02)
    # a chain device -> cloud cut after unit 1: activations forward and gradients back cross both links
    got = chain_time(tables(p, bw, "calibrated"), (Stage("device", 1, 1), Stage("cloud", 2, 2)), batch)
    crit = 10 * (0.01 + 0.02) + 2 * 10 * 500 * ec + 10 * (0.0004 + 0.0008) + 0.004
    # each stage pays its tier's overhead in the share of the parameters it holds (2000 and 8000 B of 10,000)
    assert got == pytest.approx(crit + 0.02 * 0.2 + 0.001 * 0.8)
    # so does a slice worker: the device as s over unit 1 adds a fifth of its overhead to o's
    t = tables(p, bw, "calibrated")
    both = float(evaluate(t, 2, 0, 1, 1, 1, 6, 4, 0))
    alone = float(evaluate(tables(calibrated(hand_profile(), (0.0, 0.005, 0.001)), bw, "calibrated"), 2, 0, 1, 1, 1, 6, 4, 0))
    assert both - alone == pytest.approx(0.02 * 0.2)
    # the idle device's loop is a floor under every plan; the device's own overhead (what it pays as
    # the owner: its update, its copies) is not, when it computes nothing
    from hiertrain.planner.costmodel import with_calibration

    owner = calibrated(hand_profile(), (0.5, 0.0, 0.0))
    assert plan(owner, bw, batch, policy="all-cloud", cost_model="calibrated").iteration_s == pytest.approx(link)
    assert plan(owner, bw, batch, policy="all-device", cost_model="calibrated").iteration_s == pytest.approx(
        10 * 0.09 + 0.008 + 0.5)
    looping = with_calibration(hand_profile(), {"device": 0.5, "edge": 0.0, "cloud": 0.0}, loop_s=0.4)
    assert plan(looping, bw, batch, policy="all-cloud", cost_model="calibrated").iteration_s == pytest.approx(0.4)
    assert chain_time(tables(looping, bw, "calibrated"), (Stage("cloud", 1, 2),), batch) == pytest.approx(0.4)


def test_overheads_are_fitted_back_from_single_tier_times():
    p, bw, batch = hand_profile(), Bandwidth(8, 200), 10
    truth = calibrated(p, (0.03, 0.2, 0.05))
    measured = {t: plan(truth, bw, batch, policy=f"all-{t}", cost_model="calibrated").iteration_s for t in ("device", "edge", "cloud")}
    from hiertrain.planner.costmodel import fit_overhead

    fitted = fit_overhead(p, bw, batch, measured, chunk_bytes=256 * 1024)
    assert fitted["device"] == pytest.approx(0.03, abs=1e-5) and fitted["edge"] == pytest.approx(0.2, abs=1e-5)
    assert fitted["cloud"] == pytest.approx(0.05, abs=1e-5)
    # behind a slow link the cloud's overhead cannot be observed: 0, not a guess
    slow = Bandwidth(8, 0.1)
    measured["cloud"] = plan(truth, slow, batch, policy="all-cloud", cost_model="calibrated").iteration_s
    assert fit_overhead(p, slow, batch, measured)["cloud"] == 0.0
    # nor behind the idle device's loop; a large owner's overhead on the device hides nothing
    measured["cloud"] = plan(truth, bw, batch, policy="all-cloud", cost_model="calibrated").iteration_s
    assert fit_overhead(p, bw, batch, measured, loop_s=measured["cloud"])["cloud"] == 0.0
    heavy = {**measured, "device": measured["device"] + 30.0}
    assert fit_overhead(p, bw, batch, heavy)["cloud"] == pytest.approx(0.05, abs=1e-5)


def test_message_costs_fall_on_exchanges_and_the_solver_stays_exact():
    """Each message between worker_o and a slice worker with samples (weights, activations, gradients,
    parameter gradients) costs both ends their per-message seconds; single-tier plans pay none."""
    from dataclasses import replace

    from hiertrain.planner.costmodel import with_calibration

    p, bw, batch = hand_profile(), Bandwidth(1000, 1000), 10  # fast links: the critical path decides
    base = calibrated(p)
    cal = base.extra["calibration"]
    costly = with_calibration(p, cal["overhead_s"], message_s={"device": 0.004, "edge": 0.001, "cloud": 0.0002})
    hybrid = Schedule(mapping={"o": "edge", "s": "device", "l": "cloud"}, m_s=1, m_l=1, b_o=6, b_s=4, b_l=0)
    t0, t1 = (float(evaluate(tables(q, bw, "calibrated"), 1, 0, 2, 1, 1, 6, 4, 0)) for q in (base, costly))
    assert t1 - t0 == pytest.approx(4 * (0.001 + 0.004))
    assert iteration_time(costly, bw, hybrid, cost_model="calibrated") == pytest.approx(t1)
    for policy in ("all-device", "all-edge", "all-cloud"):
        assert plan(costly, bw, batch, policy=policy, cost_model="calibrated").iteration_s == pytest.approx(
            plan(base, bw, batch, policy=policy, cost_model="calibrated").iteration_s)
    got = chain_time(tables(costly, bw, "calibrated"), (Stage("device", 1, 1), Stage("cloud", 2, 2)), batch)
    ref = chain_time(tables(base, bw, "calibrated"), (Stage("device", 1, 1), Stage("cloud", 2, 2)), batch)
    assert got - ref == pytest.approx(2 * (0.004 + 0.0002))
    rng = np.random.default_rng(5)
    for _ in range(40):
        n, b = int(rng.integers(1, 6)), int(rng.integers(1, 25))
        q = calibrated(random_profile(rng, n), tuple(rng.uniform(0, 0.05, 3)))
        q = replace(q, extra={"calibration": {**q.extra["calibration"],
                                              "message_s": dict(zip(("device", "edge", "cloud"), rng.uniform(0, 0.02, 3)))}})
        bw2 = Bandwidth(float(rng.uniform(0.5, 50)), float(rng.uniform(0.1, 20)))
        got = solver.solve(q, bw2, b, cost_model="calibrated")
        assert got.iteration_s == pytest.approx(brute_force(q, bw2, b, "calibrated"), rel=1e-12)


def test_calibrated_model_needs_a_calibration():
    with pytest.raises(PlanError, match="calibration"):
        plan(hand_profile(), Bandwidth(8, 2), 10, cost_model="calibrated")


@pytest.mark.parametrize("cost_model", ["paper", "calibrated"])
def test_hiertrain_is_never_slower_than_an_exact_baseline(cost_model):
    rng = np.random.default_rng(5)
    chains_won = 0
    for _ in range(60):
        profile = calibrated(random_profile(rng, int(rng.integers(2, 7))), tuple(rng.uniform(0, 0.02, 3)))
        bw, batch = Bandwidth(float(rng.uniform(1, 10)), float(rng.uniform(0.5, 10))), int(rng.integers(4, 33))
        best = plan(profile, bw, batch, cost_model=cost_model)
        for policy in ("all-device", "all-edge", "all-cloud", "jointdnn", "jointdnn+"):
            assert best.iteration_s <= plan(profile, bw, batch, policy=policy, cost_model=cost_model).iteration_s + 1e-12
        assert best.policy == "hiertrain" and best.cost_model == cost_model
        chains_won += best.chain is not None
    assert 0 < chains_won < 60  # both kinds of plan win somewhere


def test_milp_formulation_agrees_with_the_exact_search():
    rng = np.random.default_rng(7)
    for _ in range(8):
        n, batch = int(rng.integers(1, 5)), int(rng.integers(2, 12))
        profile = random_profile(rng, n)
        bw = Bandwidth(float(rng.uniform(0.5, 20)), float(rng.uniform(0.2, 5)))
        a, b = solver.solve(profile, bw, batch), milp.solve(profile, bw, batch)
        assert b.iteration_s == pytest.approx(a.iteration_s, rel=1e-7)
        assert iteration_time(profile, bw, b) == pytest.approx(a.iteration_s, rel=1e-7)


def test_a_tier_that_cannot_train_gets_no_samples():
    rng = np.random.default_rng(3)
    for _ in range(20):
        profile = random_profile(rng, 4, can_train=(False, True, True))
        s = solver.solve(profile, Bandwidth(100, 0.3), 16)  # a fast device link tempts the planner
        for role in "osl":
            if s.mapping[role] == "device":
                assert s.samples(role) == 0 and role != "o"


def hand_profile():
    return Profile.from_json({
        "format": "hiertrain-profile/1", "model": "hand", "sample_bytes": 1000,
        "layers": [{"name": "a", "output_bytes": 500, "param_bytes": 2000},
                   {"name": "b", "output_bytes": 100, "param_bytes": 8000}],
        "tiers": {t: {"forward_s": [f, 2 * f], "backward_s": [2 * f, 4 * f], "update_s": [u, u]}
                  for t, f, u in (("device", 0.01, 0.004), ("edge", 0.002, 0.001), ("cloud", 0.0002, 0.0001))},
    })


def test_all_cloud_and_all_edge_match_a_hand_computed_case():
    p, bw, batch = hand_profile(), Bandwidth(8, 2), 10
    # all-cloud: input device->cloud at min(8, 2) Mbit/s = 250,000 B/s; compute 10 * (0.0006 + 0.0012); update 0.0002
    assert plan(p, bw, batch, policy="all-cloud").iteration_s == pytest.approx(10 * 1000 / 250_000 + 0.018 + 0.0002)
    # all-edge: input device->edge at 1,000,000 B/s; compute 10 * (0.006 + 0.012); update 0.002
    assert plan(p, bw, batch, policy="all-edge").iteration_s == pytest.approx(0.01 + 0.18 + 0.002)
    assert plan(p, bw, batch, policy="all-device").iteration_s == pytest.approx(10 * 0.09 + 0.008)


def test_hand_computed_hybrid_terms():
    p, bw = hand_profile(), Bandwidth(8, 2)
    s = Schedule(mapping={"o": "cloud", "s": "device", "l": "edge"}, m_s=1, m_l=2, b_o=4, b_s=2, b_l=4)
    from hiertrain.planner.costmodel import breakdown

    t = breakdown(p, bw, s)
    de, ec = 1 / 1_000_000, 1 / 250_000
    t_out_s, t_out_l = 2 * 500 * ec, 4 * 100 * ec  # s: device->cloud at min rate; l: edge->cloud
    assert t["T1f"] == pytest.approx(max(4 * 1000 * ec + 4 * 0.0002, 2 * 0.01 + t_out_s, 4 * 1000 * de + 4 * 0.002))
    assert t["T1b"] == pytest.approx(max(4 * 0.0004, 2 * 0.02 + t_out_s, 4 * 0.004))
    assert t["T2f"] == pytest.approx(max(6 * 0.0004, 4 * 0.004 + t_out_l))
    assert t["T2b"] == pytest.approx(max(6 * 0.0008, 4 * 0.008 + t_out_l))
    assert t["T3f"] == 0 and t["T3b"] == 0
    assert t["T_update"] == pytest.approx(max(0.0002, 0.004, 0.002) + max(2 * 2000 * ec, 2 * 10000 * ec))
    assert t["T_total"] == pytest.approx(sum(v for k, v in t.items() if k != "T_total"))


def test_idle_workers_cost_nothing_but_their_cut_still_splits_segments():
    p, bw = hand_profile(), Bandwidth(8, 2)
    base = dict(mapping={"o": "edge", "s": "device", "l": "cloud"}, b_o=10, b_s=0, b_l=0)
    assert iteration_time(p, bw, Schedule(m_s=0, m_l=0, **base)) == pytest.approx(
        iteration_time(p, bw, Schedule(m_s=2, m_l=2, **base)))


def test_chain_baselines_cover_their_extremes():
    p, bw, batch = hand_profile(), Bandwidth(8, 2), 10
    tab = tables(p, bw)
    assert chain_time(tab, (Stage("cloud", 1, 2),), batch) == pytest.approx(plan(p, bw, batch, policy="all-cloud").iteration_s)
    jd = plan(p, bw, batch, policy="jointdnn")
    assert jd.iteration_s <= min(plan(p, bw, batch, policy=x).iteration_s for x in ("all-cloud", "all-device")) + 1e-12
    jdp = plan(p, bw, batch, policy="jointdnn+")
    assert jdp.iteration_s <= jd.iteration_s + 1e-12
    jalad = plan(p, bw, batch, policy="jalad")
    assert jalad.chain[0].tier in ("edge", "cloud")


@pytest.mark.parametrize("policy", POLICIES)
def test_every_policy_returns_a_valid_json_schedule(policy):
    p = random_profile(np.random.default_rng(1), 5)
    s = plan(p, Bandwidth(5, 1.5), 32, policy=policy)
    data = s.to_json()
    assert set(data) >= {"policy", "cost_model", "mapping", "m_s", "m_l", "b_o", "b_s", "b_l", "iteration_s", "solve_s"}
    back = Schedule.from_json(json.loads(json.dumps(data)))
    assert back.check(n_units=5, batch=32) == s.check(n_units=5, batch=32)
    assert np.isfinite(data["iteration_s"]) and (("plan" in data) == (s.chain is not None))


@pytest.mark.parametrize("kwargs,match", [
    (dict(m_s=3, m_l=2), "m_s <= m_l"),
    (dict(m_s=0, b_s=2, b_o=2), "cut > 0"),
    (dict(mapping={"o": "cloud", "s": "cloud", "l": "edge"}), "different tier"),
    (dict(b_o=-1), "non-negative"),
])
def test_bad_schedules_are_refused(kwargs, match):
    base = dict(mapping={"o": "cloud", "s": "device", "l": "edge"}, m_s=1, m_l=2, b_o=4, b_s=0, b_l=0)
    with pytest.raises(PlanError, match=match):
        Schedule(**{**base, **kwargs})


def test_schedule_check_names_the_problem():
    s = Schedule(mapping={"o": "cloud", "s": "device", "l": "edge"}, m_s=1, m_l=5, b_o=4, b_s=0, b_l=0)
    with pytest.raises(PlanError, match="beyond the model's 3 units"):
        s.check(n_units=3)
    with pytest.raises(PlanError, match="not the batch size 8"):
        s.check(n_units=5, batch=8)


def run_plan(*args):
    return subprocess.run([PYTHON, "-m", "hiertrain", "plan", *args], capture_output=True, text=True, cwd=ROOT)


@pytest.mark.process
def test_plan_cli_prints_exactly_one_json_object(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(random_profile(np.random.default_rng(2), 6).to_json()))
    r = run_plan("--profile", str(path), "--bw-device-edge", "5", "--bw-edge-cloud", "1.5", "--batch", "64", "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["policy"] == "hiertrain" and data["cost_model"] == "paper"
    assert sorted(data["mapping"].values()) == ["cloud", "device", "edge"]
    assert data["b_o"] + data["b_s"] + data["b_l"] == 64 and data["solve_s"] >= 0


@pytest.mark.parametrize("change,needle", [
    ({"--batch": "0"}, "at least 1"),
    ({"--bw-edge-cloud": "-1"}, "bw-edge-cloud"),
    ({"--profile": "/nonexistent.json"}, "does not exist"),
    ({"--profile": "BAD"}, "layers"),
])
@pytest.mark.process
def test_plan_cli_bad_input_one_line(tmp_path, change, needle):
    good = tmp_path / "p.json"
    good.write_text(json.dumps(random_profile(np.random.default_rng(2), 3).to_json()))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "hiertrain-profile/1", "sample_bytes": 3, "layers": [], "tiers": {}}))
    args = {"--profile": str(good), "--bw-device-edge": "5", "--bw-edge-cloud": "1", "--batch": "8"}
    args.update({k: (str(bad) if v == "BAD" else v) for k, v in change.items()})
    r = run_plan(*[x for kv in args.items() for x in kv], "--json")
    assert r.returncode != 0 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], r.stderr
