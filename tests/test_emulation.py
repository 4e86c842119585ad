"""The emulation's calibration arithmetic and the report built from bench results (pure, no root)."""

import argparse
import json

import pytest

from hiertrain.lab import emulation
from hiertrain.bench import report
from hiertrain.errors import ConfigError



def test_quotas_turn_probe_timings_into_the_target_ratios():
    # cloud 0.1 ms/sample; at the probe quotas the edge took 0.2 ms and the device 0.5 ms
    times = {"cloud": 1e-4, "edge": 2e-4, "device": 5e-4}
    q = emulation.quotas_for(times, {"edge": 0.5, "device": 0.2}, {"device": 1, "edge": 4, "cloud": 40})
    # edge must take 10x the cloud (1 ms): 0.5 * 0.2 / 1.0; device 40x (4 ms): 0.2 * 0.5 / 4
    assert q == {"edge": pytest.approx(0.1), "device": pytest.approx(0.025)}
    # never below the kernel's useful floor, never above one core
    assert emulation.quotas_for(times, {"edge": 0.5, "device": 0.2}, {"device": 1, "edge": 1, "cloud": 1e6})["device"] == 0.01
    assert emulation.quotas_for(times, {"edge": 0.5, "device": 0.2}, {"device": 400, "edge": 4, "cloud": 40})["device"] == 1.0


def test_a_device_splits_into_an_interpreter_quota_and_a_kernel_dilation():
    # kernels as slow as a 0.025-core quota gives; an interpreter 10x slower than a core here: a 0.1-core
    # quota, and every kernel run stretched 4x (0.1 / 0.025) to keep the kernels where they were
    assert emulation.split(0.025, 10.0) == (0.1, 4.0)
    assert emulation.split(0.025, None) == (0.025, 1.0)  # one calibration: the quota alone
    assert emulation.split(0.025, 50.0) == (0.025, 1.0)  # an interpreter slower than the kernels: no dilation
    assert emulation.split(0.5, 0.5) == (1.0, 2.0)       # never above one core
    # the fitted message cost takes the framework's stretch (the quota's), not the dilated kernels'
    from hiertrain.bench.testbed import message_costs

    measured = {"device": (0.001, 40.0), "edge": (0.0005, 8.0), "cloud": None}
    assert message_costs(measured) == {"device": 0.04, "edge": 0.004, "cloud": 0.0005}
    assert message_costs(measured, {"device": 4.0}) == {"device": 0.01, "edge": 0.004, "cloud": 0.0005}


@pytest.mark.parametrize("text", ["1:4", "1:x:40", "0:4:40", "", "1:4:-40"])
def test_bad_speed_ratios_are_refused(text):
    with pytest.raises(ConfigError, match="device:edge:cloud"):
        emulation.parse_speeds(text)


def _row(policy, bw, measured, predicted, plan=None, phase="sweep", schedule=""):
    return {"phase": phase, "policy": policy, "bw_edge_cloud": bw, "measured_s": measured, "predicted_s": predicted,
            "predicted_paper_s": predicted * 2, "predicted_measured_rates_s": predicted, "network_compute_s": predicted,
            "schedule": schedule or f"{policy}: something", "plan": plan, "link_rates": {}}


