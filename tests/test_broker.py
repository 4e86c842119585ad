"""The broker's accounts and ACL, Last Will, retained schedule and the transport, on real brokers."""

import json
import os
import queue
import signal
import subprocess
import time

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from hiertrain.broker.layout import Settings, password_hash, password_matches, read_password_file
from hiertrain.broker.process import BrokerProcess
from hiertrain.net import topics
from hiertrain.errors import BrokerError, MissingMessage, TierLost, TransportError
from hiertrain.net.mailbox import RESTARTED
from hiertrain.net.transport import Endpoint, Transport
from hiertrain.net.wire import Message, encode_message

from conftest import PYTHON, ROOT, subscribed


def raw_client(bdir, account=None, password=None):
    """A bare paho client (no hiertrain checks), connected or refused."""
    port = bdir.settings().port
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"raw-{os.urandom(3).hex()}")
    result = queue.Queue()
    client.on_connect = lambda c, u, f, rc, p: result.put(rc)
    if account:
        client.username_pw_set(account, password or Endpoint.load(bdir.credentials_file(account)).password)
    client.connect("127.0.0.1", port)
    client.loop_start()
    rc = result.get(timeout=10)
    return client, rc


def next_event(transport, kind, timeout=5.0, account=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            ev = transport.events.get(timeout=max(0.01, deadline - time.monotonic()))
        except queue.Empty:
            break
        if isinstance(ev.topic, kind) and account in (None, getattr(ev.topic, "account", None)):
            return ev
    return None


def test_password_hash_is_mosquitto_format_and_verifies():
    h = password_hash("secret", salt=b"0123456789ab")
    assert h.startswith("$7$101$") and password_matches("secret", h) and not password_matches("other", h)


def test_init_writes_accounts_acl_and_private_credentials(broker_dir):
    assert set(read_password_file(broker_dir.passwd)) == {"device", "edge", "cloud", "planner", "observer"}
    acl = broker_dir.acl.read_text()
    assert "user planner" in acl and "topic write hiertrain/+/schedule" in acl
    assert acl.count("topic write hiertrain/+/schedule") == 1
    creds = Endpoint.load(broker_dir.credentials_file("edge"))
    assert creds.username == "edge" and len(creds.password) >= 20
    assert oct(broker_dir.credentials_file("edge").stat().st_mode & 0o777) == "0o600"
    with pytest.raises(BrokerError, match="--force"):
        broker_dir.init(Settings())


@pytest.mark.protocol
def test_anonymous_and_wrong_password_are_refused(any_broker, broker_dir):
    client, rc = raw_client(broker_dir)
    assert rc.is_failure
    client.loop_stop()
    with pytest.raises(TransportError, match="refused account 'device'"):
        Transport(Endpoint("127.0.0.1", any_broker.port, "device", "wrong"), account="device", job="t",
                  client_id="wrong-pw").start(timeout=5)


@pytest.mark.protocol
def test_tiers_cannot_publish_as_others_or_on_the_schedule(any_broker, broker_dir, connect):
    cloud = connect("cloud")
    cloud.subscribe(topics.schedule("t"))
    device, rc = raw_client(broker_dir, "device")
    assert not rc.is_failure
    frame = encode_message(Message("act", "t", "edge", "cloud", 0, 1, {"x": np.ones(2, np.float32)}), msg_id="f:1")[0]
    device.publish(topics.tensor("t", "edge", "act", "cloud", 1), frame, qos=1).wait_for_publish(5)
    device.publish(topics.schedule("t"), json.dumps({"forged": True}), qos=1).wait_for_publish(5)
    planner = connect("planner")
    planner.publish_json(topics.schedule("t"), {"version": 1}, retain=True)
    ev = next_event(cloud, topics.ScheduleTopic)
    assert ev is not None and ev.payload == {"version": 1}  # the planner's, not the forged one
    with pytest.raises(MissingMessage):
        cloud.take("act", "edge", 0, 1, timeout=0.5)
    device.loop_stop()


@pytest.mark.protocol
def test_retained_schedule_reaches_late_subscribers(any_broker, connect):
    connect("planner").publish_json(topics.schedule("t"), {"version": 3}, retain=True)
    late = connect("device")
    late.subscribe(topics.schedule("t"))
    ev = next_event(late, topics.ScheduleTopic)
    assert ev is not None and ev.retained and ev.payload == {"version": 3}


@pytest.mark.integration
def test_last_will_marks_a_killed_tier_offline(mosquitto, broker_dir, connect):
    watcher = connect("planner")
    watcher.subscribe(topics.all_of_kind("t", "status"))
    code = ("import sys,time; from hiertrain.net.transport import *; "
            f"Transport(Endpoint.load({str(broker_dir.credentials_file('edge'))!r}), account='edge', job='t', "
            "keepalive=2).start(); print('up', flush=True); time.sleep(60)")
    proc = subprocess.Popen([PYTHON, "-c", code], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert proc.stdout.readline().strip() == "up"
        ev = next_event(watcher, topics.AccountTopic, account="edge")
        assert ev.payload["state"] == "online"
        proc.send_signal(signal.SIGKILL)
        ev = next_event(watcher, topics.AccountTopic, timeout=10, account="edge")
        assert ev is not None and ev.payload["state"] == "offline"
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.integration
def test_a_will_older_than_its_successor_is_ignored_and_a_new_process_is_lost_and_back(mosquitto, broker_dir, connect):
    """Statuses name their process (session nonce, start time). A Last Will that fires after the
    process's replacement came online is stale (dropped, counted); a new process of a tier that no
    Last Will announced ends every wait on that tier, as a loss would (what it held is gone)."""
    cloud = connect("cloud")
    cloud.subscribe(topics.all_of_kind("t", "status"))
    assert next_event(cloud, topics.AccountTopic, account="cloud") is not None  # subscribed: its own status
    edge, _ = raw_client(broker_dir, "edge")
    status = topics.status("t", "edge")
    try:
        def say(state, session, started):
            edge.publish(status, json.dumps({"state": state, "session": session, "started": started}), qos=1).wait_for_publish(5)

        say("online", "bbbb:1", 200.0)
        assert next_event(cloud, topics.AccountTopic, account="edge").payload["session"] == "bbbb:1"
        say("offline", "aaaa:will", 100.0)  # the will of the process before it
        say("online", "bbbb:2", 200.0)  # the same process, reconnected: nothing lost
        ev = next_event(cloud, topics.AccountTopic, account="edge")
        assert ev.payload["session"] == "bbbb:2", ev  # the stale will never became an event
        assert any(k.startswith("stale status") for k in cloud.dropped), cloud.dropped
        cloud.mailbox.check_lost("nothing")  # not lost
        say("online", "cccc:1", 300.0)  # a new process, and no will announced the old one's end
        assert next_event(cloud, topics.AccountTopic, account="edge").payload["session"] == "cccc:1"
        with pytest.raises(TierLost) as err:
            cloud.mailbox.check_lost("the edge's activations")
        assert err.value.tier == "edge" and err.value.state == RESTARTED
    finally:
        edge.loop_stop()
        edge.disconnect()


@pytest.mark.protocol
def test_duplicate_qos1_delivery_is_handled_once(mosquitto, broker_dir, connect):
    cloud = connect("cloud")
    msg = Message("grad", "t", "device", "cloud", 5, 2, {"g": np.arange(3000, dtype=np.float32)})
    frames = encode_message(msg, msg_id="dup:1", chunk_bytes=4096)
    device, _ = raw_client(broker_dir, "device")
    for frame in frames + frames[:2]:  # a redelivery of the first frames after completion
        device.publish(msg.topic, frame, qos=1).wait_for_publish(5)
    again = encode_message(msg, msg_id="dup:2", chunk_bytes=4096)  # same key, new message id
    for frame in again:
        device.publish(msg.topic, frame, qos=1).wait_for_publish(5)
    got = cloud.take("grad", "device", 5, 2, timeout=5)
    np.testing.assert_array_equal(got.tensors["g"], msg.tensors["g"])
    deadline = time.monotonic() + 5
    while sum(cloud.dropped.values()) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert cloud.dropped["duplicate"] == 3
    assert cloud.mailbox.pending() == []
    device.loop_stop()


@pytest.mark.protocol
def test_malformed_and_misaddressed_messages_are_dropped_and_reception_goes_on(mosquitto, broker_dir, connect):
    cloud = connect("cloud")
    device, _ = raw_client(broker_dir, "device")
    topic = topics.tensor("t", "device", "act", "cloud", 1)
    device.publish(topic, b"\x00garbage", qos=1).wait_for_publish(5)
    lie = encode_message(Message("act", "t", "device", "cloud", 0, 4, {"x": np.ones(1, np.float32)}), msg_id="l:1")
    device.publish(topic, lie[0], qos=1).wait_for_publish(5)  # frame says layer 4, topic says layer 1
    good = connect("device")
    good.send(Message("act", "t", "device", "cloud", 0, 1, {"x": np.ones(4, np.float32)}))
    assert cloud.take("act", "device", 0, 1, timeout=5).tensors["x"].shape == (4,)
    assert cloud.dropped["malformed frame"] == 1 and cloud.dropped["unauthorized"] == 1
    device.loop_stop()


@pytest.mark.protocol
def test_a_64_mb_tensor_round_trips_in_chunks(mosquitto, connect):
    device = connect("device", chunk_bytes=1 << 20)
    cloud = connect("cloud")
    a = np.random.default_rng(0).random(16 << 20, dtype=np.float32)
    sent = device.send(Message("act", "t", "device", "cloud", 1, 3, {"a": a}))
    assert sent > 64 << 20
    got = cloud.take("act", "device", 1, 3, timeout=60)
    np.testing.assert_array_equal(got.tensors["a"], a)


@pytest.mark.protocol
def test_a_critical_message_overtakes_a_bulk_one_sent_before_it(mosquitto, broker_dir, connect):
    """Prefetched samples go as bulk: one small frame at a time, so activations sent after them
    wait behind one frame at most, not behind the whole message; both arrive whole."""
    from hiertrain.net.transport import BULK_CHUNK_BYTES

    device = connect("device")
    spy, _ = raw_client(broker_dir, "cloud")  # the cloud's inbox, frame by frame, in arrival order
    order: "queue.Queue[str]" = queue.Queue()
    spy.on_message = lambda c, u, m: order.put(m.topic.split("/")[3])
    spy.subscribe(topics.inbox("t", "cloud"), qos=1)
    cloud = connect("cloud", client_id="hiertrain-t-cloud-receiver")
    time.sleep(0.5)  # both subscriptions in effect at the broker (a tier waits for its peer's status instead)
    x = np.random.default_rng(1).integers(0, 255, (64, 3, 64, 64), dtype=np.uint8)  # 786 KB
    device.send(Message("samples", "t", "device", "cloud", 2, 0, {"x": x}), bulk=True)
    device.send(Message("act", "t", "device", "cloud", 1, 2, {"x": np.ones(8, np.float32)}))
    assert cloud.take("act", "device", 1, 2, timeout=10).tensors["x"].sum() == 8
    # each frame leaves on the last one's acknowledgement (not on a timer): 24 frames well within 5 s
    np.testing.assert_array_equal(cloud.take("samples", "device", 2, 0, timeout=5).tensors["x"], x)
    device.flush(10)
    kinds = [order.get(timeout=10) for _ in range(-(-x.nbytes // BULK_CHUNK_BYTES) + 1)]
    assert kinds.index("act") <= 2 and kinds.count("samples") >= x.nbytes // BULK_CHUNK_BYTES, kinds
    spy.loop_stop()


@pytest.mark.integration
def test_persistent_session_survives_a_broker_restart(broker_dir, connect):
    port = broker_dir.settings().port
    with BrokerProcess(broker_dir, kind="mosquitto", port=port):
        cloud = connect("cloud")
    # the broker is down; cloud's client keeps retrying
    with BrokerProcess(broker_dir, kind="mosquitto", port=port):
        device = connect("device")
        device.send(Message("act", "t", "device", "cloud", 9, 1, {"x": np.ones(8, np.float32)}))
        got = cloud.take("act", "device", 9, 1, timeout=20)
        assert got.tensors["x"].sum() == 8


@pytest.mark.integration
def test_devices_are_enrolled_and_withdrawn_on_a_running_mosquitto_each_with_its_own_topics(tmp_path):
    """`broker add-device` / `remove-device`: an account per device, bound to the job, publishing only
    under its own name and reading only its own inbox; Mosquitto reloads without a restart."""
    from hiertrain.broker.layout import BrokerDir
    from hiertrain.broker.process import free_port

    bdir = BrokerDir(tmp_path / "broker")
    bdir.init(Settings(port=free_port(), bind="127.0.0.1", job="farm"))

    def cli(*args):
        return subprocess.run([PYTHON, "-m", "hiertrain", "broker", *args, "--dir", str(bdir.root)],
                              capture_output=True, text=True, cwd=ROOT, timeout=60)

    with BrokerProcess(bdir, kind="mosquitto") as broker:
        for name in ("pi3", "jetson-1"):
            done = cli("add-device", name)
            assert done.returncode == 0 and f"pid {broker.pid}) reloaded" in done.stdout, done.stdout + done.stderr
        assert oct(os.stat(bdir.credentials_file("pi3")).st_mode & 0o777) == "0o600"
        assert Endpoint.load(bdir.credentials_file("pi3")).job == "farm" and bdir.devices() == ["jetson-1", "pi3"]
        for bad, why in (("device", "bad device name"), ("Pi 3", "bad device name"), ("pi3", "already enrolled")):
            done = cli("add-device", bad)
            assert done.returncode == 1 and why in done.stderr and len(done.stderr.strip().splitlines()) == 1

        got: queue.Queue = queue.Queue()
        pi3, rc = raw_client(bdir, "pi3")
        assert not rc.is_failure
        pi3.on_message = lambda c, u, m: got.put(("pi3", m.topic))
        subscribed(pi3, ("hiertrain/farm/schedule", 1), ("hiertrain/farm/+/+/+/+", 1))  # asks for every inbox
        watcher, _ = raw_client(bdir, "observer")
        watcher.on_message = lambda c, u, m: got.put(("observer", m.topic))
        subscribed(watcher, ("hiertrain/farm/+/status", 1))
        edge, _ = raw_client(bdir, "edge")
        for topic in ("hiertrain/farm/pi3/status", "hiertrain/farm/device/status", "hiertrain/farm/schedule",
                      "hiertrain/other/pi3/status"):
            pi3.publish(topic, b"{}", qos=1).wait_for_publish(5)
        for dest in ("pi3", "jetson-1"):
            edge.publish(f"hiertrain/farm/edge/act/{dest}/1", b"x", qos=1).wait_for_publish(5)
        planner, _ = raw_client(bdir, "planner")
        planner.publish("hiertrain/farm/schedule", b'{"version": 1}', qos=1).wait_for_publish(5)
        seen = set()
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            try:
                seen.add(got.get(timeout=0.2))
            except queue.Empty:
                pass
        assert ("observer", "hiertrain/farm/pi3/status") in seen        # its own topics: yes
        assert ("observer", "hiertrain/farm/device/status") not in seen  # another account's: refused
        assert ("pi3", "hiertrain/farm/edge/act/pi3/1") in seen         # its inbox
        assert ("pi3", "hiertrain/farm/edge/act/jetson-1/1") not in seen  # not another device's
        assert ("pi3", "hiertrain/farm/schedule") in seen
        for c in (pi3, watcher, edge, planner):
            c.loop_stop()
            c.disconnect()

        password = Endpoint.load(bdir.credentials_file("pi3")).password
        done = cli("remove-device", "pi3")
        assert done.returncode == 0 and "reloaded" in done.stdout, done.stderr
        assert not bdir.credentials_file("pi3").exists() and bdir.devices() == ["jetson-1"]
        _, rc = raw_client(bdir, "pi3", password)
        assert rc.is_failure  # withdrawn: the broker refuses it without a restart
        _, rc = raw_client(bdir, "jetson-1")
        assert not rc.is_failure
        assert broker.proc.poll() is None
        done = cli("remove-device", "pi3")
        assert done.returncode == 1 and "no enrolled device 'pi3'" in done.stderr


@pytest.mark.process
def test_a_harness_that_fails_half_way_stops_the_broker_it_started(tmp_path):
    """The harness starts its broker, then refuses a standby in a testbed: the error goes up and
    the broker it had started is stopped (no Mosquitto left running on its directory)."""
    from hiertrain.errors import ConfigError
    from hiertrain.lab.cluster import Cluster
    from hiertrain.lab.jobs import ThreeTier

    class Loopback:  # a network whose namespaces are this one
        broker_for = {"device": "127.0.0.1", "edge": "127.0.0.1", "cloud": "127.0.0.1", "root": "127.0.0.1"}

        def prefix(self, where):
            return []

    with pytest.raises(ConfigError, match="standby broker runs on loopback only"):
        Cluster(tmp_path, ThreeTier(), network=Loopback(), standby=True)
    conf = str(tmp_path / "broker")
    running = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                running.append(f.read().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:
            pass
    assert not [cmd for cmd in running if conf in cmd]


@pytest.mark.integration
def test_an_edge_sites_broker_bridges_only_its_sync_topics_to_the_clouds(tmp_path):
    """A hierarchical job's brokers, as an operator sets them up: `broker add-site` on the cloud's,
    `broker bridge` on the site's, Mosquitto's own bridge between them. The site's model goes up and
    the average comes down; the site's telemetry, a tier's inbox, another site's topic and a device's
    forged model stay on the site; a device's account cannot log in to the cloud's broker."""
    from hiertrain.broker.layout import BrokerDir
    from hiertrain.broker.process import free_port

    def cli(bdir, *args):
        return subprocess.run([PYTHON, "-m", "hiertrain", "broker", *args, "--dir", str(bdir.root)],
                              capture_output=True, text=True, cwd=ROOT, timeout=60)

    cloud, site = BrokerDir(tmp_path / "cloud"), BrokerDir(tmp_path / "lab1")
    for bdir in (cloud, site):
        bdir.init(Settings(port=free_port(), bind="127.0.0.1", job="farm"))
    done = cli(cloud, "add-site", "--site", "lab1")
    assert done.returncode == 0, done.stderr
    creds = cloud.credentials_file("bridge-lab1")
    assert oct(os.stat(creds).st_mode & 0o777) == "0o600"
    for args, why in ((("--site", "lab2", "--to", str(creds)), "not 'bridge-lab2'"),
                      (("--site", "lab1", "--to", str(tmp_path / "none.json")), "bridge credentials"),
                      (("--site", "Lab 1", "--to", str(creds)), "bad site name")):
        done = cli(site, "bridge", *args)
        assert done.returncode == 1 and why in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert cli(site, "bridge", "--site", "lab1", "--to", str(creds)).returncode == 0
    conf = site.conf.read_text()
    assert "remote_username bridge-lab1" in conf and oct(os.stat(site.conf).st_mode & 0o777) == "0o600"
    assert [line for line in conf.splitlines() if line.startswith("topic ")] == [  # the two topics, nothing else
        "topic sync/up/lab1 out 1 hiertrain/farm/ hiertrain/farm/", "topic sync/down in 1 hiertrain/farm/ hiertrain/farm/"]
    site.add_device("pi1")

    with BrokerProcess(cloud, kind="mosquitto") as cb, BrokerProcess(site, kind="mosquitto"):
        deadline = time.monotonic() + 15  # the bridge logs in on its own: the cloud's broker says when
        while not any("hiertrain-bridge-farm-lab1" in line for line in cb.log) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert any("hiertrain-bridge-farm-lab1" in line for line in cb.log), list(cb.log)[-5:]
        got: queue.Queue = queue.Queue()
        subscribed: queue.Queue = queue.Queue()

        def listen(bdir, account, filters):
            client, rc = raw_client(bdir, account)
            assert not rc.is_failure
            client.on_message = lambda c, u, m: got.put((account, m.topic, m.payload))
            client.on_subscribe = lambda c, u, mid, codes, p: subscribed.put(mid)
            client.subscribe([(f, 1) for f in filters])
            subscribed.get(timeout=10)
            return client

        averager = listen(cloud, "cloud", ["hiertrain/farm/#"])  # reads the sites' models, telemetry, its inbox
        edge = listen(site, "edge", ["hiertrain/farm/#"])         # reads the average, telemetry, its inbox
        pi1, _ = raw_client(site, "pi1")
        for client, topic, payload in ((edge, "hiertrain/farm/edge/telemetry", b"{}"),
                                       (edge, "hiertrain/farm/edge/act/cloud/1", b"activations"),
                                       (edge, "hiertrain/farm/sync/up/lab2", b"another site's"),
                                       (pi1, "hiertrain/farm/sync/up/lab1", b"forged by a device"),
                                       (edge, "hiertrain/farm/sync/up/lab1", b"lab1's model")):
            client.publish(topic, payload, qos=1).wait_for_publish(5)
        # one bridge connection, in order: whatever crossed did so before the site's model
        crossed = []
        while not crossed or crossed[-1][2] != b"lab1's model":
            crossed.append(got.get(timeout=10))
        assert [m for m in crossed if m[0] == "cloud"] == [("cloud", "hiertrain/farm/sync/up/lab1", b"lab1's model")]
        # and the cloud's ACL holds the bridge account to that one topic (a stolen bridge password injects nothing)
        thief, _ = raw_client(cloud, "bridge-lab1")
        for topic, payload in (("hiertrain/farm/edge/telemetry", b"{}"), ("hiertrain/farm/sync/up/lab2", b"x"),
                               ("hiertrain/farm/sync/down", b"forged average"), ("hiertrain/farm/sync/up/lab1", b"end")):
            thief.publish(topic, payload, qos=1).wait_for_publish(5)
        stolen = [got.get(timeout=10)]
        while stolen[-1][2] != b"end":
            stolen.append(got.get(timeout=10))
        assert [m for m in stolen if m[0] == "cloud"] == [("cloud", "hiertrain/farm/sync/up/lab1", b"end")]
        assert not [m for m in stolen if m[0] == "edge"]  # no forged average reached the site
        thief.loop_stop()
        thief.disconnect()

        for topic, payload in (("hiertrain/farm/cloud/telemetry", b"{}"), ("hiertrain/farm/sync/down", b"average")):
            averager.publish(topic, payload, qos=1, retain=topic.endswith("down")).wait_for_publish(5)
        came = []
        while not came or came[-1][2] != b"average":
            came.append(got.get(timeout=10))
        assert [m for m in came if m[0] == "edge"] == [("edge", "hiertrain/farm/sync/down", b"average")]
        for c in (averager, edge, pi1):
            c.loop_stop()
            c.disconnect()
        _, rc = raw_client(cloud, "pi1", Endpoint.load(site.credentials_file("pi1")).password)
        assert rc.is_failure  # a device has no account on the cloud's broker
