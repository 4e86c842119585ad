"""Energy: the power model against hand arithmetic, the readers against recorded outputs of their
interfaces, the plan accounting against its array form, and the energy planners against brute force."""

from __future__ import annotations

import itertools
import math
import random

import numpy as np
import pytest

from hiertrain import TIERS
from hiertrain.errors import ConfigError, PlanError
from hiertrain.meters import Jetson, Meter, Pmic, Rapl, detect, pmic_watts
from hiertrain.plan import Group, Plan, Stage
from hiertrain.power import CLASSES, PowerModel, joules, power_of, with_overrides
from hiertrain.schedule import Schedule
from hiertrain.planner import energy as E
from hiertrain.planner import fleetenergy as FE
from hiertrain.planner import fleet as F
from hiertrain.planner.baselines import _chains, chain_schedule
from hiertrain.planner.costmodel import Bandwidth, iteration_time, tables
from synthetic import random_profile


# `vcgencmd pmic_read_adc` on a Raspberry Pi 5 (firmware 2024-05), idle at the desktop
PMIC_OUTPUT = """\
 3V7_WL_SW_A current(0)=0.00390372A
   3V3_SYS_A current(1)=0.05171500A
   1V8_SYS_A current(2)=0.17665020A
  DDR_VDD2_A current(3)=0.02049600A
  DDR_VDDQ_A current(4)=0.00000000A
   1V1_SYS_A current(5)=0.18495350A
   0V8_SYS_A current(6)=0.37174350A
  VDD_CORE_A current(7)=0.67651600A
   3V3_DAC_A current(17)=0.00007320A
   3V3_ADC_A current(18)=0.00030500A
   0V8_AON_A current(16)=0.00454020A
      HDMI_A current(22)=0.02079520A
 3V7_WL_SW_V volt(8)=3.74426400V
   3V3_SYS_V volt(9)=3.31216000V
   1V8_SYS_V volt(10)=1.79940000V
  DDR_VDD2_V volt(11)=1.11256800V
  DDR_VDDQ_V volt(12)=0.60470800V
   1V1_SYS_V volt(13)=1.10490400V
   0V8_SYS_V volt(14)=0.80060940V
  VDD_CORE_V volt(15)=0.72266000V
   3V3_DAC_V volt(20)=3.31151900V
   3V3_ADC_V volt(21)=3.30969000V
   0V8_AON_V volt(19)=0.80000000V
      HDMI_V volt(23)=5.16180000V
     EXT5V_V volt(24)=5.15052000V
      BATT_V volt(25)=0.00000000V
"""

# jtop().power on a Jetson Orin Nano (jetson-stats 4.2), mW and mV
JTOP_POWER = {
    "rail": {"VDD_IN": {"online": True, "type": "INA3221", "status": "ok", "volt": 5072, "curr": 1312,
                        "warn": 32760, "crit": 32760, "power": 6654, "avg": 6620},
             "VDD_CPU_GPU_CV": {"online": True, "type": "INA3221", "status": "ok", "volt": 5064, "curr": 400,
                                "warn": 32760, "crit": 32760, "power": 2025, "avg": 2010}},
    "tot": {"volt": 5072, "curr": 1312, "warn": 32760, "crit": 32760, "power": 6654, "avg": 6620,
            "name": "VDD_IN", "online": True, "type": "INA3221", "status": "ok"},
}


# ------------------------------------------------------------------------ the model

def test_joules_by_hand():
    pi = PowerModel(idle_w=2.0, busy_w=6.0, tx_nj_per_bit=100.0, rx_nj_per_bit=50.0)
    # 1.5 s step, 0.5 s of it computing, 10 kB sent, 20 kB received
    assert joules(pi, 1.5, 0.5, 10_000, 20_000) == pytest.approx(2.0 * 1.5 + 4.0 * 0.5 + 8e-9 * (100 * 1e4 + 50 * 2e4))
    assert joules(pi, 1.5, 0.5, 10_000, 20_000) == pytest.approx(5.016)


def test_power_models_from_classes_tables_and_a_fleet_files_overrides():
    assert power_of("pi4") == CLASSES["pi4"]
    custom = power_of({"class": "pi3", "busy_w": 6.0})
    assert (custom.idle_w, custom.busy_w, custom.name) == (1.9, 6.0, "pi3*")
    assert power_of({"idle_w": 1, "busy_w": 2, "tx_nj_per_bit": 3, "rx_nj_per_bit": 4}).busy_w == 2
    classes = with_overrides({"pi4": {"idle_w": 3.0}, "solar-node": {"idle_w": 0.5, "busy_w": 2.5,
                                                                     "tx_nj_per_bit": 50, "rx_nj_per_bit": 20}},
                             where="fleet.toml:")
    assert classes["pi4"].idle_w == 3.0 and classes["pi4"].busy_w == 6.4 and classes["solar-node"].busy_w == 2.5
    for bad, match in [("pi9", "unknown device class 'pi9'"), ({"class": "pi4", "watts": 3}, "unknown key 'watts'"),
                       ({"idle_w": 1.0}, "without a class it needs busy_w"), ({"class": "pi4", "busy_w": "7"}, "not a number"),
                       ({"class": "pi4", "busy_w": 1.0}, "below idle_w"), (3, "expected a device class")]:
        with pytest.raises(ConfigError, match=match):
            power_of(bad)


