"""The dashboard: its state folded from the observer's messages (bounded, never raising), its server
(the observer's account only, exposed only over TLS with the password), and its page opened in
headless Chromium on a real fleet over Mosquitto."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
import urllib.request

import pytest

from hiertrain.dashboard.state import EVENTS, POINTS, Board, Curve
from hiertrain.schedule import Schedule


def _fleet_schedule(version, members):
    """A fleet's plan as the edge publishes it: each member trains units 1..m, the edge the rest."""
    from hiertrain.plan import Group, Plan, Stage

    groups = tuple(Group(name, name, n, (Stage(name, 1, m), Stage("edge", m + 1, 7)), "edge") for name, n, m in members)
    return {"policy": "hiertrain", "iteration_s": 0.01, "groups": Plan(7, groups, ("edge",) * 7, driver="edge").to_json(),
            "version": version, "effective_iteration": 0}


def test_the_board_follows_statuses_steps_plans_and_refusals_and_names_each_as_an_event():
    b = Board("j")
    b.offer("pi1", "status", {"state": "online"}, 1.0)
    b.offer("edge", "status", {"state": "online"}, 1.0)
    b.offer("", "schedule", _fleet_schedule(1, [("pi1", 4, 2)]), 2.0)
    b.offer("edge", "telemetry", {"iteration": 0, "loss": 2.3, "iteration_s": 0.02, "predicted_s": 0.01,
                                  "schedule_version": 1, "fleet": [["pi1", 0, 4, 2, 7]], "role": "coordinator",
                                  "accuracy": 0.25}, 3.0)
    b.offer("pi1", "telemetry", {"iteration": 0, "dropped": {"malformed": 2}, "links": {"device-edge": 9.5}}, 3.0)
    b.offer("", "schedule", _fleet_schedule(1, [("pi1", 4, 2)]), 3.5)  # the retained copy again: no event
    b.offer("pi1", "status", {"state": "offline"}, 4.0)
    b.offer("", "schedule", {**_fleet_schedule(2, [("pi2", 4, 2)]), "reason": "pi1 left"}, 4.2)
    b.offer("edge", "telemetry", {"iteration": 1, "loss": float("nan"), "iteration_s": 0.02}, 4.5)  # diverged
    s = b.snapshot()
    assert s["step"] == 1 and s["schedule"]["version"] == 2 and s["steps"][-1]["loss"] is None
    s["steps"].pop()
    assert s["plan"]["groups"] == [{"name": "pi2", "samples": 4, "stages": [["pi2", 1, 2], ["edge", 3, 7]]}]
    pi1 = next(a for a in s["accounts"] if a["name"] == "pi1")
    assert (pi1["state"], pi1["refused"], pi1["kind"], pi1["links"]) == ("offline", 2, "device", {"device-edge": 9.5})
    assert [e["kind"] for e in s["events"]] == ["join", "join", "replan", "refusal", "leave", "failover"]
    assert s["events"][-1]["text"] == "plan v2 from step 0: hiertrain, pi1 left (was v1)"
    assert s["steps"] == [{"step": 0, "t": 3.0, "loss": 2.3, "seconds": 0.02, "predicted": 0.01, "version": 1,
                           "devices": 1, "accuracy": 0.25}]
    json.dumps(s, allow_nan=False)


def test_a_three_tier_schedule_is_drawn_as_its_sample_groups():
    b = Board("j")
    sched = Schedule(mapping={"o": "cloud", "s": "device", "l": "edge"}, m_s=2, m_l=5, b_o=4, b_s=4, b_l=0,
                     iteration_s=0.1).versioned(3, 10).to_json()
    b.offer("", "schedule", sched, 1.0)
    assert b.snapshot()["plan"] == {"units": None, "groups": [
        {"name": "o", "samples": 4, "stages": [["cloud", 1, None]]},
        {"name": "s", "samples": 4, "stages": [["device", 1, 2], ["cloud", 3, None]]}]}
    b.offer("cloud", "telemetry", {"iteration": 10, "loss": 1.0, "iteration_s": 0.2, "schedule_version": 3, "role": "o"}, 2.0)
    s = b.snapshot()
    assert s["steps"][0]["predicted"] == 0.1 and s["accounts"][0]["role"] == "worker_o"  # the schedule's prediction


def test_what_the_board_cannot_read_is_counted_and_never_raised():
    b = Board("j")
    for kind, payload in [("status", "x"), ("schedule", {"version": "no"}), ("telemetry", {"iteration": 1, "loss": "x"}),
                          ("schedule", {"groups": {"kind": "?"}}), ("telemetry", {"dropped": {"a": "b"}}), ("nope", {})]:
        b.offer("pi1", kind, payload, 1.0)
    assert b.ignored == 6 and b.snapshot()["step"] is None


def test_the_board_stays_bounded_over_a_long_job_and_a_big_fleet():
    b = Board("j")
    for i in range(100_000):
        b.offer("edge", "telemetry", {"iteration": i, "loss": 1.0 / (i + 1), "iteration_s": 0.01}, float(i))
    for i in range(1000):
        b.offer(f"pi{i}", "status", {"state": "online" if i % 2 else "offline"}, 1.0)
    s = b.snapshot()
    assert len(s["steps"]) < POINTS and s["steps"][0]["step"] == 0 and s["steps"][-1]["step"] > 99_000
    assert len(s["events"]) == EVENTS and len(s["accounts"]) <= 256
    assert len(json.dumps(s)) < 300_000


def test_a_curve_keeps_its_whole_history_at_a_coarser_step():
    c = Curve(limit=8)
    for i in range(100):
        c.add({"i": i})
    steps = [p["i"] for p in c.points]
    assert len(steps) < 8 and steps[0] == 0 and len(set(b - a for a, b in zip(steps, steps[1:]))) == 1