def test_report_sets_our_ratios_beside_the_papers_and_spots_identical_placements(tmp_path):
    device_all = {"mapping": {"o": "device", "s": "edge", "l": "cloud"}, "b_o": 8, "b_s": 0, "b_l": 0, "m_s": 0, "m_l": 0}
    chain = {**device_all, "plan": {"kind": "chain", "stages": [["device", 1, 7]], "compress_bits": 0}}
    hybrid = {**device_all, "b_o": 6, "b_s": 2, "m_s": 2}  # the device trains 6 samples, the edge 2 through units 1..2
    rows = [_row("hiertrain", 1.5, 0.25, 0.24, device_all), _row("all-cloud", 1.5, 2.0, 2.1),
            _row("all-edge", 1.5, 0.5, 0.5), _row("jointdnn", 1.5, 0.24, 0.24, chain),
            _row("hiertrain", 5.0, 0.2, 0.2, hybrid, schedule="hiertrain: o=device (b_o=6), s=edge (units 1..2, b_s=2)"),
            _row("all-cloud", 5.0, 0.5, 0.5, {**device_all, "mapping": {"o": "cloud", "s": "device", "l": "edge"}}),
            _row("all-edge", 5.0, 0.3, 0.3, {**device_all, "mapping": {"o": "edge", "s": "device", "l": "cloud"}})]
    from hiertrain.bench.testbed import summary

    result = {"model": "lenet5", "batch": 8, "bw_device_edge": 5.0, "rows": rows, "summary": summary(rows),
              "emulation": {"quotas": {}, "measured_speeds": {"device": 1, "edge": 4, "cloud": 40}},
              "calibration": {"overhead_s": {"device": 0.1, "edge": 0, "cloud": 0}}}
    (tmp_path / "testbed-lenet5.json").write_text(json.dumps(result))
    out = report.bench(argparse.Namespace(results=str(tmp_path)))
    text = (tmp_path / "REPORT.md").read_text()
    assert out["models"] == ["lenet5"]
    assert ("Paper: up to 6.9x over All-Cloud and 1.7x over All-Edge. Ours: up to 8.00x over all-cloud (at 1.5 "
            "Mbit/s, hiertrain ran all on the device); up to 2.00x over all-edge (at 1.5 Mbit/s, hiertrain ran all on "
            "the device).") in text
    assert ("Hybrid plans (work on more than one tier) chosen by hiertrain: 5.0 Mbit/s, hybrid (o=device (b_o=6), "
            "s=edge (units 1..2, b_s=2)): 1.50x the best single-tier plan measured.") in text
    assert "different placement was faster than hiertrain: none" in text
    assert "1 baseline runs chose hiertrain's placement" in text  # jointdnn's one-stage chain = all on the device


def test_replan_analysis_finds_the_new_placement_and_where_time_settled():
    from hiertrain.bench.replan import analyse
    from hiertrain.schedule import Schedule

    def sched(o, version, effective):
        others = [t for t in ("device", "edge", "cloud") if t != o]
        return Schedule(mapping={"o": o, "s": others[0], "l": others[1]}, m_s=0, m_l=0, b_o=16, b_s=0, b_l=0,
                        iteration_s=1.0).versioned(version, effective).to_json()

    timeline = [{"iteration": i, "seconds": s, "version": v} for i, s, v in
                [(1, 1.4, 1), (2, 1.4, 1), (3, 4.5, 2), (4, 4.5, 2), (5, 300.0, 3), (6, 2.4, 3), (7, 2.2, 3), (8, 2.0, 3)]]
    record = {"drop_iteration": 3, "optimum_after_measured_s": 2.0, "timeline": timeline,
              "schedules": [sched("cloud", 1, 0), sched("cloud", 2, 3), sched("edge", 3, 5)]}  # v2: same placement
    out = analyse(record)
    assert out["replans"] == 2 and out["new_placement_version"] == 3 and out["new_placement_in_effect_at"] == 5
    assert out["iterations_from_drop_to_new_placement"] == 2 and out["handover_iteration_s"] == 300.0
    assert out["settled_s"] == pytest.approx(2.1) and out["settled_over_optimum"] == pytest.approx(1.05)


