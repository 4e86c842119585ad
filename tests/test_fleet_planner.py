"""The fleet planner (many devices, one edge, a cloud): exact against brute force on random
heterogeneous instances, never worse than EdgeSplit's alternating algorithm or the other baselines,
private devices keep their raw samples, and the cost terms are the ones written down."""

from __future__ import annotations

import random

import numpy as np
import pytest

from hiertrain.errors import PlanError
from hiertrain.planner import fleet as F
from hiertrain.planner import fleetfile as FF
from hiertrain.planner import fleetknapsack as K
from hiertrain.planner import fleetpolicies as FP
from hiertrain.planner import fleetsim as FS
from hiertrain.planner.fleet import random_fleet



@pytest.mark.parametrize("seed", range(6))
def test_the_planner_equals_brute_force_and_no_baseline_beats_it(seed):
    rng = random.Random(seed)
    for _ in range(25):
        fleet = random_fleet(rng, rng.randint(1, 3), rng.randint(1, 4))
        plan, truth = F.solve(fleet), F.brute_force(fleet)
        assert plan.parts["optimal"]
        assert plan.iteration_s == pytest.approx(truth.iteration_s, rel=1e-9)
        for policy in FP.POLICIES[1:]:
            assert FP.baseline(fleet, policy).iteration_s >= plan.iteration_s * (1 - 1e-9), policy
        for d, p in zip(fleet.devices, plan.paths):
            assert not (d.private and p.m == 0)


@pytest.mark.parametrize("devices", [16, 100])
def test_a_large_fleet_is_planned_within_its_budget_and_never_worse_than_a_baseline(devices):
    import time

    fleet = random_fleet(random.Random(7), devices, 20)
    t0 = time.perf_counter()
    plan = F.solve(fleet, budget_s=0.5)
    assert time.perf_counter() - t0 < 5  # the budget, and slack for a loaded machine; timed in `bench`
    for policy in FP.POLICIES[1:]:
        assert plan.iteration_s <= FP.baseline(fleet, policy).iteration_s * (1 + 1e-12), policy
    assert sum(plan.shares_mbps) <= fleet.medium_mbps * (1 + 1e-9)
    assert plan.parts["optimal"] is False  # this one outgrows its budget, and says so


def test_the_knapsack_thinned_to_a_few_pairs_still_finds_a_plan_that_fits():
    fleet = random_fleet(random.Random(11), 12, 10)
    opts = [K.options(fleet, d, 0) for d in fleet.devices]
    tau = 1.5 * F.solve(fleet, budget_s=5).parts["devices_s"]  # a deadline the medium is tight at
    full = K.cheapest_within(fleet, opts, tau)
    thin = K.cheapest_within(fleet, opts, tau, front=1)
    assert full[2] and not thin[2] and thin[0] > full[0]  # exact, then not: dearer, and it says so
    chosen = [o.paths[i] for o, i in zip(opts, thin[1])]
    assert F.iteration_time(fleet, chosen)[2]["devices_s"] <= tau * (1 + 1e-9)  # fits the medium by tau


@pytest.mark.parametrize("seed", range(40))
def test_the_vectorised_terms_equal_the_written_ones(seed):
    rng = random.Random(seed)
    fleet = random_fleet(rng, 3, rng.randint(1, 9))
    for d in fleet.devices:
        compute, bits, g = F.terms_table(fleet, d)
        allowed = set(F.paths(fleet, d))
        for m in range(fleet.units + 1):
            for k in range(fleet.units + 1):
                if F.Path(m, k) not in allowed:
                    assert g[m, k] == np.inf
                    continue
                assert (compute[m], bits[m]) == pytest.approx(F.device_terms(fleet, d, m), rel=1e-12)
                assert g[m, k] == pytest.approx(F.server_terms(fleet, d, F.Path(m, k)), rel=1e-12)


def test_shares_fill_the_medium_so_every_busy_device_finishes_together():
    compute, bits, caps = [0.5, 1.0, 0.2], [8e6, 4e6, 16e6], [100.0, 100.0, 100.0]
    tau, shares = F.allocate(compute, bits, caps, 10.0)
    assert sum(shares) == pytest.approx(10.0, rel=1e-9)
    for c, b, s in zip(compute, bits, shares):
        assert c + b / (s * 1e6) == pytest.approx(tau, rel=1e-9)
    # a radio's cap binds: that device gets its cap, the others share the rest
    tau2, shares2 = F.allocate(compute, bits, [100.0, 100.0, 2.0], 10.0)
    assert shares2[2] <= 2.0 * (1 + 1e-9) and tau2 >= tau
    assert F.allocate([1.0, 2.0], [0.0, 0.0], [1.0, 1.0], 1.0) == (2.0, [0.0, 0.0])


