"""The distributed runtime over real Mosquitto: three tier processes equal single-process training."""

import pytest

from cluster import chain, dump, equals_single_process, reference, rel, schedule
from hiertrain.train import checkpoint

pytestmark = pytest.mark.integration


SCHEDULES = {
    "three-way o=cloud": schedule("cloud", "device", "edge", 2, 5, 4, 4, 4, version=1),
    "o=device s=edge l=cloud": schedule("device", "edge", "cloud", 3, 7, 2, 6, 4, version=1),
    "o=edge b_o=0": schedule("edge", "cloud", "device", 1, 4, 0, 6, 6, version=1),
    "all-cloud": schedule("cloud", "device", "edge", 0, 0, 12, 0, 0, version=1),
}


@pytest.mark.parametrize("name", SCHEDULES)
def test_three_tier_processes_equal_single_process_training(cluster, name):
    c = cluster(iterations=30, every=30)
    c.publish(SCHEDULES[name])
    c.start()
    codes = c.wait()
    assert codes == {"device": 0, "edge": 0, "cloud": 0}, dump(c)
    ref_losses, ref_params = reference(c, 30)
    losses = c.losses()
    assert sorted(losses) == list(range(30))
    for i, expected in enumerate(ref_losses):
        assert losses[i] == pytest.approx(expected, rel=1e-4)
    ck = c.final_checkpoint()
    assert ck.iteration == 29 and rel(ck.params, ref_params) < 1e-4


def test_a_schedule_switch_mid_run_moves_both_cuts_and_worker_o(cluster):
    c = cluster(iterations=40, every=40)
    c.publish(schedule("cloud", "device", "edge", 2, 5, 4, 4, 4, version=1))
    c.start()
    c.wait_iteration(3)
    c.publish(schedule("edge", "cloud", "device", 4, 6, 2, 6, 4, version=2, effective=12))
    codes = c.wait()
    assert codes == {"device": 0, "edge": 0, "cloud": 0}, dump(c)
    versions = c.versions()
    assert sorted(versions) == list(range(40))
    switch = min(i for i, v in versions.items() if v == 2)
    assert switch >= 12 and all(versions[i] == (1 if i < switch else 2) for i in versions)
    losses, ref_params = equals_single_process(c, 40)
    ck = c.final_checkpoint()
    assert ck.iteration == 39 and rel(ck.params, ref_params) < 1e-4
    assert checkpoint.iterations(c.work / "ck-edge")[-1] == 39


def test_bad_messages_are_dropped_and_training_is_unchanged(cluster, broker_dir):
    """Malformed, wrong-shape, non-finite, stale, misaddressed and unauthorized messages during a run."""
    import numpy as np
    import paho.mqtt.client as mqtt

    from hiertrain.net import topics
    from hiertrain.net.transport import Endpoint
    from hiertrain.net.wire import Message, encode_message

    c = cluster(iterations=30, every=30)
    c.publish(schedule("cloud", "device", "edge", 2, 5, 4, 4, 4, version=1))

    def raw(account):
        ep = Endpoint.load(broker_dir.credentials_file(account))
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"intruder-{account}")
        client.username_pw_set(ep.username, ep.password)
        client.connect(ep.host, ep.port)
        client.loop_start()
        return client

    device, edge = raw("device"), raw("edge")
    bad = []
    for i in range(5, 25):
        act = lambda x, it=i: encode_message(Message("act", "t", "device", "cloud", it, 2, {"x": x}), msg_id=f"bad{it}{x.shape}")[0]
        bad.append((device, topics.tensor("t", "device", "act", "cloud", 2), b"\x00garbage" * i))        # malformed
        bad.append((device, topics.tensor("t", "device", "act", "cloud", 2), act(np.zeros((4, 3, 3), np.float32))))  # wrong shape
        nan = np.full((4, 6, 14, 14), np.nan, np.float32)
        bad.append((device, topics.tensor("t", "device", "act", "cloud", 2), act(nan)))             # non-finite
        bad.append((edge, topics.tensor("t", "device", "act", "cloud", 2), b"x"))                   # unauthorized (ACL)
        bad.append((device, topics.tensor("t", "device", "grad", "edge", 5), b"x"))                 # misaddressed kind
    c.start()
    c.wait_iteration(0)
    for client, topic, payload in bad:
        client.publish(topic, payload, qos=1)
    stale = encode_message(Message("act", "t", "device", "cloud", 0, 2, {"x": np.ones((4, 6, 14, 14), np.float32)}),
                           msg_id="stale")[0]
    device.publish(topics.tensor("t", "device", "act", "cloud", 2), stale, qos=1).wait_for_publish(5)
    codes = c.wait()
    for client in (device, edge):
        client.loop_stop()
    assert codes == {"device": 0, "edge": 0, "cloud": 0}, dump(c)
    ref_losses, ref_params = reference(c, 30)
    assert max(abs(c.losses()[i] - ref_losses[i]) / ref_losses[i] for i in range(30)) < 1e-4
    assert rel(c.final_checkpoint().params, ref_params) < 1e-4
    dropped = {}
    for account, p in c.telemetry:
        if account == "cloud":
            dropped = p["dropped"]
    assert dropped.get("malformed frame", 0) >= 1 and dropped.get("wrong shape", 0) >= 1
    assert dropped.get("non-finite", 0) >= 1 and dropped.get("stale", 0) + dropped.get("duplicate", 0) >= 1
    assert "dropped a message" in c.log("cloud")  # with the reason, by the transport


