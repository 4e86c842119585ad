"""`hiertrain init`: a new job's files, and the README it writes, followed to the letter as an
operator would on three machines (here three folders on one), over real Mosquitto."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import stat
import subprocess

import pytest

from conftest import PYTHON, ROOT
from hiertrain import config
from hiertrain.train import checkpoint
from hiertrain.broker.process import free_port
from hiertrain.lab.local import stop

HIERTRAIN = [PYTHON, "-m", "hiertrain"]


def init(tmp_path, *args):
    return subprocess.run([*HIERTRAIN, "init", str(tmp_path / "job"), *args], capture_output=True, text=True,
                          cwd=ROOT)


def commands(readme: str, section: str) -> list[str]:
    """The command lines of the bash blocks under the heading that starts with ``section``."""
    part = readme.split(f"\n## {section}", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", part, re.S)
    return [line.split("  #")[0].strip() for block in blocks for line in block.splitlines() if line.strip()]


@pytest.mark.unit
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


@pytest.mark.unit
@pytest.mark.parametrize("args,why", [
    (["--job", "a/b"], "--job"),
    (["--data", "cifar10"], "needs --data-path"),
    (["--data", "mnist"], "not one of"),
    (["--batch", "0"], "batch"),
])
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
    procs: dict[str, subprocess.Popen] = {}
    env = {**os.environ, "HIERTRAIN_CACHE": str(tmp_path / "cache")}

    def run(line: str, where: str) -> None:
        argv = shlex.split(line)
        assert argv[0] == "hiertrain", line
        name, action = argv[1], argv[2]
        argv = [*HIERTRAIN, *argv[1:]]
        if action in ("start", "run"):  # a service: it keeps running
            log = open(job / where / f"{name}.log", "a")
            procs[name] = subprocess.Popen(argv, cwd=job / where, stdout=log, stderr=subprocess.STDOUT, env=env)
        else:
            ran = subprocess.run(argv, cwd=job / where, capture_output=True, text=True, env=env, timeout=300)
            assert ran.returncode == 0, (line, ran.stderr)

    try:
        for section, where in (("1.", "edge"), ("2.", "cloud"), ("3.", "device")):
            for line in commands(readme, section):
                run(line, where)
        codes = {t: procs[t].wait(300) for t in ("device", "edge", "cloud")}
        logs = {name: (job / where / f"{name}.log").read_text()
                for name, where in (("device", "device"), ("edge", "edge"), ("cloud", "cloud"), ("planner", "edge"))}
        assert codes == {"device": 0, "edge": 0, "cloud": 0}, "\n".join(f"--- {t}\n{v[-2000:]}" for t, v in logs.items())
        assert "schedule version 1" in logs["planner"], logs["planner"]
        assert checkpoint.iterations(job / "device" / "checkpoints")[-1] == 11
        ev = subprocess.run([*HIERTRAIN, "evaluate", "--config", "device.toml"], cwd=job / "device",
                            capture_output=True, text=True, env=env)
        assert ev.returncode == 0 and ev.stdout.startswith("accuracy "), ev.stderr
    finally:
        stop(reversed(list(procs.values())), timeout=20)
