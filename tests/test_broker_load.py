"""Mosquitto's own counters, the observer's to read (a broker's load), and the broker bench's capacity
run counted by them."""

from __future__ import annotations

import threading

import pytest

from hiertrain.bench import broker as B


@pytest.mark.integration
def test_the_observer_reads_the_brokers_counters_and_they_count_a_capacity_run(mosquitto, broker_dir):
    counters = B.Counters(broker_dir.credentials_file("observer"))
    try:
        r = B.capacity(broker_dir, mosquitto.proc.pid, counters, clients=2, count=150, size=2048)
    finally:
        counters.close()
    assert r["received"] == r["messages"] == 300  # every message of both clients delivered
    assert r["sys"]["publish/messages/received"] >= 300 and r["sys"]["publish/messages/sent"] >= 300
    assert r["sys"]["bytes/received"] >= 300 * 2048 and r["broker_cpu_s"] >= 0


@pytest.mark.protocol
def test_a_device_account_cannot_read_the_brokers_counters(mosquitto, broker_dir):
    import paho.mqtt.client as mqtt

    from hiertrain.net.topics import BROKER_COUNTERS
    from hiertrain.net.transport import Endpoint

    ep = Endpoint.load(broker_dir.credentials_file("device"))
    got: list[str] = []
    subscribed = threading.Event()
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="nosy-device")
    c.username_pw_set(ep.username, ep.password)
    c.on_message = lambda client, userdata, msg: got.append(msg.topic)
    c.on_subscribe = lambda *a: subscribed.set()
    c.connect(ep.host, ep.port)
    c.subscribe(BROKER_COUNTERS)
    c.loop_start()
    counters = B.Counters(broker_dir.credentials_file("observer"))
    try:
        assert subscribed.wait(10)
        assert counters.read()["bytes/received"] > 0  # two updates the observer saw ...
        assert got == []                               # ... and the device none
    finally:
        counters.close()
        c.loop_stop()
        c.disconnect()
