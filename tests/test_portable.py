"""Portable segments: a device with plain onnxruntime (no gradient builder) trains.

- artifacts: a directory of built segments is verified before use; a tampered file is refused;
- a builder tier serves segments over MQTT to a runner, which verifies and caches them;
- a device in its own virtualenv with ``hiertrain[device]`` (plain onnxruntime, x86-64) trains in
  three-tier hybrid schedules over Mosquitto, equal to single-process training;
- the same on an emulated arm64 machine (Debian arm64, qemu user mode): the ``arm`` test.
"""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import sys
import time
from pathlib import Path

import pytest

from cluster import dump, reference, rel, schedule
from hiertrain.lab import arm64
from hiertrain.train import artifacts, models, segments
from hiertrain.errors import ArtifactError
from hiertrain.lab.cluster import Cluster
from hiertrain.lab.jobs import Fleet, Spec, ThreeTier
from hiertrain.lab.replay import replay, step_log

ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------- artifacts

@pytest.mark.compute
def test_a_segment_directory_is_verified_and_a_tampered_file_refused(tmp_path):
    spec = models.get("lenet5")
    manifest = artifacts.build_dir(spec, tmp_path / "segs")
    assert manifest["model"] == "lenet5" and len(manifest["segments"]) == 8 + 7 * 8 // 2
    get = artifacts.provider(tmp_path / "segs", None)
    path = get(spec, 1, 3, "body", False, tmp_path / "cache")
    assert path == tmp_path / "cache" / segments.key(spec, 1, 3, "body", False)
    assert segments.load(path, "body", False).params == tuple(spec.param_shapes(1, 3))
    k = segments.key(spec, 2, 7, "head", True)
    (tmp_path / "segs" / k / "step.onnx").write_bytes(b"not the graph that was built")
    with pytest.raises(ArtifactError, match="step.onnx does not match its SHA-256"):
        get(spec, 2, 7, "head", True, tmp_path / "cache")
    assert not (tmp_path / "cache" / k).exists()


def test_keys_name_what_a_segment_computes():
    a, b = models.get("alexnet"), models.get("alexnet-small")
    assert segments.key(a, 1, 3, "body", False) != segments.key(b, 1, 3, "body", False)  # same names, other graph
    assert segments.key(a, 1, 3, "body", False) != segments.key(a, 1, 3, "body", True)
    assert segments.key(a, 1, 3, "body", False) != segments.key(a, 1, 3, "body", False, lowered=False)
    assert segments.key(a, 4, 99, "head", True) == segments.key(a, 4, a.n_units, "head", True)


@pytest.mark.protocol
def test_a_builder_serves_segments_to_a_runner_over_mqtt(mosquitto, connect, tmp_path):
    spec = models.get("lenet5")
    edge, device = connect("edge"), connect("device")
    server = artifacts.Server(edge, spec, root=tmp_path / "edge-cache").start()
    fetch = artifacts.Fetcher(device, lambda: ["edge"], timeout=20)
    req = artifacts.Request.of(spec, 1, 4, "body", False)
    path = fetch(req, tmp_path / "device-cache")
    assert segments.load(path, "body", False).stash
    assert artifacts.digests(path) == artifacts.digests(tmp_path / "edge-cache" / req.key)
    bad = artifacts.Request("lenet5", 1, 4, "body", False, "lenet5/1-4-body-000000000000")
    with pytest.raises(ArtifactError, match="edge refused segment .*differs from the builder's"):
        fetch(bad, tmp_path / "device-cache")
    other = artifacts.Request.of(models.get("alexnet-small"), 1, 2, "body", False)
    with pytest.raises(ArtifactError, match="this job trains lenet5, not alexnet-small"):
        fetch(other, tmp_path / "device-cache")
    edge.service[artifacts.REQUEST].put(None)
    assert server.served == 3


# ------------------------------------------------------------------- real runner devices

