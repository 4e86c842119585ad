"""``hiertrain bench hostile``: what hostile input and faults cost a running job (LeNet-5, three
tiers, Mosquitto with job-bound accounts, on this machine).

- *floods*, each alone, against the edge while it trains, sent with the device's credentials:
  first frames of 800 never-completed 1-MiB messages; 50,000 tiny first frames; 200 complete
  messages for iterations 1000+ ahead. Recorded: the edge's RSS before, its peak (sampled every
  20 ms) and after, and what its telemetry counted as refused.
- *lost worker_o*: the cloud (worker_o) is killed; seconds until the device and the edge have
  noticed, naming it, and fail over (their message timeout is 600 s; ``bench failover`` goes on).
- *broker crash*: Mosquitto is killed and restarted 2 s later; seconds from the kill to the next
  completed iteration, and whether the run finished.
"""

from __future__ import annotations

import argparse
import os
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from hiertrain.bench import sized
from hiertrain.net import topics, wire
from hiertrain.schedule import Schedule

JOB = "hostile"


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise ProcessLookupError(pid)


def raw_client(endpoint, *, v5: bool = False):
    """A bare paho client with an account's credentials: what a hostile tenant would write."""
    import paho.mqtt.client as mqtt

    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"raw-{endpoint.username}-{os.getpid()}",
                    protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311)
    c.username_pw_set(endpoint.username, endpoint.password)
    c.connect(endpoint.host, endpoint.port)
    c.loop_start()
    return c