def test_the_device_never_runs_further_ahead_of_an_idle_tier_than_its_mailbox_accepts(cluster):
    """An idle tier is paced by nothing but the device: frozen (SIGSTOP) for 3 s, the device waits
    for it within half the mailbox window instead of sending frames it would refuse as too far ahead."""
    import signal
    import time

    c = cluster(iterations=30, timeout_s=20)
    c.publish(schedule("device", "edge", "cloud", 2, 5, 12, 0, 0, version=1))  # edge and cloud idle
    c.start()
    c.wait_iteration(1)
    c.procs["cloud"].send_signal(signal.SIGSTOP)
    try:
        time.sleep(3)
        c.pump()
        cloud_at = max((p["iteration"] for t, p in c.telemetry if t == "cloud"), default=-1)
        device_at = max(p["iteration"] for t, p in c.telemetry if t == "device")
    finally:
        c.procs["cloud"].send_signal(signal.SIGCONT)
    assert device_at <= cloud_at + 8, (device_at, cloud_at)
    assert c.wait() == {"device": 0, "edge": 0, "cloud": 0}, dump(c)
    assert "too far ahead" not in c.log("cloud") + c.log("edge")
    ref_losses, _ = reference(c, 30)
    losses = c.losses()
    assert max(abs(losses[i] - ref_losses[i]) / ref_losses[i] for i in range(30)) < 1e-4


def test_diverging_training_stops_every_tier_saying_why(cluster):
    c = cluster(iterations=200, lr=1e4, timeout_s=10)  # an absurd rate: the loss overflows within a few steps
    c.publish(schedule("edge", "device", "cloud", 2, 5, 4, 4, 4, version=1))
    c.start()
    codes = c.wait(timeout=90)
    assert all(code not in (0, None) for code in codes.values()), codes
    assert "training diverged at iteration" in c.log("edge") + c.log("device")  # the first to see it says why


def test_resume_continues_from_the_checkpoint(cluster):
    c = cluster(iterations=10, every=5)
    c.publish(schedule("cloud", "device", "edge", 2, 5, 4, 4, 4, version=1))
    c.start()
    assert c.wait() == {"device": 0, "edge": 0, "cloud": 0}, dump(c)
    assert c.final_checkpoint().iteration == 9
    c.start(resume=True)
    assert c.wait() == {"device": 0, "edge": 0, "cloud": 0}, dump(c)
    ck = c.final_checkpoint()
    assert ck.iteration == 19
    ref_losses, ref_params = reference(c, 20)
    assert sorted(i for i in c.losses() if i >= 10) == list(range(10, 20))
    assert rel(ck.params, ref_params) < 1e-4


def test_checkpoints_are_collected_in_one_place_and_a_resume_fetches_them_back(cluster):
    """worker_o (the cloud) has no checkpoint directory; the edge collects, keeping the newest
    3. On --resume the cloud owns the model again and fetches iteration 9 from the edge."""
    c = cluster(iterations=10, every=2, collector="edge")
    c.publish(schedule("cloud", "device", "edge", 2, 5, 4, 4, 4, version=1))
    c.start()
    assert c.wait() == {"device": 0, "edge": 0, "cloud": 0}, dump(c)
    assert checkpoint.iterations(c.work / "ck-edge") == [5, 7, 9]  # every 2nd iteration, the newest 3 kept
    assert not (c.work / "ck-cloud").exists() and not (c.work / "ck-device").exists()
    c.start(resume=True)
    assert c.wait() == {"device": 0, "edge": 0, "cloud": 0}, dump(c)
    assert "cloud: resuming from the checkpoint of iteration 9 (fetched from the edge)" in c.log("cloud"), dump(c)
    assert checkpoint.iterations(c.work / "ck-edge") == [15, 17, 19]
    ref_losses, ref_params = reference(c, 20)
    assert sorted(i for i in c.losses() if i >= 10) == list(range(10, 20))
    assert rel(c.final_checkpoint().params, ref_params) < 1e-4