# ----------------------------------------------------------------------- the readers

def _zone(root, name, uj, max_uj, sub=False):
    z = root / name
    z.mkdir()
    (z / "name").write_text("core\n" if sub else "package-0\n")
    (z / "energy_uj").write_text(f"{uj}\n")
    (z / "max_energy_range_uj").write_text(f"{max_uj}\n")
    return z


def test_rapl_sums_the_packages_and_undoes_a_wrap(tmp_path):
    a = _zone(tmp_path, "intel-rapl:0", 262_143_000_000, 262_143_328_850)
    b = _zone(tmp_path, "intel-rapl:1", 5_000_000, 262_143_328_850)
    _zone(tmp_path, "intel-rapl:0:0", 1_000, 262_143_328_850, sub=True)  # a part of package 0: not added again
    rapl = Rapl(tmp_path)
    assert [z.name for z in rapl.zones] == ["intel-rapl:0", "intel-rapl:1"]
    (a / "energy_uj").write_text("1000000\n")   # wrapped: 328_850 + 1 up to the top, then 1 J
    (b / "energy_uj").write_text("7500000\n")   # 2.5 J
    assert rapl.read() == pytest.approx((328_851 + 1_000_000 + 2_500_000) * 1e-6)
    with pytest.raises(ConfigError, match="no RAPL zones"):
        Rapl(tmp_path / "none")


def test_the_pi5_pmic_reading_is_the_rails_volts_times_amps():
    rails = {}
    for line in PMIC_OUTPUT.splitlines():
        name, value = line.split("=")
        rail, kind = name.split()[0].rsplit("_", 1)
        rails.setdefault(rail, {})[kind] = float(value[:-1])
    expected = sum(v["A"] * v["V"] for v in rails.values() if "A" in v)
    assert pmic_watts(PMIC_OUTPUT) == pytest.approx(expected)
    assert 1.5 < expected < 1.8  # (about 1.6 W: the rails after the 5 V input, idle)
    assert Pmic(run=lambda: PMIC_OUTPUT).read() == pytest.approx(expected)
    with pytest.raises(ConfigError, match="no rail"):
        pmic_watts("error=1 error_msg=\"Command not registered\"\n")


def test_jetson_stats_total_power_in_watts():
    class Handle:
        power = JTOP_POWER

    assert Jetson(Handle()).read() == pytest.approx(6.654)
    Handle.power = {"rail": {}}
    with pytest.raises(ConfigError, match="no total power"):
        Jetson(Handle())


def test_detect_on_this_machine_falls_back_to_the_model_and_refuses_what_it_lacks():
    assert detect("model") is None
    if not any((p / "energy_uj").exists() for p in E_powercap()):
        assert detect("auto") is None or detect("auto").source in ("pmic", "jetson")
        with pytest.raises(ConfigError, match="energy source rapl: not available here"):
            detect("rapl")
    with pytest.raises(ConfigError, match="unknown energy source 'battery'"):
        detect("battery")


def E_powercap():
    from hiertrain.meters import POWERCAP

    return list(POWERCAP.glob("intel-rapl:*")) if POWERCAP.exists() else []


def test_a_meter_counts_each_steps_joules_from_the_model_or_a_reader():
    pi = PowerModel(2.0, 6.0, 100.0, 50.0, "pi")
    m = Meter(pi)
    first = m.step(1.0, 0.25, 1000, 0)
    assert first == {"joules": pytest.approx(2.0 + 1.0 + 8e-9 * 1e5, abs=1e-6), "joules_total": first["joules"],
                     "source": "model:pi"}
    second = m.step(1.0, 0.0, 1000, 2000)  # only what changed since: 2 kB received
    assert second["joules"] == pytest.approx(2.0 + 8e-9 * 50 * 2000, abs=1e-6)
    assert m.step(2.0, 5.0, 1000, 2000)["joules"] == pytest.approx(2 * 6.0)  # busy no longer than the step

    class Watts:
        source, cumulative, now = "pmic", False, 4.0

        def read(self):
            return self.now

    w = Watts()
    meter = Meter(pi, w)
    w.now = 6.0
    assert meter.step(2.0, 0.0, 0, 0) == {"joules": pytest.approx(10.0), "joules_total": pytest.approx(10.0),
                                          "source": "pmic"}


def test_an_energy_table_gives_the_budgets_in_force_and_refuses_bad_ones(tmp_path):
    """[energy]: joules per step and average watts, each lowered while the battery file reads below
    low_pct (an unreadable one is not low); a bad value is one line naming it."""
    from hiertrain.meters import EnergyConfig

    battery = tmp_path / "capacity"
    battery.write_text("55\n")
    cfg = EnergyConfig.of({"budget_j": 5.0, "budget_w": 4.0, "battery": str(battery), "low_pct": 30,
                           "low_budget_w": 3.0}, tier="device")
    assert cfg.budgets_now() == {"budget_j": 5.0, "budget_w": 4.0}
    battery.write_text("12\n")
    assert cfg.budgets_now() == {"budget_j": 5.0, "budget_w": 3.0}  # (no low_budget_j: the joules stay)
    battery.write_text("not a number\n")
    assert cfg.budgets_now() == {"budget_j": 5.0, "budget_w": 4.0}
    assert EnergyConfig.of({}, tier="device").budgets_now() == {}
    for table, why in (({"budget_w": -1.0}, "budget_w = -1.0 must be a positive number of watts on average"),
                       ({"low_budget_w": 2.0}, "battery goes with low_budget_j or low_budget_w"),
                       ({"battery": "x"}, "battery goes with low_budget_j or low_budget_w")):
        with pytest.raises(ConfigError, match=why):
            EnergyConfig.of(table, tier="device")


