"""What one Mosquitto carries for a fleet, and when an operator should split a fleet over edges.

Two measurements, both read from Mosquitto's own ``$SYS/broker/#`` counters (the observer's to read)
and the broker process's CPU time (``/proc/<pid>/stat``):

- *capacity*: ``--devices`` device clients in one process publish at QoS 1, as fast as they can, to
  one subscriber (the edge's fan-in), for each payload size of a step (a small tensor, a mid-sized
  one, a full 256 KB chunk). The broker's CPU per message delivered gives
  what one core of it carries when it is the bottleneck; on this 2-core machine the Python clients
  are, so the delivered rate is a floor and the CPU-bound figure the ceiling.
- *a real fleet*: a fleet of ``--devices`` devices (LeNet-5, the planner's plan) trains over the
  broker; the counters over ``WINDOW_S`` of its training give messages and bytes per device-step.

The first, fitted as the broker's CPU per delivery (a fixed part and a part per byte), prices the
second: the device-steps per second one Mosquitto core carries, the operator's cue to split a fleet
over edge servers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from hiertrain.bench import sized
from hiertrain.bench.transport import raw_client

SIZES = (1 << 10, 16 << 10, 256 << 10)  # a small tensor, a mid-sized one, a full chunk (chunk_kb = 256)
MESSAGES, VOLUME = 20000, 128 << 20     # at most, per size
WINDOW_S = 10.0                         # of the fleet's training, counted
COUNTERS = ("publish/messages/received", "publish/messages/sent", "bytes/received", "bytes/sent")
JOB = "bench"


class Counters:
    """Mosquitto's ``$SYS/broker/#`` as the observer sees them: :meth:`read` returns the counters of
    a full update cycle that began after the call. Each cycle starts with the uptime topic (it
    changes every cycle), so the values as the next cycle's uptime arrives are that whole cycle's."""

    def __init__(self, creds: str | Path) -> None:
        from hiertrain.net.topics import BROKER_COUNTERS

        self.values: dict[str, float] = {}
        self.ticks = 0
        self.at_tick: dict[str, float] = {}  # the values as the newest cycle began
        self.cond = threading.Condition()
        self.client = raw_client(creds, f"bench-counters-{os.getpid()}")
        self.client.on_message = self._on_message
        self.client.subscribe(BROKER_COUNTERS, qos=0)
        self.client.loop_start()

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        key = msg.topic.removeprefix("$SYS/broker/")
        with self.cond:
            if key == "uptime" and not msg.retain:  # a live cycle (not the retained copy sent on subscribing)
                self.ticks += 1
                self.at_tick = dict(self.values)
                self.cond.notify_all()
            else:
                try:
                    self.values[key] = float(msg.payload.decode().split()[0])
                except (ValueError, IndexError, UnicodeDecodeError):
                    pass

    def read(self, timeout: float = 30.0) -> dict[str, float]:
        with self.cond:
            seen = self.ticks
            if not self.cond.wait_for(lambda: self.ticks >= seen + 2, timeout):
                raise RuntimeError("no $SYS update from the broker (is the observer allowed $SYS/broker/#?)")
            return {k: self.at_tick.get(k, 0.0) for k in COUNTERS}

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before[k] for k in COUNTERS}


# ------------------------------------------------------------------------------ capacity

def worker(side: str, creds: str, clients: int, count: int, size: int) -> dict[str, Any]:
    """``pub``: ``clients`` device clients, ``count`` QoS-1 messages each; ``sub``: the edge's side,
    counting every arrival (run as ``python -m hiertrain.bench.broker``)."""
    from hiertrain.net import topics

    def client(i: int) -> Any:
        return raw_client(creds, f"bench-{side}-{os.getpid()}-{i}")

    topic = topics.tensor(JOB, "device", "act", "cloud", 1)
    if side == "sub":
        done, n, last = threading.Event(), [0], [0.0]

        def on_message(c: Any, userdata: Any, msg: Any) -> None:
            n[0] += 1
            if n[0] == clients * count:
                last[0] = time.time()
                done.set()

        subscribed = threading.Event()
        c = client(0)
        c.on_message = on_message
        c.on_subscribe = lambda *a: subscribed.set()
        c.subscribe(topic, qos=1)
        c.loop_start()
        if not subscribed.wait(30):
            raise RuntimeError("the broker never acknowledged the subscription")
        print("ready", flush=True)
        done.wait(600)
        c.loop_stop()
        return {"t_last": last[0], "received": n[0]}
    payload = os.urandom(size)
    pubs = [client(i) for i in range(clients)]
    for c in pubs:
        c.loop_start()
    t0 = time.time()

    def run(c: Any) -> None:
        for info in [c.publish(topic, payload, qos=1) for _ in range(count)]:
            info.wait_for_publish(600)

    threads = [threading.Thread(target=run, args=(c,)) for c in pubs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for c in pubs:
        c.loop_stop()
    return {"t_start": t0}


def capacity(bdir: Any, broker_pid: int, counters: Counters, clients: int, count: int, size: int) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "hiertrain.bench.broker"]
    creds = {a: str(bdir.credentials_file(a)) for a in ("device", "cloud")}
    before, cpu0 = counters.read(), cpu_s(broker_pid)
    sub = subprocess.Popen(cmd + ["sub", creds["cloud"], str(clients), str(count), str(size)],
                           stdout=subprocess.PIPE, text=True)
    assert sub.stdout is not None
    if sub.stdout.readline().strip() != "ready":
        sub.kill()
        raise RuntimeError("the subscriber did not start")
    pub = subprocess.run(cmd + ["pub", creds["device"], str(clients), str(count), str(size)],
                         capture_output=True, text=True, check=True)
    out, _ = sub.communicate(timeout=600)
    got = json.loads(out.strip().splitlines()[-1])
    wall = got["t_last"] - json.loads(pub.stdout.strip().splitlines()[-1])["t_start"]
    d, cpu = delta(counters.read(), before), cpu_s(broker_pid) - cpu0
    delivered = clients * count
    per_msg = cpu / delivered  # in and out: one message received and one sent per delivery
    return {"bytes": size, "clients": clients, "messages": delivered, "received": got["received"],
            "wall_s": round(wall, 3), "delivered_per_s": round(delivered / wall, 1),
            "delivered_mb_s": round(delivered * size / wall / 1e6, 2),
            "broker_cpu_s": round(cpu, 3), "broker_cpu_share": round(cpu / wall, 3),
            "broker_us_per_message": round(per_msg * 1e6, 1),
            "one_core_messages_per_s": round(1 / per_msg, 0) if per_msg > 0 else None,
            "one_core_mb_s": round(size / per_msg / 1e6, 1) if per_msg > 0 else None,
            "sys": d}


# ------------------------------------------------------------------------------ a real fleet

def fleet_step(work: Path, devices: int, window_s: float) -> dict[str, Any]:
    """Messages and bytes through the broker per device per step of a real LeNet-5 fleet, counted over
    ``window_s`` seconds of its training (between two of the broker's counter updates)."""
    from hiertrain.lab.cluster import Cluster
    from hiertrain.lab.jobs import Fleet, Spec

    specs = [Spec(f"pi{i + 1}", 4 + 2 * (i % 3), rate_mbps=20.0) for i in range(devices)]
    with Cluster(work, Fleet(specs, iterations=100000, timeout_s=120)) as c:  # stopped when counted
        counters = Counters(c.bdir.credentials_file("observer"))
        try:
            c.start("cloud", "edge", *(s.name for s in specs))
            c.wait_iteration(3, timeout=300)  # after the first plan and the segments' first runs
            before, t0 = counters.read(), time.time()
            c.pump(0)  # the watcher's queue drained: the steps done by now
            at = max(c.steps)
            while time.time() < t0 + window_s:
                c.pump(0.2)
            after, t1 = counters.read(), time.time()
            c.pump(0)
            done = max(c.steps) - at
        finally:
            counters.close()
    d = delta(after, before)
    per = {k: v / done / devices for k, v in d.items()}
    return {"devices": devices, "steps": done, "seconds": round(t1 - t0, 2), "steps_per_s": round(done / (t1 - t0), 1),
            "per_device_step": {"messages_in": round(per["publish/messages/received"], 1),
                                "messages_out": round(per["publish/messages/sent"], 1),
                                "kb_in": round(per["bytes/received"] / 1e3, 1),
                                "kb_out": round(per["bytes/sent"] / 1e3, 1)}}


def bench(args: argparse.Namespace) -> dict[str, Any]:
    from hiertrain.broker.layout import BrokerDir, Settings
    from hiertrain.broker.process import BrokerProcess, free_port

    clients = max(1, args.devices)
    rows = []
    with tempfile.TemporaryDirectory(prefix="hiertrain-bench-") as d:
        bdir = BrokerDir(Path(d) / "broker")
        bdir.init(Settings(port=free_port(), max_packet_bytes=16 << 20))
        with BrokerProcess(bdir, kind="mosquitto") as broker:
            counters = Counters(bdir.credentials_file("observer"))
            try:
                for size in SIZES:
                    count = sized(args, max(20, min(MESSAGES, VOLUME // size) // clients), 200)
                    rows.append(capacity(bdir, broker.proc.pid, counters, clients, count, size))
                    r = rows[-1]
                    print(f"{size >> 10:4d} KB x {r['messages']}: {r['delivered_per_s']:.0f} msg/s delivered, "
                          f"broker {r['broker_us_per_message']:.0f} us a message ({r['broker_cpu_share'] * 100:.0f} % "
                          f"of a core): one core carries {r['one_core_messages_per_s'] or 0:.0f} msg/s, "
                          f"{r['one_core_mb_s'] or 0:.0f} MB/s" + ("" if r["broker_cpu_s"] else " (too few messages "
                                                                     "for the broker's CPU to register)"), flush=True)
            finally:
                counters.close()
        fleet = fleet_step(Path(d) / "fleet", clients, sized(args, WINDOW_S, 2.0))
    # the broker's CPU per delivery, a + b * bytes, fitted over the sizes; a device-step's deliveries
    # (each message in goes out once) and bytes then cost what they add up to
    b, a = np.polyfit([r["bytes"] for r in rows], [r["broker_us_per_message"] for r in rows], 1)
    a, b = max(a, 0.0), max(b, 0.0)
    p = fleet["per_device_step"]
    deliveries, nbytes = (p["messages_in"] + p["messages_out"]) / 2, (p["kb_in"] + p["kb_out"]) * 1e3 / 2
    cost_us = deliveries * a + nbytes * b
    device_steps = 1e6 / cost_us
    print(f"a fleet of {fleet['devices']} (LeNet-5): {deliveries:.1f} deliveries, {nbytes / 1e3:.0f} KB through the "
          f"broker per device-step, {cost_us:.0f} us of its CPU: one core carries ~{device_steps:.0f} device-steps/s",
          flush=True)
    return {"bench": "broker", "clients": clients, "capacity": rows, "fleet": fleet,
            "cpu_model": {"us_per_delivery": round(a, 2), "us_per_kb": round(b * 1e3, 3)},
            "device_step_us": round(cost_us, 1), "device_steps_per_s": round(device_steps, 0),
            "note": "capacity from the broker's CPU per message with the clients on the same 2 cores; "
                    "one Mosquitto is single-threaded: one core is its ceiling"}


if __name__ == "__main__":
    side, creds_file, n_clients, n, nbytes = sys.argv[1:6]
    print(json.dumps(worker(side, creds_file, int(n_clients), int(n), int(nbytes))), flush=True)