def _chromium():
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    assert found, "no chromium: scripts/setup.sh installs Debian's chromium package"
    return found


def _page(url, *, shot=None):
    """The page's DOM after Chromium ran its script for a few (virtual) seconds."""
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--virtual-time-budget=4000", "--window-size=1400,1000"]
    out = subprocess.run([*cmd, *([f"--screenshot={shot}"] if shot else ["--dump-dom"]), url],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def _states(dom):
    return dict(re.findall(r'<tr data-name="([^"]+)" data-state="([^"]+)"', dom))


def _step(dom):
    found = re.search(r'id="step">(\d+)<', dom)
    return int(found.group(1)) if found else -1


@pytest.mark.integration
@pytest.mark.slow
def test_the_page_in_chromium_shows_the_fleet_live_and_a_lost_device(tmp_path):
    from hiertrain.broker.process import free_port
    from hiertrain.lab.cluster import Cluster
    from hiertrain.lab.jobs import Fleet, Spec

    devices = [Spec("pi1", 4, path=(2, 5)), Spec("pi2", 4, path=(0, 7)), Spec("pi3", 3, path=(7, 7))]
    with Cluster(tmp_path, Fleet(devices, iterations=100_000, timeout_s=30, eval_every=5)) as c:
        url = c.start_dashboard(free_port())
        c.start()
        c.wait_iteration(3)
        first = _page(url)
        assert {k: v for k, v in _states(first).items() if k.startswith("pi")} == dict.fromkeys(
            ("pi1", "pi2", "pi3"), "online"), first
        assert re.search(r'id="plan-version">v\d+<', first) and 'data-name="pi3"' in first.split('id="plan"')[1]
        c.wait_iteration(_step(first) + 5)
        _page(url, shot=tmp_path / "dashboard.png")
        assert (tmp_path / "dashboard.png").stat().st_size > 10_000
        later = _page(url)
        assert _step(later) > _step(first) >= 3
        assert "<path" in later.split('id="accuracy"')[1].split("</svg>")[0]  # the edge scores every 5 steps
        c.kill("pi3")                                       # its Last Will: the page shows it gone
        deadline = time.monotonic() + 60
        while _states(_page(url)).get("pi3") == "online":
            assert time.monotonic() < deadline, "pi3 still online on the page"
        last = _page(url)
        assert _states(last)["pi3"] in ("offline", "lost", "failed"), _states(last)
        assert re.search(r'data-kind="leave">[^<]*pi3 ', last), last
        # the server refuses what it should: no other path, and the JSON is what the page drew
        with pytest.raises(urllib.error.HTTPError, match="404"):
            urllib.request.urlopen(url + "secrets", timeout=10)
        state = json.loads(urllib.request.urlopen(url + "state.json", timeout=10).read())
        assert state["job"] == c.job.name and state["ignored"] == 0


@pytest.mark.process
def test_the_dashboard_refuses_a_tier_account_and_an_exposed_address_without_tls(tmp_path, broker_dir):
    for creds, args, why in [("edge", [], "the dashboard reads with the observer account, not 'edge'"),
                             ("observer", ["--bind", "0.0.0.0"], "--bind 0.0.0.0 exposes the dashboard: give --cert")]:
        cfg = tmp_path / f"{creds}.toml"
        cfg.write_text(f'job = "t"\n[broker]\ncredentials = "{broker_dir.credentials_file(creds)}"\n')
        out = subprocess.run([sys.executable, "-m", "hiertrain", "dashboard", "--config", str(cfg), *args],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode != 0 and why in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr


@pytest.mark.protocol
def test_an_exposed_dashboard_serves_over_tls_to_the_observers_password_only(tmp_path, mosquitto, broker_dir):
    from hiertrain import config
    from hiertrain.dashboard.server import Dashboard
    from hiertrain.net.transport import Endpoint

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    made = subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                           "-keyout", str(key), "-out", str(cert)], capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    cfg = tmp_path / "observer.toml"
    cfg.write_text(f'job = "t"\n[broker]\ncredentials = "{broker_dir.credentials_file("observer")}"\n')
    import base64
    import ssl

    ctx = ssl.create_default_context(cafile=str(cert))
    ctx.check_hostname = False
    password = Endpoint.load(broker_dir.credentials_file("observer")).password
    with Dashboard(config.load(cfg), port=0, bind="0.0.0.0", cert=cert, key=key) as d:
        url = f"https://127.0.0.1:{d.server.server_address[1]}/state.json"
        with pytest.raises(urllib.error.HTTPError, match="401"):
            urllib.request.urlopen(url, context=ctx, timeout=10)
        wrong = urllib.request.Request(url, headers={"Authorization": "Basic " + base64.b64encode(b"observer:no").decode()})
        with pytest.raises(urllib.error.HTTPError, match="401"):
            urllib.request.urlopen(wrong, context=ctx, timeout=10)
        right = urllib.request.Request(url, headers={
            "Authorization": "Basic " + base64.b64encode(f"observer:{password}".encode()).decode()})
        assert json.loads(urllib.request.urlopen(right, context=ctx, timeout=10).read())["job"] == "t"
        with pytest.raises(OSError):  # no plain HTTP
            urllib.request.urlopen(url.replace("https", "http"), timeout=10)
        import socket

        with socket.create_connection(("127.0.0.1", d.server.server_address[1])):  # one that never shakes hands
            assert json.loads(urllib.request.urlopen(right, context=ctx, timeout=10).read())["job"] == "t"