def test_a_fleet_file_gives_devices_average_watts_and_refuses_bad_ones(tmp_path):
    import json

    from conftest import ROOT
    from hiertrain.planner import fleetfile as FF
    from hiertrain.planner import fleetpolicies as FP
    from hiertrain.profile import Profile

    (tmp_path / "servers.json").write_text(json.dumps(Profile.load(ROOT / "bench" / "profiles" / "lenet5.json").to_json()))
    text = ('profile = "servers.json"\nmedium_mbps = 20\ncloud_mbps = 5\n[[device]]\nname = "pi1"\n'
            'profile = "servers.json"\nsamples = 8\nrate_mbps = 10\npower = "pi4"\nbudget_w = 2.9\n')
    (tmp_path / "fleet.toml").write_text(text)
    fleet = FF.load(tmp_path / "fleet.toml")
    assert fleet.devices[0].budget_w == 2.9
    plan = FP.choose(fleet, pins=None, policy="hiertrain", cloud=True)
    # the coordinator's plan is paced: its step no shorter than pi1's joules above idle over its 0.2 spare watts
    j = FE.fleet_joules(fleet, plan)["pi1"]
    assert plan.policy == "hiertrain-budget" and plan.parts["pace_s"] > 0 and j / plan.iteration_s <= 2.9 * (1 + 1e-9)
    assert plan.iteration_s >= FE.pace_s(fleet, plan.paths) * (1 - 1e-12)
    pinned = FP.choose(fleet, pins=[F.Path(2, 7)], policy="hiertrain", cloud=True)  # the operator's paths, paced too
    assert pinned.parts["pace_s"] == pytest.approx(FE.pace_s(fleet, pinned.paths))
    (tmp_path / "bad.toml").write_text(text.replace("budget_w = 2.9", "budget_w = 0.0"))
    with pytest.raises(PlanError, match="device pi1: budget_w = 0.0 must be > 0 watts on average"):
        FF.load(tmp_path / "bad.toml")


# ---------------------------------------------------------------- the plan's accounting

def test_usage_of_a_fleet_step_by_hand():
    """One device trains unit 1 of 3, the edge unit 2, the cloud unit 3 (owner: the edge)."""
    plan = Plan(3, (Group("pi", "pi", 4, (Stage("pi", 1, 1), Stage("edge", 2, 2), Stage("cloud", 3, 3))),),
                ("edge",) * 3, "edge")
    costs = E.Costs({"pi": [1.0, 2.0, 3.0], "edge": [0.1, 0.2, 0.3], "cloud": [0.01, 0.02, 0.03]},
                    {"edge": [0.5, 0.5, 0.5]}, [100.0, 10.0, 20.0, 30.0], [1000.0, 2000.0, 3000.0])
    use = E.usage(plan, costs)
    # the device: 4 samples x 1 s; 4 x 10 B activations up + 1000 B gradients up, as much down (gradient, weights)
    assert (use["pi"].busy_s, use["pi"].sent, use["pi"].received) == (4.0, 1040.0, 1040.0)
    # the cloud: 4 x 0.03 s; 4 x 20 B in, gradient out, the weights of unit 3 in, its gradient out
    assert use["cloud"].busy_s == pytest.approx(0.12)
    assert (use["cloud"].sent, use["cloud"].received) == (3080.0, 3080.0)
    # the edge: 4 x 0.2 s + three updates; everything above crosses its interface once
    assert use["edge"].busy_s == pytest.approx(0.8 + 1.5)
    assert (use["edge"].sent, use["edge"].received) == (1040.0 + 3080.0, 1040.0 + 3080.0)


def test_device_to_cloud_traffic_crosses_the_edge_twice():
    plan = Plan(2, (Group("c", "device", 3, (Stage("device", 1, 1), Stage("cloud", 2, 2))),), ("device", "cloud"))
    costs = E.Costs({"device": [1.0, 1.0], "cloud": [1.0, 1.0]}, {}, [8.0, 4.0, 2.0], [0.0, 0.0])
    use = E.usage(plan, costs)
    assert (use["device"].sent, use["cloud"].received, use["edge"].received, use["edge"].sent) == (12, 12, 24, 24)
    assert use["edge"].busy_s == 0


def _schedules(n, batch):
    """Every O/S/L schedule of n units and a batch (small instances only)."""
    for o, s, l in itertools.permutations(TIERS):
        for m_s in range(n + 1):
            for m_l in range(m_s, n + 1):
                for b_s in range(batch + 1):
                    for b_l in range(batch + 1 - b_s):
                        if (b_s and not m_s) or (b_l and not m_l):
                            continue
                        yield Schedule(mapping={"o": o, "s": s, "l": l}, m_s=m_s, m_l=m_l,
                                       b_o=batch - b_s - b_l, b_s=b_s, b_l=b_l)


