"""A fleet over real Mosquitto: four enrolled devices, the edge's coordinator and the cloud, one
device joining mid-run and one leaving; every step equals single-process SGD over exactly the
samples the step log names."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest

from hiertrain.lab.cluster import Cluster
from hiertrain.lab.jobs import Fleet, Spec
from hiertrain.lab.replay import rel, replay, step_log
from hiertrain.plan import paths
from hiertrain.schedule import Schedule

pytestmark = pytest.mark.integration
U = 7  # LeNet-5


def members(row):
    return [m[0] for m in row["members"]]


def test_four_devices_on_every_kind_of_path_join_and_leave_and_each_step_is_single_process_sgd(tmp_path):
    devices = [Spec("pi1", 4, path=(2, 5)),      # device, edge and cloud
               Spec("pi2", 6, path=(0, U),       # raw samples up (compressed), the edge does the rest
                    data={"dataset": "synthetic", "shard": [1, 4], "compress": True}),
               Spec("pi3", 3, path=(U, U))]      # trains alone, sends its gradients
    joiner = Spec("pi4", 5, path=(1, 1), joins=True)  # one unit, then the cloud; it publishes its own profile
    with Cluster(tmp_path, Fleet(devices, extra=(joiner,), iterations=14, timeout_s=60)) as c:
        observer = tmp_path / "observer.toml"  # what an operator runs: `hiertrain schedule watch` as the observer
        observer.write_text(f'job = "{c.job.name}"\n[broker]\ncredentials = "{c.bdir.credentials_file("observer")}"\n')
        with open(tmp_path / "watch.out", "w") as out:
            watch = subprocess.Popen([sys.executable, "-m", "hiertrain", "schedule", "watch", "--config", str(observer),
                                      "--json"], stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path)
        c.start("cloud", "edge", "pi1", "pi2", "pi3")
        c.wait_iteration(1)
        c.pause("pi1")                                     # holds the run while pi4 starts
        c.start("pi4")
        c.wait_online("pi4")
        c.resume("pi1")                                    # pi4 joins: planned in at the next round
        joined = c.wait_until(lambda row: "pi4" in [m[0] for m in row["fleet"]])
        c.pause("pi2")                                     # leaves in the middle of a round: the round
        time.sleep(1.0)                                    # waits for it, its Last Will ends the wait,
        c.kill("pi2")                                      # and the step is redone without it
        codes = c.wait(("edge", "cloud", "pi1", "pi3", "pi4"), timeout=120)
        assert codes == dict.fromkeys(codes, 0), {n: c.log(n)[-2000:] for n in codes}
        log = step_log(c)
        assert [row["step"] for row in log] == list(range(14))
        assert {"pi1", "pi2", "pi3"} == set(members(log[0]))
        assert {"pi1", "pi2", "pi3", "pi4"} == set(members(log[joined]))
        assert members(log[-1]) == ["pi1", "pi3", "pi4"]
        redone = [row for row in log if row["round"] > log[row["step"] - 1]["round"] + 1] if log else []
        assert redone, "a step was given up and redone without the hung device"
        assert "redone without it" in c.log("edge")
        offsets = {}
        for row in log:                                   # every device's samples in order, none skipped
            for name, offset, n, _, _ in row["members"]:
                assert offset == offsets.get(name, 0)
                offsets[name] = offset + n
        losses, params = replay(c)
        np.testing.assert_allclose([row["loss"] for row in log], losses, rtol=1e-4)
        assert rel(c.final_checkpoint().params, params) < 1e-4
        watch.terminate()
        watch.wait(10)
        watched = [Schedule.from_json(json.loads(line)) for line in (tmp_path / "watch.out").read_text().splitlines()
                   if line.startswith("{")]
        versions = sorted({row["version"] for row in log})    # every plan a step ran, each on the schedule topic
        assert [s.version for s in watched] == versions and len(versions) >= 3, (tmp_path / "watch.out").read_text()
        for s in watched:                                     # as the steps ran it, from the step it took effect
            first = next(row for row in log if row["version"] == s.version)
            assert s.is_fleet and s.effective_iteration == first["step"]
            assert [[g.name, g.samples, *paths(s.groups)[g.name]] for g in s.groups.groups] == \
                [[name, n, m, k] for name, _, n, m, k in first["members"]]


def test_the_cloud_lost_mid_run_is_planned_around_and_every_step_stays_single_process_sgd(tmp_path):
    devices = [Spec("pi1", 4, path=(2, 4)), Spec("pi2", 6, path=(0, 3))]   # both pinned through the cloud
    with Cluster(tmp_path, Fleet(devices, iterations=10, timeout_s=60)) as c:
        c.start("cloud", "edge", "pi1", "pi2")
        c.wait_iteration(2)
        c.pause("cloud")                                   # mid-round: the round waits for it,
        time.sleep(1.0)
        c.kill("cloud")                                    # its Last Will: redone without the cloud
        codes = c.wait(("edge", "pi1", "pi2"), timeout=120)
        assert codes == dict.fromkeys(codes, 0), {n: c.log(n)[-2000:] for n in codes}
        log = step_log(c)
        assert [row["step"] for row in log] == list(range(10))
        assert [m[4] for m in log[0]["members"]] == [4, 3]
        assert all(m[4] == U for m in log[-1]["members"])  # every path now ends at the edge
        edge = c.log("edge")
        assert "plans without the cloud: it is offline" in edge and "redone without it" in edge
        losses, params = replay(c)
        np.testing.assert_allclose([row["loss"] for row in log], losses, rtol=1e-4)
        assert rel(c.final_checkpoint().params, params) < 1e-4


@pytest.mark.parametrize("path,ends", [((1, U), "pi2"), ((0, U), "edge")])
def test_a_diverging_device_ends_its_run_with_one_line_naming_it(tmp_path, path, ends):
    """A device whose data blows training up. Where the device computes (path (1, U)), its own run
    ends saying why and the edge carries on without it, naming the reason; where the edge computes on
    its raw samples (path (0, U)), the edge's run ends naming the device and its samples. Divergence is
    an error of its own, never swallowed as a plan problem, and never a traceback."""
    rng = np.random.default_rng(0)
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.full((64, 3, 32, 32), 3e38, np.float32), y=rng.integers(0, 10, 64))
    devices = [Spec("pi1", 4, path=(1, U)), Spec("pi2", 4, path=path, data={"dataset": "npz", "path": str(bad)})]
    with Cluster(tmp_path, Fleet(devices, iterations=4, timeout_s=30)) as c:
        c.start("cloud", "edge", "pi1", "pi2")
        codes = c.wait(("edge", "cloud", "pi1", "pi2"), timeout=120)
        assert codes[ends] == 1 and all("Traceback" not in c.log(n) for n in codes), {n: c.log(n)[-1500:] for n in codes}
        if ends == "pi2":
            assert codes == {n: int(n == ends) for n in codes}, codes
        out = c.log(ends)
        errors = [line for line in out.splitlines() if "error" in line.lower() or "Traceback" in line]
        assert len(errors) == 1, out
        if ends == "pi2":
            assert errors[0].startswith("hiertrain: error: pi2: training diverged in round 0 (non-finite: act"), out
            assert "given up in round 0: pi2 went failed (pi2: training diverged" in c.log("edge")
            assert [row["step"] for row in step_log(c)] == list(range(4))
        else:
            assert errors[0].startswith("hiertrain: error: edge:") and "pi2's samples 0..3" in errors[0], out


def test_a_fleet_edge_killed_and_restarted_with_resume_continues_exactly_from_its_newest_checkpoint(tmp_path):
    """The coordinator SIGKILLed mid-run (its Last Will) and started again with --resume, as its systemd
    unit does: the workers wait for its new run, it continues after its newest checkpoint with every
    device's place in its data, and the whole run equals single-process SGD over the samples logged."""
    devices = [Spec("pi1", 4, path=(2, 5)), Spec("pi2", 6, path=(0, U)), Spec("pi3", 3, path=(U, U))]
    with Cluster(tmp_path, Fleet(devices, iterations=16, timeout_s=60, checkpoint_every=4)) as c:
        c.start("cloud", "edge", "pi1", "pi2", "pi3")
        c.wait_iteration(9)                                      # checkpoints after steps 3 and 7; 8 and 9 done since
        c.kill("edge")
        c.start("edge", resume=True)
        codes = c.wait(("edge", "cloud", "pi1", "pi2", "pi3"), timeout=180)
        assert codes == dict.fromkeys(codes, 0), {n: c.log(n)[-2000:] for n in codes}
        assert "edge: resuming after the checkpoint of step 7" in c.log("edge")
        for name in ("cloud", "pi1", "pi2", "pi3"):
            assert "the edge is offline; waiting for its next run" in c.log(name), c.log(name)
        rows = [json.loads(line)["step"] for line in c.job.log_file.read_text().splitlines()]
        assert rows[:10] == list(range(10)) and rows[10] == 8, rows  # 8 and 9 redone from the checkpoint of 7
        log = step_log(c)
        assert [row["step"] for row in log] == list(range(16))
        offsets = {}
        for row in log:                                     # the resumed run takes up each device's samples
            for name, offset, n, _, _ in row["members"]:
                assert offset == offsets.get(name, 0)
                offsets[name] = offset + n
        losses, params = replay(c)
        np.testing.assert_allclose([row["loss"] for row in log], losses, rtol=1e-4)
        final = c.final_checkpoint()
        assert final.iteration == 15 and rel(final.params, params) < 1e-4


