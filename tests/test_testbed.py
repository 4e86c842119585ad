"""The emulated testbed: namespaces, shaped links, quotas; a short run that cleans up after itself."""

import json
import os
import statistics
import subprocess
import time

import pytest

from conftest import PYTHON, ROOT
from hiertrain.lab import cgroup, testbed

pytestmark = [pytest.mark.integration, pytest.mark.slow,
              pytest.mark.skipif(testbed.available() is not None or cgroup.available() is not None,
                                 reason="the testbed needs root, iproute2 and cgroup v1")]


def _state():
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return netns, sorted(os.listdir(cgroup.ROOT))


def test_a_shaped_link_carries_what_its_rate_allows(tmp_path):
    before = _state()
    with testbed.Testbed(bw_device_edge=8, bw_edge_cloud=2, tag="httest") as net:
        receiver = ("import socket,time\ns=socket.socket();s.bind(('0.0.0.0',5009));s.listen();print('up',flush=True)\n"
                    "c,_=s.accept();n=0;t=time.time()\nwhile True:\n d=c.recv(65536)\n if not d: break\n n+=len(d)\n"
                    "print(n*8/(time.time()-t)/1e6)")
        srv = subprocess.Popen(net.prefix("cloud") + [PYTHON, "-c", receiver], stdout=subprocess.PIPE, text=True)
        assert srv.stdout.readline().strip() == "up"
        subprocess.run(net.prefix("edge") + [PYTHON, "-c", "import socket;s=socket.create_connection(('10.223.2.2',5009));"
                                             "s.sendall(b'x'*500000);s.close()"], check=True, timeout=60)
        mbps = float(srv.communicate(timeout=60)[0].split()[-1])
        assert 1.0 < mbps <= 2.1  # 2 Mbit/s minus TCP's start
    assert _state() == before  # namespaces and links removed