@pytest.mark.parametrize("seed", range(3))
def test_the_array_accounting_is_the_plan_models(seed):
    rng = np.random.default_rng(seed)
    profile = random_profile(rng, 4)
    tab = tables(profile, Bandwidth(8.0, 3.0))
    costs = E.Costs.of_profile(profile)
    scheds = list(_schedules(4, 3))
    for s in random.Random(seed).sample(scheds, 60):
        idx = [TIERS.index(s.mapping[r]) for r in ("o", "s", "l")]
        busy, sent, recv = E.osl_usage(tab, *idx, s.m_s, s.m_l, s.b_o, s.b_s, s.b_l)
        use = E.usage(s.plan(units=4, batch=3), costs, TIERS)
        for i, t in enumerate(TIERS):
            assert (busy[i], sent[i], recv[i]) == pytest.approx((use[t].busy_s, use[t].sent, use[t].received),
                                                                rel=1e-12, abs=1e-12), (s, t)


# ---------------------------------------------------------------- the three-tier planner

def _everything(profile, bw, batch, powers):
    """(seconds, joules per tier) of every schedule of HierTrain's space: O/S/L and chains."""
    n = profile.n_units
    out = []
    for s in _schedules(n, batch):
        t = iteration_time(profile, bw, s)
        if math.isfinite(t):
            out.append((t, E.schedule_joules(profile, bw, replace_t(s, t), powers=powers)))
    tiers, cuts, _ = _chains("jointdnn+", n)
    for c in cuts:
        s = chain_schedule(tiers, c, n, batch, policy="hiertrain")
        t = iteration_time(profile, bw, s)
        out.append((t, E.schedule_joules(profile, bw, replace_t(s, t), powers=powers)))
    return out


def replace_t(s, t):
    from dataclasses import replace

    return replace(s, iteration_s=t)


def _random_powers(rng):
    return {"device": PowerModel(rng.uniform(0.5, 3), rng.uniform(3.5, 10), rng.uniform(10, 500), rng.uniform(10, 300)),
            "edge": PowerModel(rng.uniform(5, 60), rng.uniform(60, 200), 2.0, 2.0),
            "cloud": PowerModel(rng.uniform(5, 60), rng.uniform(60, 200), 2.0, 2.0)}


@pytest.mark.parametrize("seed", range(4))
def test_the_energy_plans_equal_brute_force(seed):
    rng = random.Random(seed)
    for trial in range(3):
        profile = random_profile(np.random.default_rng(100 * seed + trial), rng.randint(2, 3))
        bw = Bandwidth(rng.uniform(0.5, 20), rng.uniform(0.5, 20))
        batch, powers = rng.randint(2, 4), _random_powers(rng)
        every = _everything(profile, bw, batch, powers)
        quickest = min(t for t, _ in every)
        deadline = quickest * rng.uniform(1.0, 3.0)
        within = [(t, j) for t, j in every if t <= deadline * (1 + 1e-12)]

        got = E.plan_three_tier(profile, bw, batch, E.Goal("energy", deadline_s=deadline), powers=powers)
        assert got.joules["device"] == pytest.approx(min(j["device"] for _, j in within), rel=1e-9)
        assert got.schedule.iteration_s <= deadline * (1 + 1e-12)

        got = E.plan_three_tier(profile, bw, batch, E.Goal("energy", deadline_s=deadline, scope="all"), powers=powers)
        assert sum(got.joules.values()) == pytest.approx(min(sum(j.values()) for _, j in within), rel=1e-9)

        budget = rng.uniform(min(j["device"] for _, j in every), max(j["device"] for _, j in every))
        got = E.plan_three_tier(profile, bw, batch, E.Goal("budget", budget_j={"device": budget}), powers=powers)
        assert got.schedule.iteration_s == pytest.approx(min(t for t, j in every if j["device"] <= budget), rel=1e-9)
        assert got.joules["device"] <= budget * (1 + 1e-9)

        # average watts: every schedule paced (its device's joules above idle over its spare watts)
        idle = powers["device"].idle_w
        fastest_w = min(every, key=lambda e: e[0])[1]["device"] / quickest
        watts = idle + rng.uniform(0.05, 1.0) * max(1e-6, fastest_w - idle)
        paced = [max(t, (j["device"] - idle * t) / (watts - idle)) for t, j in every]
        got = E.plan_three_tier(profile, bw, batch, E.Goal("budget", budget_w={"device": watts}), powers=powers)
        assert got.schedule.iteration_s == pytest.approx(min(paced), rel=1e-9)
        assert got.joules["device"] / got.schedule.iteration_s <= watts * (1 + 1e-9)
        assert got.schedule.extra.get("pace_s", got.schedule.iteration_s) == got.schedule.iteration_s

        got = E.plan_three_tier(profile, bw, batch, E.Goal("time"), powers=powers)
        assert got.schedule.iteration_s == pytest.approx(quickest, rel=1e-9)


