"""`hiertrain init`: a new job's files, and the README it writes, followed to the letter as an
operator would on three machines (here three folders on one), over real Mosquitto."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import time

import pytest

from conftest import PYTHON, ROOT
from hiertrain import config
from hiertrain.train import checkpoint
from hiertrain.broker.layout import BrokerDir
from hiertrain.broker.process import free_port
from hiertrain.lab.cluster import stop

HIERTRAIN = [PYTHON, "-m", "hiertrain"]


def init(tmp_path, *args):
    return subprocess.run([*HIERTRAIN, "init", str(tmp_path / "job"), *args], capture_output=True, text=True,
                          cwd=ROOT)


class Follower:
    """An operator following a README: each `hiertrain` line run in its machine's folder, services
    (``start``, ``run``, ``watch``) left running with their output in ``<folder>/<name>.log``."""

    def __init__(self, job, env):
        self.job, self.env = job, env
        self.procs: dict[tuple[str, str], subprocess.Popen] = {}

    def run(self, line: str, where: str) -> None:
        argv = shlex.split(line)
        assert argv[0] == "hiertrain", line
        name, action = argv[1], argv[2]
        argv = [*HIERTRAIN, *argv[1:]]
        if action in ("start", "run", "watch"):  # a service: it keeps running
            log = open(self.job / where / f"{name}.log", "a")
            self.procs[name, where] = subprocess.Popen(argv, cwd=self.job / where, stdout=log, stderr=subprocess.STDOUT,
                                                       env=self.env)
        else:
            ran = subprocess.run(argv, cwd=self.job / where, capture_output=True, text=True, env=self.env, timeout=300)
            assert ran.returncode == 0, (line, ran.stderr)

    def log(self, name: str, where: str) -> str:
        path = self.job / where / f"{name}.log"
        return path.read_text() if path.exists() else ""

    def close(self) -> None:
        stop(reversed(list(self.procs.values())), timeout=20)


def commands(readme: str, section: str) -> list[str]:
    """The command lines of the bash blocks under the heading that starts with ``section``."""
    part = readme.split(f"\n## {section}", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", part, re.S)
    return [line.split("  #")[0].strip() for block in blocks for line in block.splitlines() if line.strip()]


@pytest.mark.process
def test_init_writes_a_folder_per_machine_with_private_credentials_and_valid_configs(tmp_path):
    done = init(tmp_path, "--job", "greenhouse", "--batch", "16", "--iterations", "50")
    assert done.returncode == 0, done.stderr
    job = tmp_path / "job"
    assert sorted(p.name for p in job.iterdir()) == ["README.md", "cloud", "device", "edge"]
    for tier in ("device", "edge", "cloud"):
        cfg = config.load(job / tier / f"{tier}.toml")  # credentials resolved as the service resolves them
        assert (cfg.job, cfg.endpoint.username, cfg.endpoint.job) == ("greenhouse", tier, "greenhouse")
        assert (cfg.raw["train"]["batch"], cfg.raw["train"]["iterations"]) == (16, 50)
        assert cfg.raw["profile"]["file"] == f"profile-{tier}.json"  # made on that machine (README)
        assert stat.S_IMODE((job / tier / f"{tier}.json").stat().st_mode) == 0o600
    assert config.load(job / "device" / "device.toml").raw["checkpoint"]["collect"] is True
    assert (job / "edge" / "broker" / "mosquitto.conf").is_file() and (job / "edge" / "planner.json").is_file()
    again = init(tmp_path, "--job", "greenhouse")
    assert again.returncode != 0 and "is not empty" in again.stderr and len(again.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("args,why", [
    (["--job", "a/b"], "--job"),
    (["--data", "cifar10"], "needs --data-path"),
    (["--data", "mnist"], "not one of"),
    (["--batch", "0"], "batch"),
])
@pytest.mark.process
def test_init_refuses_what_cannot_work_in_one_line(tmp_path, args, why):
    done = init(tmp_path, *args)
    assert done.returncode != 0 and why in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not (tmp_path / "job").exists() or not any((tmp_path / "job").iterdir())


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.skipif(shutil.which("mosquitto") is None and not os.path.exists("/usr/sbin/mosquitto"),
                    reason="needs Mosquitto")
@pytest.mark.parametrize("own", [False, True], ids=["zoo model, synthetic data", "own ONNX model, CSV data"])
def test_the_readme_init_writes_trains_the_job_when_followed_line_by_line(tmp_path, own):
    port = free_port()
    mine = []
    if own:  # a user's PyTorch model and table, outside the job folder
        import byo

        pytest.importorskip("torch")
        mine = ["--model", str(byo.export(byo.mlp(), (8,), tmp_path / "mlp.onnx")), "--data", "csv",
                "--data-path", str(byo.table(tmp_path / "table.csv"))]
    done = init(tmp_path, "--job", "greenhouse", "--port", str(port), "--bind", "127.0.0.1", "--batch", "16",
                "--iterations", "12", *mine)
    assert done.returncode == 0, done.stderr
    job = tmp_path / "job"
    readme = (job / "README.md").read_text()
    me = Follower(job, {**os.environ, "HIERTRAIN_CACHE": str(tmp_path / "cache")})
    try:
        for section, where in (("1.", "edge"), ("2.", "cloud"), ("3.", "device")):
            for line in commands(readme, section):
                me.run(line, where)
        codes = {t: me.procs[t, t].wait(300) for t in ("device", "edge", "cloud")}
        logs = {name: me.log(name, where)
                for name, where in (("device", "device"), ("edge", "edge"), ("cloud", "cloud"), ("planner", "edge"))}
        assert codes == {"device": 0, "edge": 0, "cloud": 0}, "\n".join(f"--- {t}\n{v[-2000:]}" for t, v in logs.items())
        assert "schedule version 1" in logs["planner"], logs["planner"]
        assert checkpoint.iterations(job / "device" / "checkpoints")[-1] == 11
        ev = subprocess.run([*HIERTRAIN, "evaluate", "--config", "device.toml"], cwd=job / "device",
                            capture_output=True, text=True, env=me.env)
        assert ev.returncode == 0 and ev.stdout.startswith("accuracy "), ev.stderr
    finally:
        me.close()


@pytest.mark.process
def test_init_writes_a_fleet_with_an_account_and_folder_per_device(tmp_path):
    done = init(tmp_path, "--job", "orchard", "--devices", "3", "--batch", "12", "--iterations", "50")
    assert done.returncode == 0, done.stderr
    job = tmp_path / "job"
    assert sorted(p.name for p in job.iterdir()) == ["README.md", "cloud", "device-1", "device-2", "device-3", "edge"]
    for i in (1, 2, 3):
        cfg = config.load(job / f"device-{i}" / "device.toml")
        assert cfg.endpoint.username == f"device-{i}" and cfg.raw["fleet"]["samples"] == 4
        assert cfg.raw["data"]["shard"] == [i - 1, 3]
        assert stat.S_IMODE((job / f"device-{i}" / f"device-{i}.json").stat().st_mode) == 0o600
    assert sorted(BrokerDir(job / "edge" / "broker").devices()) == ["device-1", "device-2", "device-3"]
    edge = config.load(job / "edge" / "edge.toml").raw
    assert edge["fleet"]["devices"] == 3 and (job / "edge" / edge["fleet"]["file"]).is_file()
    for args, why in ((["--devices", "13", "--batch", "12"], "--devices 13: a fleet needs 1 to --batch (12)"),
                      (["--devices", "0"], "--devices: 0 must be at least 1")):
        bad = init(tmp_path / "x", *args)
        assert bad.returncode != 0 and why in bad.stderr and len(bad.stderr.strip().splitlines()) == 1, bad.stderr


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.skipif(shutil.which("mosquitto") is None and not os.path.exists("/usr/sbin/mosquitto"),
                    reason="needs Mosquitto")
def test_the_fleet_readme_init_writes_trains_the_fleet_when_followed_line_by_line(tmp_path):
    """Three devices, each with its own account, publish their profiles and join; the cloud publishes
    its timings; the coordinator plans, publishes each plan version (the README's watch shows it) and
    checkpoints; a device scores the newest checkpoint."""
    port = free_port()
    done = init(tmp_path, "--job", "orchard", "--devices", "3", "--port", str(port), "--bind", "127.0.0.1",
                "--batch", "12", "--iterations", "10")
    assert done.returncode == 0, done.stderr
    job = tmp_path / "job"
    readme = (job / "README.md").read_text()
    me = Follower(job, {**os.environ, "HIERTRAIN_CACHE": str(tmp_path / "cache")})
    devices = ("device-1", "device-2", "device-3")
    try:
        for section, folders in (("1.", ("edge",)), ("2.", ("cloud",)), ("3.", devices), ("Watching", ("edge",))):
            for where in folders:
                for line in commands(readme, section):
                    me.run(line, where)
        codes = {where: me.procs[name, where].wait(300) for name, where in
                 (("edge", "edge"), ("cloud", "cloud"), *(("device", d) for d in devices))}
        edge = me.log("edge", "edge")
        assert codes == dict.fromkeys(codes, 0), "\n".join(f"--- {w}\n{me.log(n, w)[-2000:]}" for n, w in me.procs)
        for d in devices:
            assert f"edge: {d} joins with its own profile: 4 samples per step" in edge, edge
        assert "edge: the cloud published its timings" in edge, edge
        rows = [json.loads(line) for line in (job / "edge" / "fleet-log.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == list(range(10))
        assert all(sorted(m[0] for m in r["members"]) == list(devices) for r in rows), rows
        assert checkpoint.iterations(job / "edge" / "checkpoints")[-1] == 9
        plan_row = re.compile(r"^\s+1\s+0\s+hiertrain\s+fleet\s+device-1:\d,\d/4 device-2:\d,\d/4 device-3:\d,\d/4",
                              re.M)  # version 1 from step 0: each device's units m,k and its samples
        deadline = time.monotonic() + 30
        while not plan_row.search(me.log("schedule", "edge")) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert plan_row.search(me.log("schedule", "edge")), me.log("schedule", "edge")
        ev = subprocess.run([*HIERTRAIN, "evaluate", "--config", "device.toml", "--checkpoint", "../edge/checkpoints"],
                            cwd=job / "device-1", capture_output=True, text=True, env=me.env)
        assert ev.returncode == 0 and ev.stdout.startswith("accuracy ") and "iteration 9" in ev.stdout, ev.stderr
    finally:
        me.close()