@pytest.mark.parametrize("plan", [
    chain(("device", "cloud"), (3,), version=1, policy="jointdnn"),
    chain(("device", "edge", "cloud"), (2, 5), version=1),
], ids=["jointdnn", "jointdnn+"])
def test_layer_chains_equal_single_process_training(cluster, plan):
    c = cluster(iterations=25)
    c.publish(plan)
    c.start()
    assert c.wait() == {"device": 0, "edge": 0, "cloud": 0}, dump(c)
    equals_single_process(c, 25)


def test_jalad_sends_8_bit_activations_and_still_learns(cluster):
    c = cluster(iterations=40)
    c.publish(chain(("edge", "cloud"), (4,), version=1, bits=8, policy="jalad"))
    c.start()
    assert c.wait() == {"device": 0, "edge": 0, "cloud": 0}, dump(c)
    ref_losses, _ = reference(c, 40)
    losses = [c.losses()[i] for i in range(40)]
    assert losses[0] == pytest.approx(ref_losses[0], rel=1e-2)  # quantisation changes the numbers a little
    assert sum(losses[-10:]) < sum(losses[:10])                 # and training still works
    sent = [p["bytes_sent"] for a, p in c.telemetry if a == "edge"][-1]
    assert sent < 40 * 12 * 16 * 5 * 5 * 4                      # 1 byte, not 4, per activation value


def test_compressed_samples_are_decoded_where_used_and_training_is_unchanged(cluster, tmp_path):
    """[data] compress = true: uint8 samples travel zlib-compressed to the edge and the cloud, the
    run equals single-process training, and smooth images cross in a fraction of their bytes."""
    import numpy as np

    from hiertrain.train import data

    smooth = data.synthetic(n=256, noise=0.0, seed=3)  # flat 8x8 blocks: compressible
    np.savez(tmp_path / "smooth.npz", x=smooth.images, y=smooth.labels)
    c = cluster(iterations=20, data={"dataset": "npz", "path": str(tmp_path / "smooth.npz"), "compress": True})
    c.publish(schedule("edge", "device", "cloud", 0, 3, 8, 0, 4, version=1))  # the device only sends samples
    c.start()
    assert c.wait() == {"device": 0, "edge": 0, "cloud": 0}, dump(c)
    equals_single_process(c, 20)
    sent = [p["bytes_sent"] for a, p in c.telemetry if a == "device"][-1]
    assert sent < 20 * 12 * 3072 / 2, sent  # samples and labels: under half of the raw samples
    assert not any(p["dropped"] for _, p in c.telemetry), [p["dropped"] for _, p in c.telemetry]


def test_switching_between_a_hybrid_schedule_and_a_chain_moves_weights_and_optimizer_state(cluster):
    c = cluster(iterations=36, every=36)
    c.publish(schedule("cloud", "device", "edge", 2, 5, 4, 4, 4, version=1))
    c.start()
    c.wait_iteration(2)
    c.publish(chain(("device", "edge", "cloud"), (3, 6), version=2, effective=10))
    c.wait_iteration(11)
    c.publish(schedule("edge", "cloud", "device", 1, 4, 4, 4, 4, version=3, effective=20))
    assert c.wait() == {"device": 0, "edge": 0, "cloud": 0}, dump(c)
    assert set(c.versions().values()) == {1, 2, 3}
    losses, ref_params = equals_single_process(c, 36)
    assert rel(c.final_checkpoint().params, ref_params) < 1e-4


def test_a_job_runs_again_with_the_planner_up_and_after_a_planner_restart(cluster):
    """Each start of the device is a new run: what an earlier run left retained (a schedule that
    took effect at its iteration 8, statuses) never blocks the next."""
    from pathlib import Path

    profile = Path(__file__).resolve().parents[1] / "bench" / "profiles" / "lenet5.json"
    c = cluster(iterations=12, timeout_s=20)
    c.start_planner(profile, bw_device_edge=5.0, bw_edge_cloud=1.5)
    runs = []
    for attempt in range(3):
        if attempt == 2:  # the planner restarts, with every status and schedule of run 2 retained
            c.procs["planner"].terminate()
            c.procs["planner"].wait(20)
            c.start_planner(profile, bw_device_edge=5.0, bw_edge_cloud=1.5)
        c.start()
        codes = c.wait(timeout=120)
        assert codes == {"device": 0, "edge": 0, "cloud": 0}, dump(c)
        c.pump(0.5)
        runs.append({p.get("run") for a, p in c.status if a == "device" and p.get("run")})
    assert len(set.union(*runs)) == 3  # three runs, three ids
