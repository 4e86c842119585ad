"""Shared fixtures: broker directories and real brokers on free ports, transports for each account."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from hiertrain.broker.layout import BrokerDir, Settings
from hiertrain.broker.process import BrokerProcess, free_port
from hiertrain.net.transport import Endpoint, Transport

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


@pytest.fixture
def broker_dir(tmp_path: Path) -> BrokerDir:
    bdir = BrokerDir(tmp_path / "broker")
    bdir.init(Settings(port=free_port(), bind="127.0.0.1", max_packet_bytes=16 << 20))
    return bdir


@pytest.fixture
def mosquitto(broker_dir: BrokerDir) -> Iterator[BrokerProcess]:
    with BrokerProcess(broker_dir, kind="mosquitto") as proc:
        yield proc


@pytest.fixture(params=["mosquitto", "embedded"])
def any_broker(request: pytest.FixtureRequest, broker_dir: BrokerDir) -> Iterator[BrokerProcess]:
    with BrokerProcess(broker_dir, kind=request.param) as proc:
        yield proc


@pytest.fixture
def connect(broker_dir: BrokerDir) -> Iterator[Callable[..., Transport]]:
    """connect(account, job="t", **options) -> a started Transport, stopped after the test."""
    started: list[Transport] = []

    def make(account: str, job: str = "t", **options: object) -> Transport:
        t = Transport(Endpoint.load(broker_dir.credentials_file(account)), account=account, job=job, **options)
        started.append(t.start())
        return t

    yield make
    for t in started:
        t.stop()


@pytest.fixture
def cluster(mosquitto: BrokerProcess, broker_dir: BrokerDir, tmp_path: Path) -> Iterator[Callable[..., object]]:
    """cluster(**options) -> a three-tier job ``t`` (:class:`~hiertrain.lab.jobs.ThreeTier` of the
    options) on the test's Mosquitto (``standby``: and a standby broker), closed after the test."""
    from hiertrain.lab.cluster import Cluster
    from hiertrain.lab.jobs import ThreeTier

    made: list[Cluster] = []

    def make(*, standby: bool = False, **kw: Any) -> Cluster:
        c = Cluster(tmp_path, ThreeTier(name="t", chunk_kb=16, **kw), broker_dir=broker_dir, standby=standby)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


HEAVIER = ("compute", "process", "protocol", "integration")  # pyproject.toml's markers, beyond unit


@pytest.hookimpl(tryfirst=True)  # before -m selects
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """``unit`` is the default: a test says what more it needs (ORT, a process, a broker, several processes)."""
    for item in items:
        if not any(item.get_closest_marker(m) for m in HEAVIER):
            item.add_marker(pytest.mark.unit)


@pytest.fixture(autouse=True)
def _markers_mean_what_they_say(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """A test marked ``unit`` runs no ORT session and starts no process (those are ``compute``,
    ``protocol`` or ``integration`` tests): the marker is enforced, not just declared."""
    if request.node.get_closest_marker("unit") is None:
        return
    import subprocess

    import onnxruntime

    def refuse(what: str) -> Callable[..., None]:
        def refused(*args: object, **kw: object) -> None:
            raise AssertionError(f"a test marked unit {what}: mark it compute (ORT) or integration (processes)")
        return refused

    monkeypatch.setattr(onnxruntime, "InferenceSession", refuse("runs an ORT session"))
    monkeypatch.setattr(subprocess.Popen, "__init__", refuse("starts a process"))


def until(condition: Callable[[], object], timeout: float = 10.0, what: str = "the condition") -> None:
    """Poll ``condition`` until it holds (a readiness signal, not a fixed sleep); fail after ``timeout``."""
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout:g} s")
        time.sleep(0.01)


def subscribed(client: Any, *subscriptions: tuple[str, int], timeout: float = 10.0) -> None:
    """Subscribe a looping paho client and return once the broker has granted it all (its SUBACKs)."""
    import threading

    granted, cond = set(), threading.Condition()
    previous = client.on_subscribe

    def on_subscribe(c: Any, userdata: Any, mid: int, *rest: Any) -> None:
        with cond:
            granted.add(mid)
            cond.notify_all()

    client.on_subscribe = on_subscribe
    mids = {client.subscribe(topic, qos)[1] for topic, qos in subscriptions}
    with cond:
        if not cond.wait_for(lambda: mids <= granted, timeout):
            raise AssertionError(f"no SUBACK for {subscriptions} within {timeout:g} s")
    client.on_subscribe = previous
