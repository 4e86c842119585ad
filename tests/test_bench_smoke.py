"""Every benchmark runs end to end (``hiertrain bench <which> --quick``): its JSON has its figures,
its README row renders from that JSON, and ``bench report`` refuses to quote a quick run.

The wire, planner, testbed, sync, hierarchy, families and failover benchmarks have their own tests
(test_cli, test_testbed, test_periodic, test_hierarchy, test_families, test_failover). ``bench fleet``
and ``bench energy --testbed`` have none: their smallest run on the fleet testbed profiles every
device class under its CPU quota and took minutes (their job is test_fleet's and test_energy's)."""

import json
import subprocess

import pytest

from conftest import PYTHON, ROOT
from hiertrain.bench import readme
from hiertrain.lab import cgroup, testbed

HIERTRAIN = [PYTHON, "-m", "hiertrain"]
LENET_TESTBED = str(ROOT / "bench" / "results" / "testbed-lenet5.json")  # a committed calibration to build on
ROOTED = pytest.mark.skipif(testbed.available() is not None or cgroup.available() is not None,
                            reason=f"needs root: {testbed.available() or cgroup.available()}")


def bench(tmp_path, which, *args, timeout=900, name=None):
    out = tmp_path / f"{which}.json"
    r = subprocess.run(HIERTRAIN + ["bench", which, "--quick", "--out", str(out), *args],
                       capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["bench"] == (name or which) and data["quick"] is True
    assert json.loads(r.stdout) == data  # what it prints is what it keeps
    return data


def row(data, name=None):
    text = getattr(readme, (name or data["bench"]).replace("-", "_"))(data)
    assert text and "None" not in text and "nan" not in text
    return text


@pytest.mark.process
def test_samplecodec_profile_and_segments(tmp_path):
    codec = bench(tmp_path, "samplecodec", "--repeat", "1")
    assert codec["rows"] and row(codec)
    prof = bench(tmp_path, "profile", "--repeat", "1")
    assert row(prof)
    seg = bench(tmp_path, "segments", "--repeat", "1")
    assert [r["model"] for r in seg["recompute"]] == ["lenet5"] and seg["build"]["lenet5"]["ranges"] == 28
    assert seg["split_ratio_max"] > 0 and "meets_goal" in seg and row(seg)


@pytest.mark.process
def test_fleet_planner_exact_and_at_scale(tmp_path):
    small = bench(tmp_path, "fleet-planner", "--repeat", "1")
    assert small["exact"]["equal_to_brute_force"] == small["exact"]["instances"] == 20
    assert list(small["summary"]) == ["4x8"] and row(small)
    assert (tmp_path / "fleet-planner.png").is_file()
    scale = bench(tmp_path, "fleet-planner", "--edges", "2", "--devices", "20", name="fleet-planner-scale")
    assert row(scale)


@pytest.mark.process
def test_dashboard_state_poll_and_page(tmp_path):
    data = bench(tmp_path, "dashboard")
    assert [r["hours"] for r in data["rows"]] == [0.01, 0.02] and data["devices_drawn"] == data["devices"]
    assert row(data)


@pytest.mark.integration
def test_transport_and_broker_capacity(tmp_path):
    data = bench(tmp_path, "transport", "--size-mb", "1", "--count", "3", "--repeat", "1")
    assert data["raw_mb_s"] > 0 and data["hiertrain_mb_s"] > 0 and row(data)
    data = bench(tmp_path, "broker", "--devices", "1")
    assert [r["received"] for r in data["capacity"]] == [r["messages"] for r in data["capacity"]]
    assert data["fleet"]["steps"] > 0 and row(data)


@pytest.mark.integration
def test_runtime_and_deviceloop(tmp_path):
    data = bench(tmp_path, "runtime")
    assert len(data["rows"]) == 5 and all(r["measured_s"] > 0 for r in data["rows"]) and row(data)
    data = bench(tmp_path, "deviceloop")
    native = data["runs"]["native"]
    assert native["all-device"]["framework_cpu_share"] > 0 and data["runs"]["pi3"] == {"skipped": "--quick"}
    assert data["meets_goal"] in (True, False) and row(data)


@pytest.mark.integration
def test_hostile_floods_a_lost_worker_o_and_a_broker_crash(tmp_path):
    data = bench(tmp_path, "hostile")
    assert all(f["training_continued"] for f in data["floods"]) and data["lost_worker_o"]["both_name_the_cloud"]
    crash = data["broker_crash"]
    assert crash["iterations_completed"] == crash["iterations_planned"] and set(crash["exit_codes"].values()) == {0}
    assert row(data)


@pytest.mark.process
def test_energy_front_from_the_cost_model(tmp_path):
    data = bench(tmp_path, "energy", "--devices", "2", "--medium", "20")
    assert [r["medium_mbps"] for r in data["rows"]] == [20.0] and data["rows"][0]["front"] and row(data)


@pytest.mark.integration
@ROOTED
def test_replan_and_edgecores_on_the_testbed(tmp_path):
    data = bench(tmp_path, "replan", "--from", LENET_TESTBED, "--points", "3,1.5", "--count", "4")
    assert data["schedules"] and data["timeline"] and row(data)
    data = bench(tmp_path, "edgecores", "--from", LENET_TESTBED, "--cores", "1,2", "--points", "3", "--count", "3")
    assert [r["edge_cores"] for r in data["rows"]] == [1, 2] and all(r["measured_s"] for r in data["rows"])
    assert row(data)


def test_a_quick_run_is_never_quoted(tmp_path):
    from hiertrain.bench import load
    from hiertrain.errors import ConfigError

    (tmp_path / "wire.json").write_text(json.dumps({"bench": "wire", "quick": True}))
    with pytest.raises(ConfigError, match="--quick run"):
        load(tmp_path / "wire.json")
    with pytest.raises(ConfigError, match="--quick run"):
        readme.table(tmp_path)


def test_a_broker_figure_too_small_to_register_is_said_not_crashed():
    from hiertrain.bench.readme import broker

    cap = {"bytes": 1024, "broker_us_per_message": 0.0, "one_core_messages_per_s": None, "one_core_mb_s": None}
    r = {"clients": 1, "capacity": [cap], "cpu_model": {"us_per_delivery": 0.0, "us_per_kb": 0.8},
         "fleet": {"devices": 1, "steps_per_s": 10.0, "per_device_step": {"messages_in": 3.7, "kb_in": 12.7}},
         "device_step_us": 10.0, "device_steps_per_s": 1e5}
    assert "1 KB: too few messages for the broker's CPU to register" in broker(r)