SCHEDULES = {  # the device computes in each
    "device is s (cut 2), o=cloud": schedule("cloud", "device", "edge", 2, 5, 4, 4, 4, version=1),
    "device is o, s=edge l=cloud": schedule("device", "edge", "cloud", 3, 6, 4, 4, 4, version=1),
}


def _wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out),
                    str(ROOT)], check=True, capture_output=True)
    return next(out.glob("hiertrain-*.whl"))


@pytest.fixture(scope="session")
def wheel(tmp_path_factory) -> Path:
    return _wheel(tmp_path_factory)


@pytest.fixture(scope="session")
def device_venv(wheel, tmp_path_factory) -> Path:
    """A virtualenv with ``hiertrain[device]``: plain onnxruntime, as on a Raspberry Pi."""
    venv = tmp_path_factory.mktemp("device-venv")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    proc = subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", f"{wheel}[device]"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return py


def _runner_run(tmp_path, broker_dir, launch, name, iterations, plan=None, **own):
    c = Cluster(tmp_path, ThreeTier(name="portable", chunk_kb=64, iterations=iterations, every=iterations, timeout_s=120,
                                    **own), broker_dir=broker_dir, launch={"device": launch})
    try:
        c.publish(plan or SCHEDULES[name])
        c.start()
        codes = c.wait(timeout=900)
        assert codes == {"device": 0, "edge": 0, "cloud": 0}, dump(c)
        ref_losses, ref_params = reference(c, iterations)
        losses = c.losses()
        assert sorted(losses) == list(range(iterations)), dump(c)
        for i, expected in enumerate(ref_losses):
            assert losses[i] == pytest.approx(expected, rel=1e-4)
        ck = c.final_checkpoint()
        assert ck.iteration == iterations - 1 and rel(ck.params, ref_params) < 1e-4
        log = c.log("device")
        assert "no gradient builder" in log, log
        c.reference_params = ref_params
        cache = tmp_path / "cache-device" / "segments" / models.get(c.job.model).name
        assert any(cache.iterdir()), "the device fetched no segments"
        return c
    finally:
        c.close()


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("name", SCHEDULES)
def test_a_plain_onnxruntime_device_trains_in_a_hybrid(device_venv, mosquitto, broker_dir, tmp_path, name):
    probe = subprocess.run([str(device_venv), "-c", "import onnxruntime, importlib.util as u; "
                            "from hiertrain.train import segments; print(onnxruntime.__version__, segments.can_build(), "
                            "u.find_spec('onnxruntime.training') is not None)"],
                           capture_output=True, text=True, check=True)
    version, builds, training = probe.stdout.split()
    assert (builds, training) == ("False", "False"), probe.stdout
    c = _runner_run(tmp_path, broker_dir, [str(device_venv)], name, iterations=12)
    # evaluated where only plain onnxruntime is, equal to the single-process model's figures
    o = SCHEDULES[name]["mapping"]["o"]
    ev = subprocess.run([str(device_venv), "-m", "hiertrain", "evaluate", "--config", str(c.configs["device"]),
                         "--checkpoint", str(tmp_path / f"ck-{o}")], capture_output=True, text=True)
    assert ev.returncode == 0, ev.stderr
    from hiertrain.train import data, models
    from hiertrain.train.reference import SingleProcess

    spec = models.get("lenet5")
    ds = data.synthetic_split(spec.input_shape, spec.classes)[1]
    x, y = ds.take(np.arange(len(ds)))
    accuracy = float((SingleProcess(spec, params=c.reference_params).predict(x).argmax(1) == y).mean())
    assert ev.stdout.startswith(f"accuracy {accuracy:.4f}, loss ") and f"on {len(ds)} held-out" in ev.stdout


