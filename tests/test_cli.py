"""The hiertrain command line: bad input gives one line and a non-zero exit; commands do their job."""

import json
import shutil
import os
import subprocess

import pytest

from conftest import PYTHON, ROOT
from hiertrain.net import topics

HIERTRAIN = [PYTHON, "-m", "hiertrain"]
pytestmark = pytest.mark.process


def run(*args, timeout=120):
    return subprocess.run(HIERTRAIN + list(args), capture_output=True, text=True, timeout=timeout, cwd=ROOT)


@pytest.mark.parametrize("args,needle", [
    (["broker", "init"], "--dir"),
    (["broker", "init", "--dir", "x", "--port", "70000"], "port 70000"),
    (["broker", "start", "--dir", "/nonexistent/broker"], "not a broker directory"),
    (["nonsense"], "invalid choice"),
    (["schedule", "watch", "--config", "/nonexistent.toml"], "does not exist"),
    (["bench", "wire", "--count", "0"], "must be at least 1"),
    (["bench", "families"], "--data FILE.npz"),
    (["bench", "families", "--data", "x.csv"], "--data FILE.npz"),
    (["bench", "families", "--data", "/nonexistent.npz"], "cannot read /nonexistent.npz"),
    (["bench", "families", "--optimizer", "rmsprop"], "invalid choice: 'rmsprop'"),
    (["bench", "families", "--library", "timm"], "invalid choice: 'timm'"),
    (["bench", "sync"], "bench sync needs --data D.npz"),
    (["bench", "hierarchy", "--data", "/nonexistent.npz"], "bench hierarchy needs --data D.npz"),
    (["bench", "hierarchy", "--wan", "0"], "must be greater than 0"),
    (["demo", "--optimizer", "adam"], "invalid choice: 'adam'"),
])
def test_bad_arguments_exit_nonzero_with_one_line(args, needle):
    r = run(*args)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], r.stderr


def test_the_parsers_optimizers_are_the_trainers():
    from hiertrain.cli import OPTIMIZERS
    from hiertrain.train.optim import KINDS

    assert OPTIMIZERS == KINDS


def test_broker_init_and_install_service(tmp_path):
    d = tmp_path / "b"
    r = run("broker", "init", "--dir", str(d), "--port", "18999")
    assert r.returncode == 0, r.stderr
    conf = (d / "mosquitto.conf").read_text()
    assert "allow_anonymous false" in conf and "listener 18999" in conf and "max_packet_size" in conf
    assert sorted(p.name for p in (d / "credentials").iterdir()) == [
        "cloud.json", "device.json", "edge.json", "observer-mosquitto", "observer.json", "planner.json"]
    units = tmp_path / "units"
    units.mkdir()
    r = run("broker", "install-service", "--dir", str(d), "--unit-dir", str(units))
    if os.geteuid() == 0:  # the directory is root's: no unit runs as root
        assert r.returncode == 1 and "refusing a unit that runs as root" in r.stderr, r.stderr
        r = run("broker", "install-service", "--dir", str(d), "--unit-dir", str(units), "--user", "nobody")
    assert r.returncode == 0, r.stderr
    unit = (units / "hiertrain-broker.service").read_text()
    assert "ExecStart=" in unit and f"broker start --dir {d}" in unit and "Restart=on-failure" in unit
    assert run("broker", "init", "--dir", str(d)).returncode == 1  # would replace accounts


