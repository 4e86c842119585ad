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