def test_the_cost_terms_are_the_written_ones():
    fleet = F.Fleet(act_bytes=(100.0, 50.0, 10.0), param_bytes=(1000.0, 2000.0),
                    devices=(F.Device("a", 4, (0.1, 0.2), 10.0),), edge_s=(0.01, 0.02), cloud_s=(0.001, 0.002),
                    medium_mbps=10.0, cloud_mbps=1.0)
    d = fleet.devices[0]
    assert F.device_terms(fleet, d, 0) == (0.0, 8.0 * 4 * 100.0)                     # raw samples, up only
    assert F.device_terms(fleet, d, 1) == (0.4, 8.0 * (4 * 50.0 * 2 + 2 * 1000.0))   # act + grad, unit 1 synced
    assert F.device_terms(fleet, d, 2) == pytest.approx((4 * 0.3, 8.0 * 2 * 3000.0))  # all local: weights only
    assert F.server_terms(fleet, d, F.Path(1, 1)) == pytest.approx(4 * 0.002 + 8.0 * 2 * 4 * 50.0 / 1e6)
    assert F.cloud_sync(fleet, 1) == pytest.approx(8.0 * 2 * 2000.0 / 1e6)
    t, shares, parts = F.iteration_time(fleet, [F.Path(1, 2)])
    assert t == pytest.approx(0.4 + 8.0 * 2400 / 10e6 + 4 * 0.02) and shares == [pytest.approx(10.0)]


def test_bad_fleets_and_paths_are_refused():
    fleet = random_fleet(random.Random(1), 2, 3, private=1.0)
    with pytest.raises(PlanError, match="not allowed"):
        F.iteration_time(fleet, [F.Path(0, 3), F.Path(1, 3)])  # a private device's raw samples
    with pytest.raises(PlanError, match="2 paths for"):
        F.iteration_time(random_fleet(random.Random(1), 3, 3), [F.Path(1, 3)] * 2)
    with pytest.raises(PlanError, match="needs 4 activation sizes"):
        F.Fleet((1.0,), (1.0, 2.0, 3.0), (), (1.0,) * 3, (1.0,) * 3, 1.0, 1.0)
    with pytest.raises(PlanError, match="unknown fleet policy"):
        FP.baseline(fleet, "fedavg")