@pytest.mark.integration
def test_schedule_watch_prints_newest_versions_only(mosquitto, broker_dir, connect, tmp_path):
    cfg = tmp_path / "watch.toml"
    cfg.write_text(f'job = "t"\n[broker]\ncredentials = "{broker_dir.credentials_file("cloud")}"\n')
    planner = connect("planner")
    sched = {"policy": "hiertrain", "cost_model": "paper", "mapping": {"o": "cloud", "s": "device", "l": "edge"},
             "m_s": 1, "m_l": 2, "b_o": 4, "b_s": 2, "b_l": 2, "iteration_s": 0.5, "solve_s": 0.001,
             "version": 2, "effective_iteration": 10}
    planner.publish_json(topics.schedule("t"), sched, retain=True)
    planner.flush()
    proc = subprocess.Popen(HIERTRAIN + ["schedule", "watch", "--config", str(cfg), "--count", "2", "--timeout", "20",
                                         "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        first = json.loads(proc.stdout.readline())
        assert first["version"] == 2 and first["mapping"]["o"] == "cloud"
        planner.publish_json(topics.schedule("t"), {**sched, "version": 1}, retain=True)  # older: ignored
        planner.publish_json(topics.schedule("t"), {**sched, "version": 3, "m_l": 3}, retain=True)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert [json.loads(line)["version"] for line in out.splitlines()] == [3]
    assert "ignored schedule version 1" in err


def test_bench_wire_reports_its_goal(tmp_path):
    out = tmp_path / "wire.json"
    r = run("bench", "wire", "--size-mb", "1", "--count", "3", "--repeat", "2", "--out", str(out))
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    assert data["bench"] == "wire" and data["tensor_roundtrip_gbps"] > 0 and "meets_goal" in data


def test_bench_check_exits_1_naming_the_goal_a_benchmark_missed(monkeypatch, capsys):
    import argparse

    from hiertrain import bench, commands

    for result, code in (({"bench": "x", "meets_goal": True}, 0), ({"bench": "x", "meets_goal": False}, 1),
                         ({"bench": "x", "meets_goals": False}, 1), ({"bench": "x"}, 0)):
        monkeypatch.setattr(bench, "run", lambda which, args, result=result: result)
        assert commands.cmd_bench(argparse.Namespace(which="x", out=None, check=True)) == code
        err = capsys.readouterr().err
        assert (err.strip() == "hiertrain: bench x: goal not met (" + next(iter(k for k in result if k.startswith("meets"))) +
                " is false)") if code else not err
        assert commands.cmd_bench(argparse.Namespace(which="x", out=None, check=False)) == 0


def test_bench_planner_reruns_table_ii_from_the_committed_profiles(tmp_path):
    out = tmp_path / "planner.json"
    r = run("bench", "planner", "--repeat", "2", "--out", str(out))
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    assert set(data["summary"]) >= {"lenet5", "alexnet", "vgg16", "vgg19", "googlenet", "resnet34"}
    assert all(row["solve_ms_median"] > 0 for row in data["rows"]) and out.with_suffix(".png").is_file()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_every_service_unit_is_rated_ok_by_systemd_analyze_security(tmp_path):
    d = tmp_path / "b"
    assert run("broker", "init", "--dir", str(d), "--job", "j").returncode == 0
    cfg = tmp_path / "tier.toml"
    cfg.write_text(f'job = "j"\n[broker]\ncredentials = "{d}/credentials/device.json"\n[planner]\nbatch = 8\n')
    units = tmp_path / "units"
    units.mkdir()
    assert run("broker", "install-service", "--dir", str(d), "--unit-dir", str(units), "--user", "nobody").returncode == 0
    for tier in ("device", "edge", "cloud", "planner"):
        r = run(tier, "install-service", "--config", str(cfg), "--unit-dir", str(units), "--user", "nobody")
        assert r.returncode == 0, r.stderr
    for unit in sorted(units.iterdir()):
        text = unit.read_text()
        assert "User=nobody" in text and ("--resume" in text) == any(t in unit.name for t in ("device", "edge", "cloud"))
        if "broker" not in unit.name:
            assert "After=network-online.target hiertrain-broker.service" in text
        out = subprocess.run(["systemd-analyze", "security", "--offline=true", str(unit)], capture_output=True,
                             text=True).stdout
        score = float(out.rsplit("Overall exposure level for", 1)[1].split(":")[1].split()[0])
        assert score < 5.0, (unit.name, out[-2000:])