def test_an_unmeetable_budget_or_deadline_is_one_clear_line():
    profile = random_profile(np.random.default_rng(3), 3)
    bw = Bandwidth(5.0, 5.0)
    with pytest.raises(PlanError, match=r"^no plan meets the device's budget of 0.001 J per step: the least it can "
                                        r"spend is [0-9.]+ J per step$"):
        E.plan_three_tier(profile, bw, 8, E.Goal("budget", budget_j={"device": 0.001}))
    with pytest.raises(PlanError, match=r"^no plan meets the deadline of 1e-06 s per step: the quickest takes"):
        E.plan_three_tier(profile, bw, 8, E.Goal("energy", deadline_s=1e-6))
    idle = E.tier_powers(profile)["device"].idle_w
    with pytest.raises(PlanError, match=rf"^no plan meets the device's budget of 1 W on average: its idle draw alone is "
                                        rf"{idle:g} W$"):
        E.plan_three_tier(profile, bw, 8, E.Goal("budget", budget_w={"device": 1.0}))
    for kwargs, match in [({"objective": "cheap"}, "unknown objective"), ({"objective": "budget"}, "needs a budget"),
                          ({"deadline_s": 0.0}, "deadline must be > 0"),
                          ({"objective": "budget", "budget_j": {"device": -1.0}}, "positive number of joules"),
                          ({"objective": "budget", "budget_w": {"device": 0.0}}, "positive number of watts")]:
        with pytest.raises(PlanError, match=match):
            E.Goal(**kwargs)


# ------------------------------------------------------------------------ the fleet

def _with_power(fleet, rng):
    from dataclasses import replace

    devices = []
    for d in fleet.devices:
        p = PowerModel(rng.uniform(0.5, 3), rng.uniform(3.5, 10), rng.uniform(10, 500), rng.uniform(10, 300))
        devices.append(replace(d, power=p))
    return replace(fleet, devices=tuple(devices))


def _every_fleet_plan(fleet):
    """(seconds, joules per machine) of every combination of paths."""
    out = []
    for chosen in itertools.product(*(F.paths(fleet, d) for d in fleet.devices)):
        plan = F.plan_of("x", fleet, chosen)
        out.append((plan.iteration_s, FE.fleet_joules(fleet, plan)))
    return out


@pytest.mark.parametrize("seed", range(4))
def test_the_budgeted_fleet_plan_equals_brute_force(seed):
    rng = random.Random(seed)
    checked = 0
    for _ in range(12):
        fleet = _with_power(F.random_fleet(rng, rng.randint(1, 3), rng.randint(1, 3)), rng)
        every = _every_fleet_plan(fleet)
        # each budget somewhere between the least and the most that device spends in some plan
        budgets = {d.name: rng.uniform(min(j[d.name] for _, j in every), max(j[d.name] for _, j in every))
                   for d in fleet.devices if rng.random() < 0.8}
        truth = min((t for t, j in every if all(j[n] <= b * (1 + 1e-12) for n, b in budgets.items())), default=math.inf)
        if not math.isfinite(truth):
            with pytest.raises(PlanError, match="no plan meets"):
                FE.fleet_budget(fleet, budgets)
            continue
        plan = FE.fleet_budget(fleet, budgets)
        assert plan.parts["optimal"]
        assert plan.iteration_s == pytest.approx(truth, rel=1e-9)
        joule = FE.fleet_joules(fleet, plan)
        assert all(joule[n] <= b * (1 + 1e-9) for n, b in budgets.items())
        checked += 1
    assert checked >= 4


@pytest.mark.parametrize("seed", range(4))
def test_the_paced_fleet_plan_under_average_watts_equals_brute_force(seed):
    """Budgets in average watts (per hour of training) pace the step: a plan's seconds are the longer of
    its own and every budgeted device's joules above idle over its spare watts. The planner's least
    paced seconds, alone and with joules-per-step budgets beside, equal brute force over every plan."""
    from dataclasses import replace

    rng = random.Random(100 + seed)
    checked = 0
    for _ in range(10):
        fleet = _with_power(F.random_fleet(rng, rng.randint(1, 3), rng.randint(1, 3)), rng)
        every = [(F.plan_of("x", fleet, chosen), FE.fleet_joules(fleet, F.plan_of("x", fleet, chosen)))
                 for chosen in itertools.product(*(F.paths(fleet, d) for d in fleet.devices))]
        # each device's average watts between its idle draw and what it draws in the fastest plan
        fastest = min(every, key=lambda e: e[0].iteration_s)
        watts = {d.name: d.power.idle_w + rng.uniform(0.05, 1.0) * max(1e-9, fastest[1][d.name] / fastest[0].iteration_s
                                                                      - d.power.idle_w)
                 for d in fleet.devices if rng.random() < 0.8}
        budgets = {d.name: rng.uniform(1.0, 3.0) * fastest[1][d.name] for d in fleet.devices if rng.random() < 0.3}
        held = replace(fleet, devices=tuple(replace(d, budget_w=watts.get(d.name)) for d in fleet.devices))

        def paced_s(plan):
            return max(plan.iteration_s, FE.pace_s(held, plan.paths))

        def keeps(plan):
            at = FE.fleet_joules(fleet, replace(plan, iteration_s=paced_s(plan)))
            return all(at[n] <= b * (1 + 1e-12) for n, b in budgets.items())

        truth = min((paced_s(p) for p, _ in every if keeps(p)), default=math.inf)
        if not math.isfinite(truth):
            with pytest.raises(PlanError, match="no plan meets"):
                FE.fleet_budget(fleet, budgets, watts=watts)
            continue
        plan = FE.fleet_budget(fleet, budgets, watts=watts)
        assert plan.parts["optimal"] and plan.iteration_s == pytest.approx(truth, rel=1e-9)
        # every budgeted device draws at most its watts on average over the paced step
        at = FE.fleet_joules(fleet, plan)
        for n, w in watts.items():
            assert at[n] / plan.iteration_s <= w * (1 + 1e-9)
        checked += 1
    assert checked >= 5
    d = fleet.devices[0]
    with pytest.raises(PlanError, match=f"^no plan meets {d.name}'s budget of 0.1 W on average: its idle draw alone"):
        FE.fleet_budget(fleet, {}, watts={d.name: 0.1})