def flood(endpoint, job: str, dest: str, kind: str, *, start: int, count: int) -> None:
    """Send ``count`` hostile messages of ``kind`` (``big``, ``tiny``, ``ahead``) to ``dest`` as the device."""
    raw = raw_client(endpoint)
    topic = topics.tensor(job, "device", "samples", dest, 0)
    rng = np.random.default_rng(1)
    if kind == "big":  # the first of several 1-MiB frames, never the rest
        msg = wire.Message("samples", job, "device", dest, start + 1, 0,
                           {"x": rng.standard_normal((171, 3, 32, 32)).astype(np.float32)}, 1)
        for i in range(count):
            raw.publish(topic, wire.encode_message(msg, msg_id=f"big{i}", chunk_bytes=1 << 20)[0], qos=0)
    elif kind == "tiny":  # first frames of 1 KiB by the ten thousand
        msg = wire.Message("samples", job, "device", dest, start + 1, 0, {"x": np.zeros((1, 3, 32, 32), np.float32)}, 1)
        frames = [wire.encode_message(msg, msg_id=f"tiny{i}", chunk_bytes=1024)[0] for i in range(200)]
        for i in range(count):  # distinct message ids of the same length
            raw.publish(topic, frames[i % 200].replace(b"tiny", b"t%03x" % (i // 200 % 4096), 1), qos=0)
    elif kind == "ahead":  # complete, well-formed, 1000+ iterations in the future
        for i in range(count):
            msg = wire.Message("samples", job, "device", dest, start + 1000 + i, 0,
                               {"x": rng.standard_normal((400, 3, 32, 32)).astype(np.float32)}, 1)
            for frame in wire.encode_message(msg, msg_id=f"ahead{i}", chunk_bytes=1 << 20):
                raw.publish(topic, frame, qos=0)
    else:
        raise ValueError(kind)
    time.sleep(1)
    raw.loop_stop()
    raw.disconnect()


def _peak(pid: int, stop: threading.Event, out: list[float]) -> None:
    while not stop.is_set():
        try:
            out[0] = max(out[0], rss_mb(pid))
        except (ProcessLookupError, FileNotFoundError):
            return
        time.sleep(0.02)


def _three_way() -> dict[str, Any]:
    return Schedule(mapping={"o": "cloud", "s": "device", "l": "edge"}, m_s=2, m_l=5, b_o=4, b_s=4, b_l=4,
                    iteration_s=0.0).versioned(1, 0).to_json()


def _cluster(work: Path, bdir, **kw):
    from hiertrain.lab.cluster import Cluster
    from hiertrain.lab.jobs import ThreeTier

    c = Cluster(work, ThreeTier(name=JOB, chunk_kb=16, **kw), broker_dir=bdir)
    c.publish(_three_way())
    c.start()
    return c


def _with_broker(fn: Callable[[Path, Any, Any], dict[str, Any]]) -> dict[str, Any]:
    from hiertrain.broker.layout import BrokerDir, Settings
    from hiertrain.broker.process import BrokerProcess, free_port

    with tempfile.TemporaryDirectory(prefix="hiertrain-hostile-") as d:
        bdir = BrokerDir(Path(d) / "broker")
        bdir.init(Settings(port=free_port(), bind="127.0.0.1", job=JOB))
        broker = BrokerProcess(bdir, kind="mosquitto")
        try:
            return fn(Path(d), bdir, broker)
        finally:
            broker.stop()


def flood_case(kind: str, count: int) -> dict[str, Any]:
    from hiertrain.net.transport import Endpoint

    def run(work: Path, bdir, broker) -> dict[str, Any]:
        c = _cluster(work, bdir, iterations=100_000, timeout_s=60, lr=0.005)
        try:
            c.wait_iteration(4)
            pid = c.procs["edge"].pid
            time.sleep(1)
            before = rss_mb(pid)
            peak, stop = [before], threading.Event()
            sampler = threading.Thread(target=_peak, args=(pid, stop, peak), daemon=True)
            sampler.start()
            t0 = time.monotonic()
            flood(Endpoint.load(bdir.credentials_file("device")), JOB, "edge", kind, start=4, count=count)
            seconds = time.monotonic() - t0
            time.sleep(2)
            stop.set()
            after = rss_mb(pid)
            c.pump(0.5)
            dropped = [p.get("dropped", {}) for a, p in c.telemetry if a == "edge"][-1]
            alive = all(p.poll() is None for p in c.procs.values())
            return {"flood": kind, "messages": count, "seconds": round(seconds, 1), "edge_rss_before_mb": round(before),
                    "edge_rss_peak_mb": round(peak[0]), "edge_rss_after_mb": round(after),
                    "refused": dropped, "training_continued": alive}
        finally:
            c.close()

    return _with_broker(run)


def lost_worker_o() -> dict[str, Any]:
    def run(work: Path, bdir, broker) -> dict[str, Any]:
        c = _cluster(work, bdir, iterations=100_000, timeout_s=600)
        try:
            c.wait_iteration(5)
            t0 = time.monotonic()
            c.procs["cloud"].send_signal(signal.SIGKILL)
            named = lambda: all(f"{t}: the cloud is offline" in c.log(t) for t in ("device", "edge"))  # noqa: E731
            while not named() and time.monotonic() - t0 < 700:
                time.sleep(0.01)
            seconds = time.monotonic() - t0
            return {"fault": "worker_o (cloud) killed", "seconds_until_others_noticed": round(seconds, 2),
                    "message_timeout_s": 600, "both_name_the_cloud": named()}
        finally:
            c.close()

    return _with_broker(run)


def broker_crash(iterations: int = 60) -> dict[str, Any]:
    from hiertrain.broker.process import BrokerProcess

    def run(work: Path, bdir, broker) -> dict[str, Any]:
        c = _cluster(work, bdir, iterations=iterations, every=5, timeout_s=60)
        try:
            c.wait_iteration(10)
            done_before = max(c.losses())
            t0 = time.monotonic()
            os.kill(broker.pid, signal.SIGKILL)
            broker.stop()
            time.sleep(2)
            with BrokerProcess(bdir, kind="mosquitto"):
                restarted = time.monotonic() - t0
                while max(c.losses(), default=-1) <= done_before + 1 and time.monotonic() - t0 < 120:
                    c.pump(0.2)
                resumed = time.monotonic() - t0
                codes = c.wait(timeout=300)
            return {"fault": "Mosquitto SIGKILLed, restarted 2 s later", "broker_back_s": round(restarted, 1),
                    "seconds_to_next_completed_iteration": round(resumed, 1), "exit_codes": codes,
                    "iterations_completed": len(c.losses()), "iterations_planned": iterations}
        finally:
            c.close()

    return _with_broker(run)


def bench(args: argparse.Namespace) -> dict[str, Any]:
    from hiertrain.broker.mosquitto import executable

    if executable() is None:
        return {"bench": "hostile", "skipped": "needs Mosquitto"}
    return {
        "bench": "hostile",
        "floods": [flood_case("big", sized(args, 800, 10)), flood_case("tiny", sized(args, 50_000, 200)),
                   flood_case("ahead", sized(args, 200, 10))],
        "lost_worker_o": lost_worker_o(),
        "broker_crash": broker_crash(sized(args, 60, 25)),
    }