@pytest.mark.integration
@pytest.mark.slow
def test_a_plain_onnxruntime_device_trains_a_users_onnx_model_on_its_csv(device_venv, mosquitto, broker_dir, tmp_path):
    """The import runs where only plain onnxruntime is, and names the units, segments and keys the
    builder tiers name: the device fetches what it needs and the run equals single-process."""
    import byo

    pytest.importorskip("torch")
    model, table = byo.export(byo.mlp(), (8,), tmp_path / "mlp.onnx"), byo.table(tmp_path / "table.csv")
    _runner_run(tmp_path, broker_dir, [str(device_venv)], "", 12,
                plan=schedule("device", "edge", "cloud", 2, 4, 2, 6, 4, version=1), model=str(model),
                data={"dataset": "csv", "path": str(table)}, holdout=16)


@pytest.mark.integration
@pytest.mark.slow
def test_a_plain_onnxruntime_device_profiles_itself_with_built_segments(device_venv, tmp_path):
    """A Pi cannot build graphs, so it profiles with the segments an x86-64 machine built."""
    from hiertrain.profile import Profile

    built = subprocess.run([sys.executable, "-m", "hiertrain", "segments", "build", "--model", "lenet5", "--out",
                            str(tmp_path / "seg")], capture_output=True, text=True, cwd=tmp_path)
    assert built.returncode == 0, built.stderr
    profile = [str(device_venv), "-m", "hiertrain", "profile", "--model", "lenet5", "--batch", "8", "--tier", "device",
               "--repeat", "2", "--out", str(tmp_path / "p.json")]
    env = {**os.environ, "HIERTRAIN_CACHE": str(tmp_path / "cache")}  # nothing built before
    bare = subprocess.run(profile, capture_output=True, text=True, cwd=tmp_path, env=env)
    assert bare.returncode != 0 and "profile --segments" in bare.stderr and len(bare.stderr.strip().splitlines()) == 1, \
        bare.stderr
    ok = subprocess.run([*profile, "--segments", str(tmp_path / "seg")], capture_output=True, text=True, cwd=tmp_path,
                        env=env)
    assert ok.returncode == 0, ok.stderr
    assert set(Profile.load(tmp_path / "p.json").tiers) == {"device"}


def _fleet_with_a_runner(tmp_path, python, iterations):
    """pi1 runs on ``python`` (no gradient builder), joins by publishing its profile and trains units
    1-2 of every step, fetching them from the edge over MQTT; pi2 sends raw samples. Every step
    equals single-process SGD over the samples the step log names."""
    devices = [Spec("pi1", 4, path=(2, 5), joins=True), Spec("pi2", 4, path=(0, 7))]
    with Cluster(tmp_path, Fleet(devices, iterations=iterations, timeout_s=120), launch={"pi1": python}) as c:
        c.start("cloud", "edge", "pi1", "pi2")
        codes = c.wait(("edge", "cloud", "pi1", "pi2"), timeout=900)
        assert codes == dict.fromkeys(codes, 0), {n: c.log(n)[-2000:] for n in codes}
        assert "no gradient builder" in c.log("pi1") and "builds its segments" in c.log("edge"), c.log("pi1")
        cache = tmp_path / "cache-pi1" / "segments" / "lenet5"
        assert any(cache.iterdir()), "pi1 fetched no segments"
        log = step_log(c)
        assert [row["step"] for row in log] == list(range(iterations))
        assert all({m[0] for m in row["members"]} == {"pi1", "pi2"} for row in log), log
        losses, params = replay(c)
        np.testing.assert_allclose([row["loss"] for row in log], losses, rtol=1e-4)
        assert rel(c.final_checkpoint().params, params) < 1e-4


@pytest.mark.integration
@pytest.mark.slow
def test_a_plain_onnxruntime_fleet_device_joins_and_fetches_its_segments_from_the_edge(device_venv,
                                                                                         tmp_path):
    _fleet_with_a_runner(tmp_path, [str(device_venv)], iterations=6)


# --------------------------------------------------------------------------- arm64

