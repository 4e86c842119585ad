"""Failover over real Mosquitto: a tier killed mid-run, the survivors carry on without it, and
the result equals an uninterrupted run (every iteration exactly one SGD step on the same samples).

The test publishes the schedules, as the planner would on the lost tier's Last Will (the
planner's part is tested in test_planner_service: an offline tier is planned around).
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from cluster import chain, dump, reference, rel, schedule
from hiertrain.broker.process import BrokerProcess

pytestmark = pytest.mark.integration
K = 4  # replica_every


def newest(c, tier="device"):
    c.pump(0.05)
    return max((p["iteration"] for t, p in c.telemetry if t == tier), default=-1)


def kill_and_replan(c, tier, replacement, *, at):
    c.wait_iteration(at)
    c.procs[tier].send_signal(signal.SIGKILL)
    t0 = time.monotonic()
    c.publish(replacement)  # what the planner does on the Last Will
    return t0


def check_exact(c, iterations):
    ref_losses, ref_params = reference(c, iterations)
    losses = c.losses()
    assert sorted(losses) == list(range(iterations)), sorted(losses)
    off = [i for i in range(iterations) if abs(losses[i] - ref_losses[i]) / ref_losses[i] >= 1e-4]
    assert not off, [(i, losses[i], ref_losses[i], c.versions()[i]) for i in off[:6]]
    assert rel(c.final_checkpoint().params, ref_params) < 1e-4


@pytest.mark.parametrize("lost,first,then", [
    ("cloud", schedule("cloud", "device", "edge", 2, 5, 4, 4, 4, version=1, replica_every=K),
     schedule("edge", "device", "cloud", 2, 2, 8, 4, 0, version=2, effective=10**6)),
    ("edge", schedule("edge", "device", "cloud", 2, 5, 4, 4, 4, version=1, replica_every=K),
     schedule("cloud", "device", "edge", 2, 2, 8, 4, 0, version=2, effective=10**6)),
    ("edge", schedule("cloud", "edge", "device", 4, 4, 6, 5, 1, version=1, replica_every=50),
     schedule("cloud", "device", "edge", 0, 0, 12, 0, 0, version=2, effective=10**6)),
], ids=["worker_o-cloud-lost", "worker_o-edge-lost", "slice-edge-lost"])
def test_worker_o_lost_training_continues_from_the_replica_and_equals_an_uninterrupted_run(cluster, lost, first,
                                                                                           then):
    c = cluster(iterations=30, every=30, timeout_s=30)
    c.publish(first)
    c.start()
    kill_and_replan(c, lost, then, at=13)
    codes = c.wait([t for t in ("device", "edge", "cloud") if t != lost], timeout=120)
    assert set(codes.values()) == {0}, dump(c)
    survivor = then["mapping"]["o"]
    for tier in ("device", survivor):
        assert f"{tier}: the {lost} is offline" in c.log(tier), dump(c)
    assert "resuming from the checkpoint of iteration" in c.log(survivor)
    again = c.redone()
    assert len(again) <= K, again  # at most K iterations redone, with the same samples
    check_exact(c, 30)


@pytest.mark.parametrize("lost,first", [
    ("cloud", schedule("cloud", "device", "edge", 2, 5, 4, 4, 4, version=1, replica_every=K)),
    ("edge", schedule("cloud", "edge", "device", 2, 5, 4, 4, 4, version=1, replica_every=K)),
], ids=["worker_o-lost", "slice-worker-lost"])
def test_without_a_planner_the_survivors_fall_back_to_a_schedule_they_compute_and_finish_exact(cluster, lost, first):
    """No planner answers when a tier is lost (issue 28): after timeout_s the device carries on under the
    schedule every survivor computes itself (a lost worker_o's work to the device, a lost slice
    worker's samples to o), named in each samples message, and the run equals an uninterrupted one."""
    c = cluster(iterations=30, every=30, timeout_s=8)
    c.publish(first)
    c.start()
    c.wait_iteration(13)
    c.procs[lost].send_signal(signal.SIGKILL)
    survivor = ({"edge", "cloud"} - {lost}).pop()
    codes = c.wait(("device", survivor), timeout=120)
    assert set(codes.values()) == {0}, dump(c)
    assert f"device: no schedule without the {lost} came in 8 s" in c.log("device"), dump(c)
    assert f"(fallback without {lost}: o=" in c.log(survivor), dump(c)
    assert len(c.redone()) <= K
    check_exact(c, 30)


def test_a_chain_stage_lost_training_continues_from_the_stages_replicas(cluster):
    """A layer chain device -> edge -> cloud: every stage replicates its units to the device every
    K iterations; the cloud (the last stage) is lost and the chain goes on as device -> edge."""
    n = 30
    c = cluster(iterations=n, every=n, timeout_s=30, collector="device")  # the stages' checkpoints, put together
    c.publish(chain(("device", "edge", "cloud"), (2, 5), version=1, replica_every=K))
    c.start()
    kill_and_replan(c, "cloud", chain(("device", "edge"), (2,), version=2, effective=10**6), at=13)
    codes = c.wait(("device", "edge"), timeout=120)
    assert set(codes.values()) == {0}, dump(c)
    assert "device: the cloud is offline" in c.log("device"), dump(c)
    assert "edge: resuming from the checkpoint of iteration" in c.log("edge"), dump(c)
    assert 0 < len(c.redone()) <= K, c.redone()
    check_exact(c, n)


def test_a_slice_worker_lost_redoes_nothing_and_a_tier_back_rejoins_at_the_next_schedule(cluster):
    n = 60
    c = cluster(iterations=n, every=n, timeout_s=30)
    c.publish(schedule("device", "edge", "cloud", 2, 5, 4, 4, 4, version=1, replica_every=K))
    c.start()
    kill_and_replan(c, "cloud", schedule("device", "edge", "cloud", 2, 2, 8, 4, 0, version=2, effective=10**6),
                    at=8)
    deadline = time.monotonic() + 60
    while newest(c) < 15 and time.monotonic() < deadline:  # carried on without the cloud
        pass
    c.procs["device"].send_signal(signal.SIGSTOP)  # hold the run while the cloud comes back
    assert 15 <= newest(c) < n - 20, dump(c)
    assert c.redone() == [], c.redone()  # worker_o (the device) survived with its live state
    try:
        c.start("cloud")  # back: it follows the run from the next samples, idle until a schedule gives it work
        deadline = time.monotonic() + 60
        pid = c.procs["cloud"].pid
        while time.monotonic() < deadline and not any(t == "cloud" and p.get("pid") == pid for t, p in c.status):
            c.pump()  # its status says online once it listens
        at = newest(c) + 6
        c.publish(schedule("cloud", "device", "edge", 2, 5, 4, 4, 4, version=3, effective=at, replica_every=K))
    finally:
        c.procs["device"].send_signal(signal.SIGCONT)
    assert c.wait(timeout=120) == {"device": 0, "edge": 0, "cloud": 0}, dump(c)
    versions = c.versions()
    assert versions[n - 1] == 3, versions
    check_exact(c, n)


def test_the_edge_machine_lost_and_back_training_resumes_without_a_human(cluster, mosquitto, broker_dir):
    """The edge machine goes down, the broker and the edge worker (worker_o here) with it, so no
    Last Will ever tells anyone; it comes back. The device and the cloud reconnect, see a new edge
    process, abandon the attempt and resume from the device's replica, which the new edge fetches."""
    n = 30
    c = cluster(iterations=n, every=n, timeout_s=60)
    sched = schedule("edge", "device", "cloud", 2, 5, 4, 4, 4, version=1, replica_every=K)
    c.publish(sched)
    c.start()
    c.wait_iteration(13)
    os.kill(mosquitto.pid, signal.SIGKILL)  # the machine: the broker first, so no Last Will is sent
    c.procs["edge"].send_signal(signal.SIGKILL)
    mosquitto.stop()
    time.sleep(2)
    with BrokerProcess(broker_dir, kind="mosquitto"):  # back: its broker (retained state restored) ...
        c.start("edge")  # ... its edge service ...
        c.publish(sched)  # ... and its planner, which publishes its schedule again
        codes = c.wait(timeout=180)
        assert codes == {"device": 0, "edge": 0, "cloud": 0}, dump(c)
    for tier in ("device", "cloud"):
        assert f"{tier}: the edge is back as a new process" in c.log(tier), dump(c)
    assert "resuming from the checkpoint of iteration" in c.log("edge") and "fetched from the device" in c.log("edge")
    assert len(c.redone()) <= K, c.redone()
    check_exact(c, n)


def test_the_edge_machine_lost_for_good_the_others_move_to_the_standby_broker_and_carry_on(cluster, mosquitto):
    """A standby broker (a copy of the broker directory: the same accounts and ACL) elsewhere. The
    edge machine goes down for good: the device and the cloud (worker_o) move to the standby, find
    the edge silent there, fail over without it, and train on under the schedule a planner next to
    the standby publishes (here the test, as in the other tests; bench failover runs a planner)."""
    n = 30
    c = cluster(iterations=n, every=n, timeout_s=60, standby=True)
    port = c.standby_dir.settings().port
    c.publish(schedule("cloud", "device", "edge", 2, 5, 4, 4, 4, version=1, replica_every=K))
    c.start()
    c.wait_iteration(13)
    os.kill(mosquitto.pid, signal.SIGKILL)
    c.procs["edge"].send_signal(signal.SIGKILL)
    mosquitto.stop()
    c.publish(schedule("cloud", "device", "edge", 2, 2, 8, 4, 0, version=2, effective=10**6))
    codes = c.wait(["device", "cloud"], timeout=180)
    assert set(codes.values()) == {0}, dump(c)
    for tier in ("device", "cloud"):
        assert f"trying 127.0.0.1:{port}" in c.log(tier), dump(c)
    assert "device: the edge is not back after the broker changed" in c.log("device"), dump(c)
    assert len(c.redone()) <= K, c.redone()
    check_exact(c, n)


def test_without_a_schedule_that_avoids_the_lost_tier_the_run_ends_saying_why(cluster):
    """A layer chain has no fallback the survivors could compute (its stages own their units): without a
    planner to plan around the lost stage, the run ends, saying why, its checkpoints intact."""
    c = cluster(iterations=200, every=5, timeout_s=8, collector="device")
    c.publish(chain(("device", "edge", "cloud"), (2, 5), version=1))
    c.start()
    c.wait_iteration(12)
    c.procs["edge"].send_signal(signal.SIGKILL)  # and no planner to plan around it
    codes = c.wait(timeout=90)
    assert codes["device"] not in (0, None) and codes["cloud"] not in (0, None), dump(c)
    assert "device: the edge is offline" in c.log("device"), dump(c)
    assert "no 'a schedule without the lost tier' from tier 'planner'" in c.log("device"), dump(c)
    assert "carrying on under one the survivors compute" not in c.log("device")
    assert "tier 'device' is failed" in c.log("cloud"), dump(c)
    ck = c.final_checkpoint()
    assert ck is not None and ck.iteration % 5 == 4 and ck.iteration >= 9
