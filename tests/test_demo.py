"""`hiertrain demo` is the README's first command: it must run and exit 0."""

import subprocess

import pytest

from conftest import PYTHON, ROOT

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_demo_runs_end_to_end(tmp_path):
    r = subprocess.run([PYTHON, "-m", "hiertrain", "demo", "--iterations", "30", "--workdir", str(tmp_path / "w")],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "broker: mosquitto" in out and "schedule v1 from iteration 0" in out
    assert "iteration   29" in out and "accuracy on 512 held-out samples" in out
    assert not (tmp_path / "w").exists()  # cleaned up


def test_the_fleet_demo_plans_three_enrolled_devices_and_trains(tmp_path):
    r = subprocess.run([PYTHON, "-m", "hiertrain", "demo", "--devices", "3", "--iterations", "30", "--workdir",
                        str(tmp_path / "w")], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "broker: mosquitto" in out and "plan v1 (hiertrain" in out
    for name in ("pi3-1", "pi4-1", "jetson-1"):
        assert f"\n  {name}: " in out  # its path and share of the medium
    assert "step   29" in out and "accuracy on 512 held-out samples" in out
    assert not (tmp_path / "w").exists()