@pytest.mark.arm
@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("name", SCHEDULES)
def test_an_emulated_arm64_device_trains_in_a_hybrid(wheel, mosquitto, broker_dir, tmp_path, name):
    """The device service on Debian arm64 under qemu, with the aarch64 wheels of onnxruntime,
    numpy, msgpack and paho-mqtt, against Mosquitto on the host: results equal single-process."""
    missing = arm64.missing_tools()
    if missing:
        pytest.skip(f"the arm64 machine needs {', '.join(missing)}")
    t0 = time.monotonic()
    root = arm64.Arm64Root().ensure()
    root.install([f"{wheel}[device]"])
    ready = time.monotonic() - t0
    python = root.python(binds=[tmp_path])  # configs, credentials (the broker dir is inside), caches
    probe = subprocess.run([*python, "-c", "import platform, onnxruntime; from hiertrain.train import segments; "
                            "print(platform.machine(), onnxruntime.__version__, segments.can_build())"],
                           capture_output=True, text=True, timeout=300)
    assert probe.returncode == 0, probe.stderr
    machine, version, builds = probe.stdout.split()
    assert (machine, builds) == ("aarch64", "False")
    t1 = time.monotonic()
    _runner_run(tmp_path, broker_dir, python, name, iterations=8)
    print(json.dumps({"arm64_rootfs_and_wheels_s": round(ready, 1), "arm64_run_s": round(time.monotonic() - t1, 1),
                      "onnxruntime": version}))


@pytest.mark.arm
@pytest.mark.integration
@pytest.mark.slow
def test_an_emulated_arm64_device_takes_part_in_a_fleet_with_segments_from_the_edge(wheel, tmp_path):
    missing = arm64.missing_tools()
    if missing:
        pytest.skip(f"the arm64 machine needs {', '.join(missing)}")
    root = arm64.Arm64Root().ensure()
    root.install([f"{wheel}[device]"])
    t0 = time.monotonic()
    _fleet_with_a_runner(tmp_path, root.python(binds=[tmp_path]), iterations=4)
    print(json.dumps({"arm64_fleet_run_s": round(time.monotonic() - t0, 1)}))


@pytest.mark.integration
def test_the_core_install_runs_its_commands_and_names_the_extra_others_need(wheel, tmp_path_factory):
    venv = tmp_path_factory.mktemp("core-venv")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    proc = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                           str(wheel)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    cli = str(venv / "bin" / "hiertrain")
    assert subprocess.run([cli, "--help"], capture_output=True, text=True).returncode == 0
    plan = subprocess.run([cli, "plan", "--profile", str(ROOT / "bench/profiles/lenet5.json"), "--bw-device-edge", "5",
                           "--bw-edge-cloud", "1.5", "--batch", "32"], capture_output=True, text=True)
    assert plan.returncode == 0 and "s/iteration" in plan.stdout, plan.stderr
    # run from a folder laid out like this repository: its device/ must not shadow the installed one
    here = tmp_path_factory.mktemp("layout")
    for folder in ("device", "edge", "cloud", "planner", "broker"):
        (here / folder).mkdir()
        (here / folder / "__init__.py").write_text("")
    dev = subprocess.run([cli, "device", "run", "--config", "/nonexistent.toml"], capture_output=True, text=True,
                         cwd=here)
    assert dev.returncode == 1 and dev.stderr.strip() == ("hiertrain: error: `hiertrain device` needs onnx: "
                                                          "pip install 'hiertrain[device]'"), dev.stderr
    layout = subprocess.run([str(venv / "bin" / "python"), "-c", "import importlib.util as u; "
                             "print([u.find_spec(m) is None for m in ('device', 'planner', 'broker')], "
                             "u.find_spec('hiertrain.planner') is not None)"], capture_output=True, text=True,
                            cwd=venv)  # not this checkout, whose folders are on the path of a plain `python -c`
    assert layout.stdout.strip() == "[True, True, True] True", layout  # nothing top-level but hiertrain