@pytest.mark.process
def test_a_fleet_file_of_profiles_is_planned_by_the_cli_and_bad_ones_refused_in_one_line(tmp_path):
    """`hiertrain plan-fleet FILE`: the servers' profile, each device's own, samples and radio."""
    import json
    import subprocess
    import sys
    from dataclasses import replace

    from conftest import ROOT
    from hiertrain.profile import Profile

    full = Profile.load(ROOT / "bench" / "profiles" / "lenet5.json")
    dev = full.tiers["device"]
    for name, slower in (("pi3", 3.0), ("jetson", 0.5)):  # a Pi 3 three times the profiled device, a Jetson twice as fast
        times = replace(dev, forward_s=tuple(t * slower for t in dev.forward_s),
                        backward_s=tuple(t * slower for t in dev.backward_s))
        (tmp_path / f"{name}.json").write_text(json.dumps(Profile(full.model, full.sample_bytes, full.layers,
                                                                  {"device": times}).to_json()))
    (tmp_path / "servers.json").write_text(json.dumps(full.to_json()))
    edge_only = {**full.to_json(), "tiers": {"edge": full.to_json()["tiers"]["edge"]}}
    (tmp_path / "edge.json").write_text(json.dumps(edge_only))
    text = ('profile = "servers.json"\nmedium_mbps = 20\ncloud_mbps = 5\n'
            '[[device]]\nname = "pi3"\nprofile = "pi3.json"\nsamples = 16\nrate_mbps = 8\nprivate = true\n'
            '[[device]]\nname = "jetson"\nprofile = "jetson.json"\nsamples = 32\nrate_mbps = 15\n')
    (tmp_path / "fleet.toml").write_text(text)
    fleet = FF.load(tmp_path / "fleet.toml")
    assert [d.name for d in fleet.devices] == ["pi3", "jetson"] and fleet.devices[0].private
    assert fleet.devices[0].unit_s[0] == pytest.approx(6 * fleet.devices[1].unit_s[0])
    out = subprocess.run([sys.executable, "-m", "hiertrain", "plan-fleet", str(tmp_path / "fleet.toml"), "--json"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["optimal"] and got["iteration_s"] == pytest.approx(F.brute_force(fleet).iteration_s, rel=1e-9)
    assert [d["name"] for d in got["devices"]] == ["pi3", "jetson"] and got["devices"][0]["device_units"] >= 1
    assert all(t >= got["iteration_s"] * (1 - 1e-9) for t in got["baselines_s"].values())
    out = subprocess.run([sys.executable, "-m", "hiertrain", "plan-fleet", str(tmp_path / "fleet.toml"), "--json",
                          "--sync-every", "8"], capture_output=True, text=True, timeout=120)
    periodic = json.loads(out.stdout)  # the devices' weights once every 8 steps: the optimum of that fleet
    assert periodic["sync_every"] == 8 and got["sync_every"] == 1
    assert periodic["iteration_s"] == pytest.approx(F.brute_force(replace(fleet, sync_every=8)).iteration_s, rel=1e-9)
    assert periodic["iteration_s"] <= got["iteration_s"]
    # a coordinator's file may leave the cloud's timings to the cloud, which publishes them
    (tmp_path / "edge-only.toml").write_text(text.replace('"servers.json"', '"edge.json"'))
    file = FF.read(tmp_path / "edge-only.toml")
    assert not file.cloud_known and set(file.fleet.cloud_s) == {F.NO_CLOUD_S}
    assert FF.published_cloud(file.fleet, full.to_json()) == fleet.cloud_s
    for payload, why in ((edge_only, "the cloud's profile has no cloud timings"),
                         ({**full.to_json(), "layers": [{**layer, "name": f"x{i}"} for i, layer in enumerate(full.to_json()["layers"])]},
                          "the cloud: its profile is of another model"),
                         ({"format": "nonsense"}, "the cloud's profile")):
        with pytest.raises(PlanError, match=why):
            FF.published_cloud(file.fleet, payload)

    for bad, why in ((text.replace("samples = 16", "samples = 0"), "samples must be >= 1"),
                     (text.replace('rate_mbps = 8', 'rate_mbps = "fast"'), 'rate_mbps = \'fast\' is not a number'),
                     (text.replace('rate_mbps = 8', 'rate_mpbs = 8'), "unknown key 'rate_mpbs' (did you mean 'rate_mbps'?)"),
                     (text.replace('samples = 32\n', ''), "[[device]] 2 needs samples"),
                     (text.split("[[device]]")[0], "no [[device]] tables with a profile"),
                     (text.replace('"jetson"', '"pi3"', 1), "share a name"),
                     (text.replace('"servers.json"', '"edge.json"'), "its profile has no cloud timings")):
        (tmp_path / "bad.toml").write_text(bad)
        out = subprocess.run([sys.executable, "-m", "hiertrain", "plan-fleet", str(tmp_path / "bad.toml")],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 1 and why in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_the_simulated_step_matches_hand_timing_and_credits_the_edge_starting_early():
    one = F.Fleet(act_bytes=(1000.0, 500.0, 100.0), param_bytes=(2000.0, 3000.0),
                  devices=(F.Device("pi", 4, (0.01, 0.02), 8.0),), edge_s=(0.001, 0.002), cloud_s=(0.0005, 0.001),
                  medium_mbps=4.0, cloud_mbps=2.0)
    # units 1 on the device, 2 on the edge: weights down at the medium's 4 Mbit/s (below the radio's 8),
    # compute, activations up, the edge's unit, then the gradient down and the parameter gradients up
    by_hand = (8 * 2000 / 4e6 + 4 * 0.01 + 8 * 4 * 500 / 4e6 + 4 * 0.002 + 8 * (4 * 500 + 2000) / 4e6)
    assert FS.simulated_time(one, [F.Path(1, 2)]) == pytest.approx(by_hand)
    # a slow device and a device sending raw samples: the edge serves the raw samples while the slow
    # one computes, which the conservative model does not credit
    slow, raw = F.Device("pi3", 4, (1.0, 1.0), 8.0), F.Device("cam", 4, (1.0, 1.0), 8.0)
    two = F.Fleet(one.act_bytes, one.param_bytes, (slow, raw), (0.1, 0.1), one.cloud_s, 8.0, 2.0)
    paths = [F.Path(1, 2), F.Path(0, 2)]
    assert FS.simulated_time(two, paths) < F.iteration_time(two, paths)[0] - 0.5
    best = FS.refined(two, [F.plan_of("a", two, paths), F.plan_of("b", two, [F.Path(2, 2), F.Path(2, 2)])])
    assert best.policy == "a" and best.parts["conservative_s"] == pytest.approx(F.iteration_time(two, paths)[0])


def test_a_fleet_that_could_never_start_is_refused_at_start(tmp_path):
    """Without the planner's account nobody can publish a profile: the fleet file must describe the
    devices the edge waits for, and the cloud's timings."""
    import json

    from conftest import ROOT
    from hiertrain.edge.roster import Roster
    from hiertrain.errors import ConfigError
    from hiertrain.profile import Profile

    full = Profile.load(ROOT / "bench" / "profiles" / "lenet5.json").to_json()
    (tmp_path / "servers.json").write_text(json.dumps(full))
    (tmp_path / "edge.json").write_text(json.dumps({**full, "tiers": {"edge": full["tiers"]["edge"]}}))
    rows = "".join(f'[[device]]\nname = "pi{i}"\nprofile = "servers.json"\nsamples = 4\nrate_mbps = 5\n' for i in (1, 2))
    for servers, wait_for, why in (("servers.json", 3, "describes 2 of the 3 devices to wait for"),
                                   ("edge.json", 2, "has no cloud timings")):
        path = tmp_path / "fleet.toml"
        path.write_text(f'profile = "{servers}"\nmedium_mbps = 20\ncloud_mbps = 5\n{rows}')
        roster = Roster(FF.read(path), batch=16, where=path)
        with pytest.raises(ConfigError, match=why):
            roster.check(wait_for=wait_for, joins=False, config="edge.toml")
        roster.check(wait_for=wait_for, joins=True, config="edge.toml")  # joiners may bring what is missing