def test_a_fleet_survives_losing_the_edge_machine_to_a_standby_and_every_step_stays_single_process_sgd(tmp_path):
    """A second edge machine: a standby broker with the same accounts and a standby coordinator,
    started with --resume and idle there. The edge machine (coordinator and broker) is killed mid-run:
    the devices and the cloud move to the standby broker, the standby coordinator fetches the newest
    checkpoint from the cloud (which collects them) and continues after it; the whole run equals
    single-process SGD over the samples logged."""
    devices = [Spec("pi1", 4, path=(2, 5)), Spec("pi2", 6, path=(0, U)), Spec("pi3", 3, path=(U, U))]
    with Cluster(tmp_path, Fleet(devices, iterations=16, timeout_s=60, checkpoint_every=4), standby=True) as c:
        c.start("cloud", "edge", "pi1", "pi2", "pi3")
        c.start("edge-standby", resume=True)
        c.wait_iteration(9)                                      # checkpoints after steps 3 and 7
        c.lose_edge_machine()
        codes = c.wait(("edge-standby", "cloud", "pi1", "pi2", "pi3"), timeout=240)
        assert codes == dict.fromkeys(codes, 0), {n: c.log(n)[-2000:] for n in codes}
        standby = c.log("edge-standby")
        assert "edge: fetched the checkpoint of step 7 from the cloud" in standby, standby
        assert "edge: resuming after the checkpoint of step 7" in standby, standby
        port = c.standby_dir.settings().port
        for name in ("cloud", "pi1", "pi2", "pi3"):
            assert f"trying 127.0.0.1:{port}" in c.log(name), c.log(name)
        log = step_log(c)
        assert [row["step"] for row in log] == list(range(16))
        losses, params = replay(c)
        np.testing.assert_allclose([row["loss"] for row in log], losses, rtol=1e-4)
        from hiertrain.train import checkpoint, models

        final = checkpoint.load(tmp_path / "ck-standby", list(models.get("lenet5").param_shapes()))
        assert final.iteration == 15 and rel(final.params, params) < 1e-4


