"""The distributed runtime over real Mosquitto: three tier processes equal single-process training."""

import pytest

from cluster import Cluster, dump, rel, schedule

pytestmark = pytest.mark.integration


@pytest.fixture
def cluster(mosquitto, broker_dir, tmp_path):
    made = []

    def make(**kw):
        c = Cluster(broker_dir, tmp_path, **kw)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


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
    ref_losses, ref_params = c.reference(30)
    losses = c.losses()
    assert sorted(losses) == list(range(30))
    for i, expected in enumerate(ref_losses):
        assert losses[i] == pytest.approx(expected, rel=1e-4)
    ck = c.final_params()
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
    ref_losses, ref_params = c.reference(40)
    losses = c.losses()
    assert sorted(losses) == list(range(40))  # none lost, none done twice
    assert max(abs(losses[i] - ref_losses[i]) / ref_losses[i] for i in range(40)) < 1e-4
    ck = c.final_params()
    assert ck.iteration == 39 and rel(ck.params, ref_params) < 1e-4
    assert "ck-edge" in str(c.work / "ck-edge") and (c.work / "ck-edge" / "checkpoint.ort").exists()
