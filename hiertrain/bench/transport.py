"""Transport throughput against raw paho-mqtt, publisher and subscriber in separate processes.

Both sides go through a real Mosquitto on loopback. *raw*: paho publishes pre-made byte strings
at QoS 1 and the subscriber only counts them in its callback. *hiertrain*: ``Transport.send`` of a
float32 tensor (framed, chunked) and ``Transport.take`` of the decoded message on the other side.
Time runs from the publisher's first publish to the subscriber's last arrival.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

import numpy as np

JOB = "bench"
GOAL_OVERHEAD = 0.05


def raw_client(creds: Any, client_id: str) -> Any:
    """A plain paho client logged in with an account's credentials file, connected (not looping)."""
    import paho.mqtt.client as mqtt

    from hiertrain.net.transport import Endpoint

    ep = Endpoint.load(creds)
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id)
    client.username_pw_set(ep.username, ep.password)
    client.connect(ep.host, ep.port)
    return client


def worker(side: str, mode: str, creds: str, count: int, size: int) -> dict[str, Any]:
    from hiertrain.net import topics
    from hiertrain.net.transport import Endpoint, Transport
    from hiertrain.net.wire import Message

    topic = topics.tensor(JOB, "device", "act", "cloud", 1)
    if mode == "raw" and side == "sub":
        done, n, last = threading.Event(), [0], [0.0]

        def on_message(client: Any, userdata: Any, msg: Any) -> None:
            n[0] += 1
            if n[0] == count:
                last[0] = time.time()
                done.set()

        client = raw_client(creds, f"bench-raw-sub-{os.getpid()}")
        client.on_message = on_message
        client.subscribe(topic, qos=1)
        client.loop_start()
        time.sleep(0.2)  # let the SUBACK come back before announcing readiness
        print("ready", flush=True)
        done.wait(600)
        client.loop_stop()
        return {"t_last": last[0]}
    if mode == "raw":
        client = raw_client(creds, f"bench-raw-pub-{os.getpid()}")
        client.loop_start()
        payload = os.urandom(size)
        t0 = time.time()
        infos = [client.publish(topic, payload, qos=1) for _ in range(count)]
        for info in infos:
            info.wait_for_publish(600)
        client.loop_stop()
        return {"t_start": t0}
    account = "cloud" if side == "sub" else "device"
    transport = Transport(Endpoint.load(creds), account=account, job=JOB,
                          client_id=f"bench-{account}-{os.getpid()}", persistent=False).start()
    if side == "sub":
        print("ready", flush=True)
        for i in range(count):
            msg = transport.take("act", "device", i, 1, timeout=600)
        t_last = time.time()
        assert msg.tensors["a"].nbytes == size
        transport.stop()
        return {"t_last": t_last, "dropped": sum(transport.dropped.values())}
    a = np.random.default_rng(0).random(size // 4, dtype=np.float32)
    t0 = time.time()
    for i in range(count):
        transport.send(Message("act", JOB, "device", "cloud", i, 1, {"a": a}))
    transport.stop()
    return {"t_start": t0}


def _run_pair(mode: str, creds: dict[str, str], count: int, size: int) -> float:
    cmd = [sys.executable, "-m", "hiertrain.bench.transport"]
    sub = subprocess.Popen(cmd + ["sub", mode, creds["cloud"], str(count), str(size)],
                           stdout=subprocess.PIPE, text=True)
    assert sub.stdout is not None
    if sub.stdout.readline().strip() != "ready":
        sub.kill()
        raise RuntimeError(f"{mode} subscriber did not start")
    pub = subprocess.run(cmd + ["pub", mode, creds["device"], str(count), str(size)],
                         capture_output=True, text=True, check=True)
    out, _ = sub.communicate(timeout=600)
    t_last = json.loads(out.strip().splitlines()[-1])["t_last"]
    t_start = json.loads(pub.stdout.strip().splitlines()[-1])["t_start"]
    return t_last - t_start


def bench(args: argparse.Namespace) -> dict[str, Any]:
    from hiertrain.broker.layout import BrokerDir, Settings
    from hiertrain.broker.process import BrokerProcess, free_port

    size, count = args.size_mb << 20, args.count
    with tempfile.TemporaryDirectory(prefix="hiertrain-bench-") as d:
        bdir = BrokerDir(d)
        bdir.init(Settings(port=free_port(), max_packet_bytes=max(16 << 20, size + (1 << 20))))
        creds = {a: str(bdir.credentials_file(a)) for a in ("device", "cloud")}
        times: dict[str, list[float]] = {"raw": [], "hiertrain": []}
        with BrokerProcess(bdir, kind="mosquitto"):
            for _ in range(args.repeat):
                for mode in times:  # alternate, so drift hits both alike
                    times[mode].append(_run_pair(mode, creds, count, size))
    med = {m: statistics.median(t) for m, t in times.items()}
    overhead = med["hiertrain"] / med["raw"] - 1
    return {
        "bench": "transport", "message_bytes": size, "messages": count, "repeat": args.repeat,
        "raw_mb_s": round(count * size / med["raw"] / 1e6, 1),
        "hiertrain_mb_s": round(count * size / med["hiertrain"] / 1e6, 1),
        "raw_s": [round(t, 4) for t in times["raw"]],
        "hiertrain_s": [round(t, 4) for t in times["hiertrain"]],
        "overhead": round(overhead, 4), "goal_overhead": GOAL_OVERHEAD,
        "meets_goal": overhead <= GOAL_OVERHEAD,
    }


if __name__ == "__main__":
    side, mode, creds_file, n, nbytes = sys.argv[1:6]
    print(json.dumps(worker(side, mode, creds_file, int(n), int(nbytes))), flush=True)
