import json
import os
import subprocess

import pytest

from conftest import PYTHON, ROOT
from hiertrain.lab import cgroup
from hiertrain.train import profiler
from hiertrain.profile import Profile

pytestmark = pytest.mark.process


def run(*args):
    return subprocess.run([PYTHON, "-m", "hiertrain", *args], capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_profile_has_one_entry_per_unit_and_plans():
    prof = profiler.measure("lenet5", 4, tier="cloud", repeat=2, warmup=1)
    t = prof.tiers["cloud"]
    assert prof.n_units == 7 and len(t.forward_s) == len(t.backward_s) == len(t.update_s) == 7
    assert all(v > 0 for v in t.forward_s + t.backward_s)
    assert t.update_s[1] == 0 and t.update_s[0] > 0  # pooling has no parameters
    assert len(t.extra["spread"]["forward"]) == 7 and t.extra["measured"]["batch"] == 4
    again = Profile.from_json(json.loads(json.dumps(prof.to_json())))
    assert again.tiers["cloud"].forward_s == t.forward_s
    assert prof.sample_bytes == 3 * 32 * 32  # images travel as uint8, as the data sets store them
    assert profiler.measure("lenet5", 2, repeat=1, warmup=0, sample_dtype="float32").sample_bytes == 4 * 3 * 32 * 32


def test_cli_profiles_tiers_into_one_file_and_plan_reads_it(tmp_path):
    out = tmp_path / "p.json"
    for tier, extra in (("cloud", []), ("edge", ["--threads", "1"]), ("device", ["--threads", "1"])):
        r = run("profile", "--model", "lenet5", "--batch", "4", "--repeat", "2", "--warmup", "1", "--tier", tier,
                "--merge", "--out", str(out), *extra)
        assert r.returncode == 0, r.stderr
    assert set(Profile.load(out).tiers) == {"device", "edge", "cloud"}
    r = run("plan", "--profile", str(out), "--bw-device-edge", "5", "--bw-edge-cloud", "1.5", "--batch", "16", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["policy"] == "hiertrain"


@pytest.mark.skipif(cgroup.available() is not None, reason="CPU quotas need root and cgroup v1")
def test_cpu_quota_slows_the_profile_and_cleans_up(tmp_path):
    before = set(os.listdir(cgroup.ROOT))
    out = tmp_path / "q.json"
    r = run("profile", "--model", "lenet5", "--batch", "8", "--repeat", "2", "--warmup", "1", "--tier", "device",
            "--threads", "1", "--cpu-quota", "0.25", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert set(os.listdir(cgroup.ROOT)) == before
    assert Profile.load(out).tiers["device"].extra["measured"]["cpu_quota"] == 0.25


@pytest.mark.parametrize("args,needle", [
    (["--model", "mobilenet", "--batch", "4", "--out", "x.json"], "neither one of lenet5"),
    (["--model", "missing.onnx", "--batch", "4", "--out", "x.json"], "no model file missing.onnx"),
    (["--model", "lenet5", "--batch", "0", "--out", "x.json"], "at least 1"),
    (["--model", "lenet5", "--batch", "4", "--out", "x.json", "--cpu-quota", "-1"], "cpu-quota"),
])
def test_profile_bad_arguments(args, needle):
    r = run("profile", *args)
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1 and needle in r.stderr