def test_fleet_joules_are_the_plan_models():
    rng = random.Random(5)
    fleet = _with_power(F.random_fleet(rng, 3, 4), rng)
    plan = F.solve(fleet)
    joule = FE.fleet_joules(fleet, plan)
    for d, p in zip(fleet.devices, plan.paths):
        by_terms = d.power.idle_w * plan.iteration_s + FE.device_dynamic(fleet, d, p.m)
        assert joule[d.name] == pytest.approx(by_terms, rel=1e-12)
    assert joule["edge"] > CLASSES["server"].idle_w * plan.iteration_s * (1 - 1e-12)


@pytest.mark.process
def test_a_fleet_file_sets_power_classes_and_budgets_and_a_device_publishing_a_lower_budget_is_replanned(tmp_path):
    """A fleet file's [power.<class>] and [[device]] power / budget_j; a device that publishes its profile
    with a new budget_j changes the roster (the coordinator re-plans at its next step) and the plan it
    gets keeps to the budget; a bad class or budget is one line."""
    import json
    import subprocess
    import sys

    from conftest import ROOT
    from hiertrain.edge.roster import Roster
    from hiertrain.planner import fleetfile as FF
    from hiertrain.planner import fleetpolicies as FP
    from hiertrain.profile import Profile

    full = Profile.load(ROOT / "bench" / "profiles" / "lenet5.json").to_json()
    (tmp_path / "servers.json").write_text(json.dumps(full))
    text = ('profile = "servers.json"\nmedium_mbps = 20\ncloud_mbps = 5\n[power.pi3]\nbusy_w = 5.5\n'
            '[[device]]\nname = "pi1"\nprofile = "servers.json"\nsamples = 8\nrate_mbps = 10\npower = "pi3"\n'
            '[power.hungry]\nidle_w = 1.0\nbusy_w = 40.0\ntx_nj_per_bit = 10.0\nrx_nj_per_bit = 10.0\n'
            '[[device]]\nname = "pi2"\npower = "hungry"\n')
    path = tmp_path / "fleet.toml"
    path.write_text(text)
    file = FF.read(path)
    assert file.fleet.devices[0].power == PowerModel(1.9, 5.5, 283.0, 137.0, "pi3")
    roster = Roster(file, batch=16, where=path)
    fleet_object = {"samples": 4, "rate_mbps": 8.0}
    roster.on_profile("pi2", {**full, "fleet": fleet_object})
    assert roster.devices["pi2"].power.name == "hungry" and roster.devices["pi2"].budget_j is None
    fleet = roster.fleet_of(["pi1", "pi2"])
    fastest = FP.choose(fleet, pins=None, policy="hiertrain", cloud=True)
    least = min(j["pi2"] for _, j in _every_fleet_plan(fleet))
    spent = FE.fleet_joules(fleet, F.plan_of("x", fleet, fastest.paths))["pi2"]  # (budgets: the conservative step)
    assert least < spent  # the fastest plan is not the one that spends least on pi2
    revision = roster.revision
    budget = least + 0.5 * (spent - least)
    roster.on_profile("pi2", {**full, "fleet": {**fleet_object, "budget_j": budget}})  # its battery fell low
    assert roster.revision == revision + 1 and roster.devices["pi2"].budget_j == budget
    fleet = roster.fleet_of(["pi1", "pi2"])
    kept = FP.choose(fleet, pins=None, policy="hiertrain", cloud=True)
    if spent > budget:
        assert kept.paths != fastest.paths
    assert kept.policy == "hiertrain-budget" and FE.within_budgets(fleet, F.plan_of("x", fleet, kept.paths))
    roster.on_profile("pi2", {**full, "fleet": {**fleet_object, "budget_j": -1.0}})
    assert "budget_j = -1.0 must be > 0" in roster._reasons["pi2"] and "pi2" not in roster.devices

    out = subprocess.run([sys.executable, "-m", "hiertrain", "plan-fleet", str(path), "--energy-budget", "50",
                          "--json"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["devices"][0]["budget_j"] == 50 and got["devices"][0]["joules"] <= 50
    assert set(got["joules"]) == {"pi1", "edge", "cloud"} and set(got["baselines_joules"]) == set(FP.POLICIES[1:])
    out = subprocess.run([sys.executable, "-m", "hiertrain", "plan-fleet", str(path), "--energy-budget-w", "2.0",
                          "--json"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)  # pi1 (a pi3: 1.9 W idle) paced to 2 W on average
    assert got["devices"][0]["budget_w"] == 2.0 and got["devices"][0]["watts"] <= 2.0 * (1 + 1e-9)
    assert got["parts"]["pace_s"] == pytest.approx(got["iteration_s"])
    for bad, why in ((text.replace('power = "pi3"', 'power = "pi9"'), "unknown device class 'pi9'"),
                     (text.replace("busy_w = 5.5", "busy_w = 0.5"), "below idle_w"),
                     (text.replace('power = "pi3"', 'budget_j = -2.0'), "budget_j = -2.0 must be > 0"),
                     (text.replace('power = "pi3"', 'budget_w = 1.0'), "pi1's budget of 1 W on average: its idle")):
        (tmp_path / "bad.toml").write_text(bad)
        out = subprocess.run([sys.executable, "-m", "hiertrain", "plan-fleet", str(tmp_path / "bad.toml")],
                             capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert out.returncode == 1 and why in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    out = subprocess.run([sys.executable, "-m", "hiertrain", "plan-fleet", str(path), "--energy-budget", "0.001"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 1 and "no plan meets pi1's budget of 0.001 J per step" in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


@pytest.mark.integration
def test_every_tiers_telemetry_carries_its_joules_and_a_low_battery_replans_within_two_steps(cluster, tmp_path):
    """A real job on Mosquitto with the planner service: each tier reports each step's joules (modeled:
    no RAPL here) at no less than its idle draw; the device (as fast as the edge, but drawing 40 W
    busy, on a wire) has a budget of 50 J per step until its battery file reads below 20 %, then
    0.055 J: the planner moves its work off it, in effect two steps after the report, within the budget."""
    import json
    from dataclasses import replace

    from conftest import ROOT
    from hiertrain.profile import Profile

    full = Profile.load(ROOT / "bench" / "profiles" / "lenet5.json")
    hungry = {"class": "pi4", "busy_w": 40.0, "tx_nj_per_bit": 10.0, "rx_nj_per_bit": 10.0}
    device = replace(full.tiers["edge"], extra={"power": hungry})
    profile = tmp_path / "hungry.json"
    profile.write_text(json.dumps(Profile(full.model, full.sample_bytes, full.layers,
                                          {**full.tiers, "device": device}).to_json()))
    battery = tmp_path / "capacity"
    battery.write_text("80\n")
    c = cluster(iterations=400, timeout_s=30, batch=16, energy={
        "device": {"power": "pi4", "busy_w": 40.0, "tx_nj_per_bit": 10.0, "rx_nj_per_bit": 10.0, "budget_j": 50.0,
                   "battery": str(battery), "low_pct": 20.0, "low_budget_j": 0.055},
        "edge": {"power": "server"}, "cloud": {"power": "server", "idle_w": 30.0}})
    c.start_planner(profile, bw_device_edge=100.0, bw_edge_cloud=100.0)
    c.start()
    c.wait_iteration(8)
    battery.write_text("15\n")  # the battery falls low
    codes = c.wait(timeout=180)
    assert codes == {"device": 0, "edge": 0, "cloud": 0}, {t: c.log(t)[-2000:] for t in TIERS}
    idle = {"device": 2.7, "edge": 50.0, "cloud": 30.0}
    for tier in TIERS:
        steps = [p for a, p in c.telemetry if a == tier and "energy" in p]
        assert steps, tier
        for p in steps:
            e = p["energy"]
            assert e["source"] == {"device": "model:pi4*", "edge": "model:server", "cloud": "model:server*"}[tier], e
            assert e["joules"] >= idle[tier] * p["iteration_s"] - 1e-6, (tier, p)  # (rounded to the microjoule)
    low = min(p["iteration"] for a, p in c.telemetry if a == "device" and p.get("budget_j") == 0.055)
    budgeted = [s for s in c.schedules if s.get("budget_j") == 0.055]
    assert budgeted, c.schedules
    # in effect two steps after the newest step the planner heard of: the device's report of step `low`,
    # or an edge's of step low + 1 that overtook it (the device had begun low + 1 before publishing)
    assert budgeted[0]["effective_iteration"] <= low + 1 + 2
    assert budgeted[0]["joules"]["device"] <= 0.055 and "device" not in budgeted[0]["mapping"]["o"]
    last = next(s for s in c.schedules if s["version"] == c.versions()[399])  # (re-planned on measured rates too)
    assert last["budget_j"] == 0.055 and last["joules"]["device"] <= 0.055  # kept to the budget to the end
    assert c.schedules[0]["mapping"]["o"] == "device"  # before: the device trained everything


@pytest.mark.integration
def test_a_three_tier_device_with_average_watts_runs_paced_steps(cluster):
    """A real job on Mosquitto with the planner service: the device (a Pi 4's power model) may draw
    2.9 W on average; the planner's schedule is paced (its pace_s), and the device holds every step
    under it to at least pace_s, so its measured watts stay within the budget."""
    import statistics

    from conftest import ROOT

    c = cluster(iterations=24, timeout_s=30, batch=16, energy={"device": {"power": "pi4", "budget_w": 2.9}})
    c.start_planner(ROOT / "bench" / "profiles" / "lenet5.json", bw_device_edge=100.0, bw_edge_cloud=100.0)
    c.start()
    codes = c.wait(timeout=180)
    assert codes == {"device": 0, "edge": 0, "cloud": 0}, {t: c.log(t)[-2000:] for t in TIERS}
    paced = [s for s in c.schedules if s.get("pace_s")]
    assert paced and all(s["budget_w"] == 2.9 for s in paced), c.schedules
    first = min(s["effective_iteration"] for s in paced)
    pace = min(s["pace_s"] for s in paced)
    held = [p for a, p in c.telemetry if a == "device" and "energy" in p and p["iteration"] > first + 1]
    assert len(held) >= 10, held
    assert statistics.median(p["iteration_s"] for p in held) >= 0.95 * pace  # (a sleep ends no sooner)
    drawn = sum(p["energy"]["joules"] for p in held) / sum(p["iteration_s"] for p in held)
    assert drawn <= 2.9 * 1.1, drawn  # what the device's meter says it drew, paced


@pytest.mark.parametrize("seed", range(3))
def test_the_least_energy_fleet_plan_within_a_deadline_equals_brute_force(seed):
    rng = random.Random(seed)
    for _ in range(6):
        fleet = _with_power(F.random_fleet(rng, rng.randint(1, 3), rng.randint(1, 3)), rng)
        every = [(t, sum(j[d.name] for d in fleet.devices)) for t, j in _every_fleet_plan(fleet)]
        deadline = min(t for t, _ in every) * rng.uniform(1.0, 2.0)
        plan = FE.fleet_energy(fleet, deadline)
        joule = FE.fleet_joules(fleet, plan)
        assert plan.parts["optimal"] and plan.iteration_s <= deadline * (1 + 1e-9)
        assert sum(joule[d.name] for d in fleet.devices) == pytest.approx(
            min(j for t, j in every if t <= deadline * (1 + 1e-12)), rel=1e-9)
    with pytest.raises(PlanError, match="^no plan meets the deadline of 1e-09 s per step: the quickest takes"):
        FE.fleet_energy(fleet, 1e-9)
    with pytest.raises(PlanError, match="plan with a budget per device instead"):
        FE.fleet_energy(F.random_fleet(rng, 8, 6), 1.0)


@pytest.mark.integration
def test_a_fleet_device_reports_its_joules_and_its_low_battery_is_replanned_within_two_steps(tmp_path):
    """A fleet over real Mosquitto: pi2 joins with its own profile and [energy] (a radio of 100 nJ/bit,
    1 kW busy: its cheapest path sends its raw samples). Every worker's telemetry carries its own joules
    per step, at no less than its idle draw. When pi2's battery file reads below 20 %, it may draw
    0.035 W on average: it publishes the new budget, and the edge's plan in effect no more than two
    steps after that report is paced (each step held to the seconds that keep pi2's watts), to the
    end; every step is still single-process SGD."""
    import statistics

    from hiertrain.lab.cluster import Cluster
    from hiertrain.lab.jobs import Fleet, Spec
    from hiertrain.lab.replay import rel, replay, step_log

    battery = tmp_path / "capacity"
    battery.write_text("80\n")
    frugal = {"power": "pi4", "idle_w": 0.01, "busy_w": 1000.0, "tx_nj_per_bit": 100.0, "rx_nj_per_bit": 100.0,
              "battery": str(battery), "low_pct": 20.0, "low_budget_w": 0.035}
    devices = [Spec("pi1", 4), Spec("pi2", 3, joins=True, energy=frugal)]
    with Cluster(tmp_path, Fleet(devices, iterations=40, timeout_s=60)) as c:
        c.start("cloud", "edge", "pi1", "pi2")
        c.wait_until(lambda row: "pi2" in [m[0] for m in row["fleet"]])
        battery.write_text("15\n")  # the battery falls low
        codes = c.wait(("edge", "cloud", "pi1", "pi2"), timeout=180)
        assert codes == dict.fromkeys(codes, 0), {n: c.log(n)[-2000:] for n in codes}
        c.pump()
        for name, source in (("pi1", "model:pi4"), ("pi2", "model:pi4*")):  # (the cloud: in no path here)
            steps = [p for a, p in c.telemetry if a == name and "energy" in p]
            assert steps, name
            idle = {"pi1": 2.7, "pi2": 0.01}[name]
            for p in steps:
                assert p["energy"]["source"] == source and p["energy"]["joules"] >= idle * p["iteration_s"] - 1e-6, p
        log = step_log(c)
        assert [row["step"] for row in log] == list(range(40))
        reported = min(p["iteration"] for a, p in c.telemetry if a == "pi2" and p.get("budget_w") == 0.035)
        first = min(row["step"] for row in log if "pi2" in [m[0] for m in row["members"]])
        before, after = log[first]["predicted_s"], [row for row in log if row["step"] > reported + 2]
        assert len(after) >= 10 and all(row["version"] > log[first]["version"] for row in after)
        pace = after[0]["predicted_s"]
        assert pace > 2 * before and all(row["predicted_s"] == pace for row in after)  # paced, to the end
        assert statistics.median(row["seconds"] for row in after) >= 0.95 * pace  # held that long
        assert f"paced to {pace:.4f} s for average-watts budgets" in c.log("edge")
        assert "pi2 publishes a new profile: 3 samples per step, radio 20 Mbit/s, power custom, budget 0.035 W on " \
            "average" in c.log("edge"), c.log("edge")[-3000:]
        drawn = [p for a, p in c.telemetry if a == "pi2" and "energy" in p and p["iteration"] > reported + 2]
        assert sum(p["energy"]["joules"] for p in drawn) / sum(p["iteration_s"] for p in drawn) <= 0.035 * 1.1
        losses, params = replay(c)
        np.testing.assert_allclose([row["loss"] for row in log], losses, rtol=1e-4)
        assert rel(c.final_checkpoint().params, params) < 1e-4