def test_a_device_not_in_the_fleet_file_joins_with_its_own_profile_and_a_bad_profile_is_refused(tmp_path):
    """pi2 is in no fleet file: it publishes its profile (from its config's [profile] file and [fleet]
    samples, rate) and is planned in; the file overrides its radio. pi3, enrolled, publishes profiles
    of another model and of too many samples: each is refused with its reason, counted on the edge's
    status, and pi3 stays unplanned while the run goes on, every step single-process SGD. The fleet
    file has only the edge's timings: the cloud publishes its own."""
    from hiertrain.net import topics
    from hiertrain.net.transport import Endpoint, Transport
    from hiertrain.profile import Profile

    devices = [Spec("pi1", 4), Spec("pi2", 3, joins=True, private=True)]
    def said(line):
        deadline = time.monotonic() + 60
        while line not in c.log("edge") and time.monotonic() < deadline:
            time.sleep(0.2)

    with Cluster(tmp_path, Fleet(devices, extra=(Spec("pi3", 2, joins=True),), iterations=40, timeout_s=60,
                                 cloud_publishes=True)) as c:
        with open(c.job.fleet_file, "a") as f:                 # the operator's word on pi2's radio
            f.write('[[device]]\nname = "pi2"\nrate_mbps = 2.5\n')
        mine = Profile.load(c.job.profiles[1][None]).to_json()
        hostile = Transport(Endpoint.load(c.bdir.credentials_file("pi3")), account="pi3", job=c.job.name)
        with hostile:
            c.start("cloud", "edge", "pi1", "pi2")
            c.wait_iteration(1)
            other = {**mine, "layers": [{**layer, "name": f"x{i}"} for i, layer in enumerate(mine["layers"])],
                     "fleet": {"samples": 2, "rate_mbps": 5}}
            hostile.publish_json(topics.profile(c.job.name, "pi3"), other, retain=True)
            said("refused the profile pi3 published")
            hostile.publish_json(topics.profile(c.job.name, "pi3"), {**mine, "fleet": {"samples": 10**6, "rate_mbps": 5}},
                                 retain=True)
            codes = c.wait(("edge", "cloud", "pi1", "pi2"), timeout=120)
            hostile.publish_json(topics.profile(c.job.name, "pi3"), {}, retain=True)  # (not left for a later run)
        assert codes == dict.fromkeys(codes, 0), {n: c.log(n)[-2000:] for n in codes}
        edge = c.log("edge")
        assert "edge: pi2 joins with its own profile: 3 samples per step, radio 2.5 Mbit/s, private" in edge, edge
        assert "refused the profile pi3 published: device pi3: its profile is of another model (lenet5): its layer 1 is 'x0', the fleet's" in edge
        assert "refused the profile pi3 published: device pi3's profile: fleet samples = 1000000 is not in 1..9" in edge
        assert "edge: pi3 is online but has no profile" in edge, edge
        assert "edge: the cloud published its timings" in edge and "plans without the cloud" not in edge, edge
        assert "plan v2" not in edge, edge                  # a refused profile changes no plan
        c.pump()
        log = step_log(c)
        assert [row["step"] for row in log] == list(range(40))
        assert all(members(row) == ["pi1", "pi2"] for row in log), log
        assert all(m[3] >= 1 for row in log for m in row["members"] if m[0] == "pi2")  # private: never raw samples
        losses, params = replay(c)
        np.testing.assert_allclose([row["loss"] for row in log], losses, rtol=1e-4)
        assert rel(c.final_checkpoint().params, params) < 1e-4
