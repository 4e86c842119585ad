"""Hostile and faulty input, on real Mosquitto with a job-bound broker (``broker init --job``):
each finding of the issue reproduced, and what must hold: the training result unchanged (or a
clean one-line failure where the fault must stop it), no traceback, memory bounded, refusals
counted."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import time

import numpy as np
import pytest

from cluster import dump, reference, rel, schedule
from conftest import PYTHON, ROOT, subscribed, until
from synthetic import planner_config
from hiertrain.broker.layout import BrokerDir, Settings
from hiertrain.broker.process import BrokerProcess, free_port
from hiertrain.net import topics, wire
from hiertrain.train import checkpoint
from hiertrain.bench.hostile import flood, raw_client, rss_mb
from hiertrain.lab.cluster import Cluster
from hiertrain.lab.jobs import ThreeTier
from hiertrain.schedule import Schedule
from hiertrain.net.transport import Endpoint, Transport

pytestmark = pytest.mark.integration
JOB = "t"


@pytest.fixture
def bound(tmp_path):
    """A broker directory whose accounts serve job ``t`` only, and its Mosquitto."""
    bdir = BrokerDir(tmp_path / "broker")
    bdir.init(Settings(port=free_port(), bind="127.0.0.1", job=JOB))
    with BrokerProcess(bdir, kind="mosquitto") as proc:
        yield bdir, proc


def _transport(bdir, account, **kw):
    return Transport(Endpoint.load(bdir.credentials_file(account)), account=account, job=JOB, **kw).start()


def _raw(bdir, account, *, v5=False):
    return raw_client(Endpoint.load(bdir.credentials_file(account)), v5=v5)


def _schedules(watch, timeout):
    got, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            ev = watch.events.get(timeout=0.1)
        except queue.Empty:
            continue
        if isinstance(ev.topic, topics.ScheduleTopic):
            got.append(ev.payload)
    return got


def _cluster(tmp_path, bdir, **kw):
    return Cluster(tmp_path, ThreeTier(name=JOB, chunk_kb=16, **kw), broker_dir=bdir)


# 1 -------------------------------------------------------------------------------- telemetry

def test_the_planner_refuses_telemetry_it_cannot_trust_and_never_dies(bound, tmp_path):
    bdir, _ = bound
    cfg, _ = planner_config(tmp_path, bdir.credentials_file("planner"), job=JOB)
    watch = Transport(Endpoint.load(bdir.credentials_file("planner")), account="planner", job=JOB, observer=True)
    watch.subscribe(topics.schedule(JOB))
    watch.subscribe(topics.status(JOB, "planner"))
    watch.start()
    device, edge, cloud = (_transport(bdir, t) for t in ("device", "edge", "cloud"))
    raw_edge = _raw(bdir, "edge")

    def planner():
        return subprocess.Popen([PYTHON, "-m", "hiertrain", "planner", "run", "--config", str(cfg)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)

    proc = planner()
    try:
        assert [s["version"] for s in _schedules(watch, 3)] == [1]
        # a device reporting the WAN link it is not on; an iteration of 10^15 from one account
        device.publish_json(topics.telemetry(JOB, "device"), {"iteration": 5, "links": {"edge_cloud": 0.01}})
        device.publish_json(topics.telemetry(JOB, "device"), {"iteration": 10**15, "links": {"device_edge": 5.0}})
        # an infinite rate, retained so that it comes back at every restart of the planner
        raw_edge.publish(topics.telemetry(JOB, "edge"), '{"iteration": 6, "links": {"edge_cloud": Infinity}}',
                         qos=1, retain=True).wait_for_publish(5)
        assert _schedules(watch, 2) == []  # none of it re-planned
        assert proc.poll() is None
        for i in (7, 8):  # a real drop, measured twice
            cloud.publish_json(topics.telemetry(JOB, "cloud"), {"iteration": i, "links": {"edge_cloud": 0.05}})
        second = _schedules(watch, 3)
        assert [s["version"] for s in second] == [2] and second[0]["effective_iteration"] == 10  # 8 + lead
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
        assert proc.returncode == 0 and "Traceback" not in err
        for why in ("unauthorized: device reported link 'edge_cloud'", "unconfirmed iteration: device reports",
                    "implausible rate: edge_cloud = inf"):
            assert why in err, err
        proc = planner()  # the retained Infinity again, at once: it lives
        time.sleep(3)
        assert proc.poll() is None
        status = None
        while True:
            try:
                ev = watch.events.get(timeout=0.5)
            except queue.Empty:
                break
            if isinstance(ev.topic, topics.AccountTopic):
                status = ev.payload
        assert status is not None and status["dropped"].get("implausible rate", 0) >= 1, status
    finally:
        proc.terminate()
        proc.communicate(timeout=20)
        raw_edge.publish(topics.telemetry(JOB, "edge"), b"", qos=1, retain=True).wait_for_publish(5)
        raw_edge.loop_stop()
        for t in (device, edge, cloud, watch):
            t.stop()


# 2 ------------------------------------------------------------------------ retained frames

def test_retained_tensor_frames_and_stop_frames_are_ignored(bound, tmp_path):
    bdir, _ = bound
    spec_shape = (3, 32, 32)
    raw = _raw(bdir, "device")
    rng = np.random.default_rng(9)
    planted = wire.Message("samples", JOB, "device", "edge", 0, 0,
                           {"x": rng.standard_normal((4, *spec_shape)).astype(np.float32)}, 1)
    stop = wire.Message("samples", JOB, "device", "cloud", 0, 0, {}, 0, {"stop": True})
    for msg in (planted, stop):
        for frame in wire.encode_message(msg, msg_id=f"planted-{msg.dest}"):
            raw.publish(msg.topic, frame, qos=1, retain=True).wait_for_publish(5)
    c = _cluster(tmp_path, bdir, iterations=12, every=12)
    try:
        c.publish(schedule("cloud", "device", "edge", 2, 5, 4, 4, 4, version=1))
        c.start()
        codes = c.wait()
        assert codes == {"device": 0, "edge": 0, "cloud": 0}, dump(c)
        ref_losses, ref_params = reference(c, 12)
        losses = c.losses()
        assert [round(losses[i], 5) for i in range(12)] == pytest.approx([round(x, 5) for x in ref_losses], rel=1e-4)
        assert rel(c.final_checkpoint().params, ref_params) < 1e-4
        dropped = {a: p["dropped"] for a, p in c.telemetry}
        assert dropped["edge"].get("retained", 0) >= 1 and dropped["cloud"].get("retained", 0) >= 1, dropped
    finally:
        c.close()
        for msg in (planted, stop):
            raw.publish(msg.topic, b"", qos=1, retain=True).wait_for_publish(5)
        raw.loop_stop()


# 6 --------------------------------------------------------------------------- isolation

def test_accounts_are_bound_to_their_job_and_read_only_what_their_role_needs(bound):
    bdir, _ = bound
    acks: dict[int, object] = {}
    spy = _raw(bdir, "device", v5=True)
    spy.on_publish = lambda c, u, mid, reason, props: acks.__setitem__(mid, reason)
    got: list[str] = []
    spy.on_message = lambda c, u, m: got.append(m.topic)
    edge = _transport(bdir, "edge")
    try:
        other_job = spy.publish("hiertrain/other/device/telemetry", b"{}", qos=1)
        others_topic = spy.publish(topics.status(JOB, "edge"), b'{"state": "offline"}', qos=1)
        own = spy.publish(topics.telemetry(JOB, "device"), b"{}", qos=1)
        until(lambda: {other_job.mid, others_topic.mid, own.mid} <= set(acks), what="three PUBACKs")
        assert acks[other_job.mid].is_failure and acks[others_topic.mid].is_failure  # not authorized
        assert not acks[own.mid].is_failure
        subscribed(spy, ("#", 1), (f"hiertrain/{JOB}/+/+/+/+", 1))  # and every tier's tensors
        edge.send(wire.Message("samples", JOB, "edge", "cloud", 0, 0, {}, 1))  # to the cloud, not the device
        edge.publish_json(topics.telemetry(JOB, "edge"), {"iteration": 0})  # the device may read this
        edge.flush()
        time.sleep(0.5)
        # Mosquitto 2.0 grants a subscription and filters what it delivers by the read ACL
        assert topics.telemetry(JOB, "edge") in got and not [t for t in got if len(t.split("/")) == 6], got
    finally:
        spy.loop_stop()
        edge.stop()


# 7 ------------------------------------------------------------------ config that cannot work

@pytest.mark.parametrize("runtime,train,why", [
    ({"chunk_kb": 65536}, {}, "chunk_kb = 65536 does not fit the broker's max_packet_size"),
    ({"chunk_kb": 0}, {}, "chunk_kb = 0 must be >= 1"),
    ({"threads": -4}, {}, "threads = -4 must be >= 0"),
    ({}, {"timeout_s": float("inf")}, "timeout_s = inf must be a finite number"),
    ({}, {"batch": 10**8}, "batch = 100000000 is not in 1..65536"),
    ({}, {}, "[data] compress = 'yes' is not true or false"),
])
def test_config_that_cannot_work_is_refused_in_one_line(bound, tmp_path, runtime, train, why):
    bdir, _ = bound
    lines = [f'job = "{JOB}"', "[broker]", f'credentials = "{bdir.credentials_file("edge")}"', "[train]",
             'model = "lenet5"'] + [f"{k} = {'inf' if v == float('inf') else v}" for k, v in train.items()]
    lines += ["[runtime]"] + [f"{k} = {v}" for k, v in runtime.items()]
    lines += ['[data]\ncompress = "yes"'] if "compress" in why else []
    cfg = tmp_path / "edge.toml"
    cfg.write_text("\n".join(lines) + "\n")
    proc = subprocess.run([PYTHON, "-m", "hiertrain", "edge", "run", "--config", str(cfg)], capture_output=True,
                          text=True, cwd=ROOT, timeout=60)
    assert proc.returncode != 0 and why in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


@pytest.mark.parametrize("standby,why", [
    ('"10.0.1.2:1883"', "[broker] standby must be a list"),
    ('["10.0.1.2"]', "[broker] bad standby broker address '10.0.1.2': expected host:port"),
    ('["10.0.1.2:99999"]', "bad standby broker address"),
])
def test_a_standby_broker_that_cannot_work_is_refused_in_one_line(broker_dir, tmp_path, standby, why):
    from hiertrain import tierconfig
    from hiertrain.errors import ConfigError

    cfg = tmp_path / "edge.toml"
    cfg.write_text(f'job = "{JOB}"\n[broker]\ncredentials = "{broker_dir.credentials_file("edge")}"\nstandby = {standby}\n'
                   '[train]\nmodel = "lenet5"\n')
    with pytest.raises(ConfigError) as err:
        tierconfig.load("edge", cfg)
    assert why in str(err.value) and str(cfg) in str(err.value), err.value


def test_a_config_for_another_job_than_the_credentials_is_refused(bound, tmp_path):
    bdir, _ = bound
    cfg = tmp_path / "edge.toml"
    cfg.write_text(f'job = "other"\n[broker]\ncredentials = "{bdir.credentials_file("edge")}"\n')
    proc = subprocess.run([PYTHON, "-m", "hiertrain", "edge", "run", "--config", str(cfg)], capture_output=True,
                          text=True, cwd=ROOT, timeout=60)
    assert proc.returncode != 0 and "credentials serve only job 't'" in proc.stderr, proc.stderr


def test_plan_refuses_an_absurd_batch_in_one_line():
    proc = subprocess.run([PYTHON, "-m", "hiertrain", "plan", "--profile", str(ROOT / "bench/profiles/lenet5.json"),
                           "--bw-device-edge", "5", "--bw-edge-cloud", "1", "--batch", "100000000"],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 2 and "batch 100000000 is over the limit" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


# 3 ----------------------------------------------------------------------- bounded memory

def test_floods_leave_memory_bounded_refusals_counted_and_training_unchanged(bound, tmp_path):
    bdir, _ = bound
    n = 800  # long enough to outlast the floods; a small rate keeps the steps from amplifying rounding,
    # and the cloud on one thread as the reference (two threads' sums part from it by 1e-3 in 400 steps)
    c = _cluster(tmp_path, bdir, iterations=n, every=n, timeout_s=60, lr=0.005, threads={"cloud": 1})
    plan = schedule("cloud", "device", "edge", 2, 5, 4, 4, 4, version=1)
    try:
        c.publish(plan)
        c.start()
        c.wait_iteration(4)
        pid = c.procs["edge"].pid
        before = rss_mb(pid)
        device = Endpoint.load(bdir.credentials_file("device"))
        for kind, count in (("big", 800), ("tiny", 50_000), ("ahead", 200)):
            flood(device, JOB, "edge", kind, start=4, count=count)
        assert c.procs["edge"].poll() is None, "the run ended before the flood did: make it longer"
        peak = rss_mb(pid, "VmHWM")
        codes = c.wait(timeout=300)
        assert codes == {"device": 0, "edge": 0, "cloud": 0}, dump(c)
        # the same plan in one process: what its sums equal
        ref_losses, ref_params = reference(c, n, Schedule.from_json(plan))
        losses = c.losses()
        off = [(i, losses[i], ref_losses[i]) for i in range(n) if losses[i] != pytest.approx(ref_losses[i], rel=1e-4)]
        assert not off, off[:5]
        assert rel(c.final_checkpoint().params, ref_params) < 1e-4
        dropped = [p["dropped"] for a, p in c.telemetry if a == "edge"][-1]
        assert dropped.get("evicted", 0) >= 50_000 and dropped.get("too far ahead", 0) >= 1, dropped
        # the issue saw 298 -> 1102 MB; what remains is paho's and the dispatcher's queues in flight
        assert peak - before < 200, (before, peak)
        print(json.dumps({"edge_rss_before_mb": round(before), "edge_peak_mb": round(peak), "dropped": dropped}))
    finally:
        c.close()


# 4 ---------------------------------------------------------------------------- broker crash

@pytest.mark.parametrize("saved", [False, True], ids=["its-save-lost", "from-its-last-save"])
def test_a_broker_crash_and_restart_is_survived(bound, tmp_path, saved):
    """The broker crashes mid-run and comes back without our sessions (its save lost) or with
    them as its last save held them (autosave, seconds old): either way every tier publishes
    again what the broker may have lost, and the run ends as if nothing happened."""
    bdir, broker = bound
    c = _cluster(tmp_path, bdir, iterations=40, every=5, timeout_s=60)
    try:
        c.publish(schedule("cloud", "device", "edge", 2, 5, 4, 4, 4, version=1))
        c.start()
        c.wait_iteration(10)
        tiers = ("device", "edge", "cloud")
        if saved:  # frozen while the broker saves their sessions (autosave_interval 5)
            for tier in tiers:
                c.pause(tier)
            time.sleep(6)
        os.kill(broker.pid, signal.SIGKILL)
        broker.stop()
        if not saved:
            for f in bdir.data.glob("*.db"):
                f.unlink()
        time.sleep(2)
        for tier in tiers if saved else ():
            c.resume(tier)
        with BrokerProcess(bdir, kind="mosquitto"):
            codes = c.wait(timeout=300)
            assert codes == {"device": 0, "edge": 0, "cloud": 0}, dump(c)
        ref_losses, ref_params = reference(c, 40)
        assert rel(c.final_checkpoint().params, ref_params) < 1e-4
        for tier in ("device", "edge", "cloud"):
            log = c.log(tier)
            why = "may have restarted from its last save" if saved else "the broker lost our session (restarted?)"
            assert f"{why}; published again" in log and "Traceback" not in log, log
    finally:
        c.close()


def test_the_retained_schedule_survives_a_broker_crash(bound, tmp_path):
    bdir, broker = bound
    sched = schedule("cloud", "device", "edge", 2, 5, 4, 4, 4, version=3)
    # published by a planner that is gone before the crash: nobody publishes it again
    with Transport(Endpoint.load(bdir.credentials_file("planner")), account="planner", job=JOB) as planner:
        planner.publish_json(topics.schedule(JOB), sched, retain=True)
        planner.flush(5)
    published = time.time()
    db = bdir.data / "mosquitto.db"  # Mosquitto autosaves every 5 s (counted in whole seconds): wait for a save
    deadline = time.monotonic() + 20
    while not (db.exists() and db.stat().st_mtime > published) and time.monotonic() < deadline:
        time.sleep(0.1)
    os.kill(broker.pid, signal.SIGKILL)
    broker.stop()
    with BrokerProcess(bdir, kind="mosquitto"):
        watch = Transport(Endpoint.load(bdir.credentials_file("cloud")), account="cloud", job=JOB, observer=True)
        watch.subscribe(topics.schedule(JOB))
        with watch:
            ev = watch.events.get(timeout=10)
        assert ev.payload == sched and ev.retained


# 5 ------------------------------------------------------------- fast, correct failure reports

def test_a_lost_worker_o_is_noticed_at_once_naming_it(bound, tmp_path):
    """By its Last Will, not after the 600-s message timeout: every survivor names the lost tier
    and fails over (test_failover: and carries on once a schedule avoids it)."""
    bdir, _ = bound
    c = _cluster(tmp_path, bdir, iterations=300, timeout_s=600)
    try:
        c.publish(schedule("cloud", "device", "edge", 2, 5, 4, 4, 4, version=1))
        c.start()
        c.wait_iteration(5)
        t0 = time.monotonic()
        c.procs["cloud"].send_signal(signal.SIGKILL)
        said = lambda: all(f"{t}: the cloud is offline" in c.log(t) for t in ("device", "edge"))  # noqa: E731
        while not said() and time.monotonic() - t0 < 60:
            time.sleep(0.05)
        detect = time.monotonic() - t0
        assert said(), dump(c)
        assert all(c.procs[t].poll() is None and "Traceback" not in c.log(t) for t in ("device", "edge")), dump(c)
        print(json.dumps({"worker_o_lost_detected_s": round(detect, 2), "timeout_s": 600}))
    finally:
        c.close()


def test_a_full_checkpoint_disk_is_one_line_and_leaves_no_partial_files(bound, tmp_path):
    bdir, _ = bound
    c = _cluster(tmp_path, bdir, iterations=20, every=5, timeout_s=30)
    ck = tmp_path / "ck-cloud"
    try:
        c.publish(schedule("cloud", "device", "edge", 2, 5, 4, 4, 4, version=1))
        c.start()
        c.wait_iteration(6)  # the first checkpoint (iteration 4) is written
        kept = sorted(p.name for p in ck.iterdir())
        good = [(ck / name).read_bytes() for name in kept]
        (ck / checkpoint.TMP).symlink_to("/dev/full")  # the next write finds the disk full
        codes = c.wait(timeout=120)
        assert codes["cloud"] not in (0, None), dump(c)
        errors = [ln for ln in c.log("cloud").splitlines() if "error" in ln.lower()]
        assert any("cannot write checkpoint" in ln and "No space left on device" in ln for ln in errors), errors
        assert "Traceback" not in c.log("cloud")
        assert sorted(p.name for p in ck.iterdir()) == kept and kept
        assert [(ck / name).read_bytes() for name in kept] == good  # the previous checkpoints intact
    finally:
        c.close()


def test_the_observer_reads_schedule_statuses_and_telemetry_with_mosquitto_sub_and_writes_nothing(bound):
    import shutil

    bdir, _ = bound
    if shutil.which("mosquitto_sub") is None:
        pytest.skip("mosquitto-clients is not installed")
    env = {**os.environ, "XDG_CONFIG_HOME": str(bdir.observer_options)}  # the password stays in that file
    edge = _transport(bdir, "edge")
    try:
        sub = subprocess.Popen(["mosquitto_sub", "-t", f"hiertrain/{JOB}/#", "-v", "-C", "3", "-W", "10"], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(0.5)
        edge.send(wire.Message("samples", JOB, "edge", "cloud", 0, 0, {}, 1))  # binary: never shown
        for i in range(2):
            edge.publish_json(topics.telemetry(JOB, "edge"), {"iteration": i})
        out, err = sub.communicate(timeout=20)
        lines = out.splitlines()
        assert len(lines) == 3 and lines[0].startswith(f"hiertrain/{JOB}/edge/status ")
        assert all(ln.split()[0] in (topics.status(JOB, "edge"), topics.telemetry(JOB, "edge")) for ln in lines), out
        ep = Endpoint.load(bdir.credentials_file("observer"))
        pub = subprocess.run(["mosquitto_pub", "-h", ep.host, "-p", str(ep.port), "-u", "observer", "-P", ep.password,
                              "-V", "mqttv5", "-q", "1", "-t", topics.schedule(JOB), "-m", "{}"],
                             capture_output=True, text=True, timeout=20)
        assert "not authorized" in (pub.stdout + pub.stderr).lower(), (pub.stdout, pub.stderr)
    finally:
        edge.stop()
