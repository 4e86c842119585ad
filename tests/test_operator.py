"""The README's multi-service path, end to end, as an operator runs it: a job-bound broker from
`broker init`, Mosquitto from `broker start`, the planner and three tier services from their
configs, the job run twice under the same name, an observer watching with mosquitto_sub, and
`hiertrain evaluate` on the newest checkpoint."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time

import pytest

from conftest import PYTHON, ROOT
from hiertrain.train import checkpoint
from hiertrain.broker.process import free_port
from hiertrain.lab.cluster import stop

pytestmark = [pytest.mark.integration, pytest.mark.slow]
HIERTRAIN = [PYTHON, "-m", "hiertrain"]


def _wait_port(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"nothing listens on {port}")


@pytest.mark.skipif(shutil.which("mosquitto") is None and not os.path.exists("/usr/sbin/mosquitto"),
                    reason="needs Mosquitto")
def test_the_readme_path_runs_a_job_twice_with_an_observer_and_evaluates_it(tmp_path):
    srv, port = tmp_path / "srv", free_port()
    init = subprocess.run([*HIERTRAIN, "broker", "init", "--dir", str(srv / "broker"), "--host", "127.0.0.1",
                           "--port", str(port), "--bind", "127.0.0.1", "--job", "cifar"],
                          capture_output=True, text=True, cwd=ROOT)
    assert init.returncode == 0, init.stderr
    procs: list[subprocess.Popen] = []

    def spawn(name: str, *args: str) -> subprocess.Popen:
        log = open(srv / f"{name}.log", "a")
        p = subprocess.Popen([*HIERTRAIN, *args], stdout=log, stderr=subprocess.STDOUT, cwd=srv)
        procs.append(p)
        return p

    try:
        spawn("broker", "broker", "start", "--dir", str(srv / "broker"))
        _wait_port(port)
        for tier in ("device", "edge", "cloud"):
            (srv / f"{tier}.toml").write_text(
                f'job = "cifar"\n[broker]\ncredentials = "broker/credentials/{tier}.json"\n'
                '[train]\nmodel = "lenet5"\nbatch = 16\nlr = 0.05\niterations = 12\ntimeout_s = 60\n'
                f'[runtime]\nthreads = 1\ncache = "cache-{tier}"\n'
                '[checkpoint]\nevery = 6\n'  # collected in one place: the device, whichever tier is worker_o
                + ('dir = "checkpoints"\ncollect = true\n' if tier == "device" else "") + '[data]\ndataset = "synthetic"\n')
        (srv / "planner.toml").write_text(
            'job = "cifar"\n[broker]\ncredentials = "broker/credentials/planner.json"\n'
            f'[planner]\nbatch = 16\nprofile = "{ROOT / "bench/profiles/lenet5.json"}"\n'
            'bw_device_edge = 5.0\nbw_edge_cloud = 1.5\n')
        spawn("planner", "planner", "run", "--config", "planner.toml")
        seen: list[str] = []
        if shutil.which("mosquitto_sub"):
            watcher = subprocess.Popen(["mosquitto_sub", "-t", "hiertrain/cifar/#", "-v"], stdout=subprocess.PIPE,
                                       text=True, env={**os.environ, "XDG_CONFIG_HOME":
                                                       str(srv / "broker/credentials/observer-mosquitto")})
            procs.append(watcher)
            threading.Thread(target=lambda: [seen.append(line) for line in watcher.stdout], daemon=True).start()
        for run in (1, 2):  # the same job twice: the second run must not hang on the first's retained state
            tiers = {t: spawn(t, t, "run", "--config", f"{t}.toml") for t in ("cloud", "edge", "device")}
            codes = {t: p.wait(180) for t, p in tiers.items()}
            logs = {t: (srv / f"{t}.log").read_text() for t in (*tiers, "planner")}
            assert codes == {"cloud": 0, "edge": 0, "device": 0}, \
                f"run {run}: " + "\n".join(f"--- {t} ---\n{text[-3000:]}" for t, text in logs.items())
        assert logs["device"].count("device: schedule v") == 2  # a line per schedule, in each run
        assert any("iteration 11 loss" in logs[t] for t in ("device", "edge", "cloud"))
        if shutil.which("mosquitto_sub"):
            time.sleep(0.5)
            topics = {line.split()[0] for line in seen}
            assert "hiertrain/cifar/schedule" in topics and "hiertrain/cifar/device/telemetry" in topics
            assert all(len(t.split("/")) == 4 or t.endswith("/schedule") for t in topics), topics  # no tensors
        assert checkpoint.iterations(srv / "checkpoints") == [5, 11]
        ev = subprocess.run([*HIERTRAIN, "evaluate", "--config", "device.toml"], capture_output=True, text=True,
                            cwd=srv)
        assert ev.returncode == 0 and ev.stdout.startswith("accuracy ") and "(checkpoint of iteration 11)" in ev.stdout, \
            ev.stderr
    finally:
        stop(reversed(procs), timeout=20)