def test_a_short_testbed_run_and_its_cleanup(tmp_path):
    """Fit phase, one sweep point and a validity schedule; then nothing of the testbed is left."""
    before = _state()
    out = tmp_path / "tb.json"
    r = subprocess.run([PYTHON, "-m", "hiertrain", "bench", "testbed", "--batch", "16", "--count", "3",
                        "--points", "3", "--policies", "hiertrain,all-edge,three-way", "--device-quota", "0.05",
                        "--edge-quota", "0.2", "--out", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [(row["phase"], row["policy"]) for row in rows] == [
        ("fit", "all-edge"), ("fit", "all-cloud"), ("fit", "all-device"),
        ("sweep", "hiertrain"), ("sweep", "all-edge"), ("validity", "three-way")]
    assert all(row["measured_s"] > 0 and row["predicted_s"] > 0 and row["predicted_paper_s"] > 0 for row in rows)
    assert set(result["calibration"]["overhead_s"]) == {"device", "edge", "cloud"}
    # the device->edge link was shaped to 5 Mbit/s: the runs that sent samples measured a payload rate
    # near it. A rate comes from one message's frame arrivals in a CPU-throttled tier (a few ms of
    # jitter over ~60 ms) on every RATE_EVERY-th iteration, so a run of 3 has one figure at most and it
    # can be 10-20 % off either way (5.23 and 5.59 seen, the latter with a second test run beside it);
    # unshaped, the link measures hundreds of Mbit/s.
    rates = [row["link_rates"]["device_edge"] for row in rows if "device_edge" in row["link_rates"]]
    assert rates and 2.5 < statistics.median(rates) < 6.5, rates
    assert out.with_suffix(".png").exists()
    assert _state() == before


def test_without_root_one_clear_line(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert testbed.available() == "the testbed needs root (network namespaces, tc and cgroups)"


SINK = ("import socket,threading,time\ns=socket.socket();s.bind(('0.0.0.0',5010));s.listen();print('up',flush=True)\n"
        "out={};span=[]\ndef take(c,a):\n n=0;t=time.time();span.append(t)\n while True:\n  d=c.recv(65536)\n"
        "  if not d: break\n  n+=len(d)\n e=time.time();span.append(e);out[a[0]]=(n, n*8/(e-t)/1e6)\nths=[]\n"
        "for _ in range({n}):\n c,a=s.accept();th=threading.Thread(target=take,args=(c,a));th.start();ths.append(th)\n"
        "for th in ths: th.join()\nprint(repr((out, sum(n for n,_ in out.values())*8/(max(span)-min(span))/1e6)))")


def _send(net, device, nbytes):
    code = f"import socket;s=socket.create_connection(('{net.address['edge']}',5010));s.sendall(b'x'*{nbytes});s.close()"
    return subprocess.Popen(net.prefix(device) + [PYTHON, "-c", code])


def test_a_fleet_shares_one_medium_each_device_capped_by_its_radio():
    """Devices alone reach their own radio's rate; sending together they share the medium's."""
    import ast

    before = _state()
    with testbed.FleetTestbed({"pi-a": 12, "pi-b": 12, "pi-c": 3}, medium_mbps=10, bw_edge_cloud=5,
                              tag="hftest") as net:
        def measure(devices, nbytes):
            sink = subprocess.Popen(net.prefix("edge") + [PYTHON, "-c", SINK.replace("{n}", str(len(devices)))],
                                    stdout=subprocess.PIPE, text=True)
            assert sink.stdout.readline().strip() == "up"
            senders = [_send(net, d, nbytes) for d in devices]
            for p in senders:
                assert p.wait(60) == 0
            rates, total = ast.literal_eval(sink.communicate(timeout=60)[0].strip())
            return {d: rates[net.address[d]][1] for d in devices}, total

        alone, _ = measure(["pi-c"], 800_000)
        assert 1.8 < alone["pi-c"] <= 3.15  # its radio
        together, total = measure(["pi-a", "pi-b"], 2_000_000)
        assert all(r < 9.5 for r in together.values()), together  # neither gets its 12 Mbit/s radio
        assert 6.5 < total <= 10.3, (total, together)              # together they share the 10 Mbit/s medium

        # half duplex: pi-a sending to the edge while the edge sends to pi-b share the same 10 Mbit/s
        sinks = {where: subprocess.Popen(net.prefix(where) + [PYTHON, "-c", SINK.replace("{n}", "1")],
                                         stdout=subprocess.PIPE, text=True) for where in ("edge", "pi-b")}
        for sink in sinks.values():
            assert sink.stdout.readline().strip() == "up"
        down = ("import socket;s=socket.create_connection(('" + net.address["pi-b"] + "',5010));"
                "s.sendall(b'x'*2000000);s.close()")
        t0 = time.monotonic()
        flows = [_send(net, "pi-a", 2_000_000), subprocess.Popen(net.prefix("edge") + [PYTHON, "-c", down])]
        for p in flows:
            assert p.wait(60) == 0
        for sink in sinks.values():
            sink.communicate(timeout=60)
        both = 2 * 2_000_000 * 8 / (time.monotonic() - t0) / 1e6
        assert 5.0 < both <= 10.5, both  # full duplex would carry ~20 Mbit/s, each direction its own 10
    assert _state() == before


def test_what_an_earlier_run_left_behind_is_stepped_around():
    """A testbed killed before its cleanup leaves its namespaces and its management address here
    (and a run in another pid namespace may have the same pid): the next one takes a free name and
    a free management subnet, its edge is reachable on it, and it removes only what it made."""
    base = f"ht{os.getpid() % 100000}"
    subprocess.run(["ip", "netns", "add", f"{base}-edge"], check=True)
    subprocess.run(["ip", "link", "add", "htstale0", "type", "veth", "peer", "name", "htstale1"], check=True)
    try:
        subprocess.run(["ip", "addr", "add", "10.223.9.1/24", "dev", "htstale0"], check=True)
        before = _state()
        with testbed.Testbed(bw_device_edge=8, bw_edge_cloud=2) as net:
            assert net.tag != base and net.address["root"] == "10.223.10.1", (net.tag, net.address)
            listener = ("import socket;s=socket.socket();s.bind(('0.0.0.0',5011));s.listen();print('up',flush=True);"
                        "c,_=s.accept();print(c.recv(16).decode())")
            srv = subprocess.Popen(net.prefix("edge") + [PYTHON, "-c", listener], stdout=subprocess.PIPE, text=True)
            assert srv.stdout.readline().strip() == "up"
            import socket
            with socket.create_connection((net.broker_for["root"], 5011), timeout=10) as c:
                c.sendall(b"hello")
            assert srv.communicate(timeout=30)[0].strip() == "hello"
        assert _state() == before
    finally:
        subprocess.run(["ip", "link", "del", "htstale0"], check=True)
        subprocess.run(["ip", "netns", "del", f"{base}-edge"], check=True)
