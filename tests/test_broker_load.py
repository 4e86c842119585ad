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
    from hiertrain.bench.transport import raw_client
    from hiertrain.net.topics import BROKER_COUNTERS

    got: list[str] = []
    subscribed = threading.Event()
    c = raw_client(broker_dir.credentials_file("device"), "nosy-device")
    c.on_message = lambda client, userdata, msg: got.append(msg.topic)
    c.on_subscribe = lambda *a: subscribed.set()
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