def test_the_report_says_when_a_link_change_left_nothing_to_re_plan():
    from hiertrain.bench.replan import analyse
    from hiertrain.schedule import Schedule

    def sched(o, version):
        others = [t for t in ("device", "edge", "cloud") if t != o]
        return Schedule(mapping={"o": o, "s": others[0], "l": others[1]}, m_s=0, m_l=0, b_o=32, b_s=0, b_l=0,
                        iteration_s=0.2).versioned(version, 0 if version == 1 else 11).to_json()

    timeline = [{"iteration": i, "seconds": 0.2 if i < 12 else (4.0 if i == 12 else 0.19), "version": 1 if i < 12 else 2}
                for i in range(1, 20)]
    moved = {"model": "lenet5", "link": "device_edge", "before": 5.0, "after": 0.5, "drop_iteration": 9,
             "first_telemetry_after_drop_s": 1.2, "optimum_after_predicted_s": 0.2, "optimum_after_measured_s": None,
             "optimum_after_plan": "hiertrain: o=device (b_o=32)", "timeline": timeline,
             "schedules": [sched("edge", 1), sched("device", 2)]}
    moved.update(analyse(moved))
    text = "\n".join(report.replan_section(moved, "replan-lenet5.png"))
    assert "## Live re-planning (lenet5, device-edge link)" in text and "5.0 -> 0.5 Mbit/s" in text
    assert "in effect from iteration 12, 3 iterations after the drop" in text and "took 4.0 s" in text
    assert "against a predicted optimum of 0.2 s (the sweep did not run these rates)" in text
    assert "None" not in text
    same = {**moved, "schedules": [sched("edge", 1)]}
    same.update(analyse(same))
    text = "\n".join(report.replan_section(same, "replan-lenet5.png"))
    assert "re-planned 0 time(s). No schedule with a new placement was published" in text and "None" not in text


def test_the_testbed_row_says_whether_a_multi_tier_run_beat_every_single_tier_one():
    from hiertrain.bench.readme import testbed, tiers_of

    edge = {"mapping": {"o": "edge", "s": "device", "l": "cloud"}, "m_s": 0, "m_l": 0, "b_o": 32, "b_s": 0, "b_l": 0}
    hybrid = {**edge, "m_s": 1, "m_l": 1, "b_o": 24, "b_s": 8}
    chain = {**edge, "plan": {"kind": "chain", "stages": [["edge", 1, 5], ["cloud", 6, 7]]}}
    assert tiers_of(edge) == {"edge"} and tiers_of(hybrid) == {"edge", "device"} and tiers_of(chain) == {"edge", "cloud"}
    rows = [{"phase": "sweep", "bw_edge_cloud": 1.5, "policy": "hiertrain", "measured_s": 0.20, "plan": edge},
            {"phase": "sweep", "bw_edge_cloud": 1.5, "policy": "jalad", "measured_s": 0.15, "plan": chain},
            {"phase": "sweep", "bw_edge_cloud": 3.0, "policy": "hiertrain", "measured_s": 0.20, "plan": hybrid},
            {"phase": "sweep", "bw_edge_cloud": 3.0, "policy": "all-edge", "measured_s": 0.20, "plan": edge},
            {"phase": "fit", "bw_edge_cloud": 3.0, "policy": "all-edge", "measured_s": 0.01, "plan": edge}]
    r = {"rows": rows, "batch": 32, "bw_device_edge": 5.0, "model": "lenet5",
         "emulation": {"measured_speeds": {"device": 1.0, "edge": 4.0, "cloud": 40.0}}}
    text = testbed(r)
    assert "1.5 Mbit/s: hiertrain 0.200 s on edge, best single-tier hiertrain 0.200 s; fastest multi-tier: jalad " \
           "0.150 s (**25% faster than every single-tier run**)" in text
    assert "3 Mbit/s: hiertrain 0.200 s on device+edge, best single-tier all-edge 0.200 s; fastest multi-tier: " \
           "hiertrain 0.200 s (within 5% of it: a tie)" in text  # (fit rows are not judged)


def test_the_idle_devices_loop_is_its_cpu_per_step_stretched_and_never_negative():
    from hiertrain.bench.testbed import idle_loop

    reports = [("device", {"schedule_version": 2, "iteration": i, "cpu_s": c})
               for i, c in enumerate([0.5, 0.004, 0.006, 0.005, 0.003, 0.005])]  # (the first 3 are warm-up)
    reports += [("edge", {"schedule_version": 2, "iteration": i, "cpu_s": 9.0}) for i in range(6)]
    assert idle_loop(reports, [2], stretch=20.0, dilation=2.0) == pytest.approx(0.005 * 20 / 2)
    assert idle_loop(reports, [3], stretch=20.0) == 0.0  # no run of that version: no floor
