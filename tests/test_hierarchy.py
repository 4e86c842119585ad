"""Hierarchical jobs: three edge sites, each its own Mosquitto, coordinator, cloud worker and device,
their brokers bridged to the cloud's by Mosquitto's own bridge (as `broker add-site` and `broker bridge`
set them up), and the cloud's averager. Every 3 steps the sites' models go up and their average comes
back. One site's WAN link is cut for a while: it trains on alone, the averager names it missing, and it
rejoins a later average. Every site's steps and final weights equal the job in one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from contextlib import ExitStack

import numpy as np
import pytest

from hiertrain.broker.layout import BrokerDir, Settings
from hiertrain.broker.process import BrokerProcess, free_port
from hiertrain.lab.cluster import Cluster, toml
from hiertrain.lab.jobs import Fleet, Spec
from hiertrain.lab.replay import rel, replay_hierarchy, step_log
from hiertrain.lab.wan import Wan
from hiertrain.train import hierarchy as H

U = 7  # LeNet-5
JOB = "farm"
SITES = ("lab1", "lab2", "lab3")
STEPS, K2 = 18, 3


@pytest.mark.integration
def test_three_sites_over_bridged_brokers_equal_their_reference_and_a_site_whose_wan_drops_rejoins(tmp_path):
    cloud = BrokerDir(tmp_path / "cloud")
    cloud.init(Settings(port=free_port(), bind="127.0.0.1", job=JOB))
    paths = {"lab1": (2, 5), "lab2": (3, U), "lab3": (U, U)}
    for site in SITES:  # (as `broker add-site` does, before the cloud's broker starts here)
        cloud.add_site(site)
    with ExitStack() as stack:
        stack.enter_context(BrokerProcess(cloud, kind="mosquitto"))
        wans, sites = {}, {}
        for i, site in enumerate(SITES):
            wans[site] = stack.enter_context(Wan(("127.0.0.1", cloud.settings().port)))  # the site's uplink
            creds = json.loads(cloud.credentials_file(f"bridge-{site}").read_text())
            link = tmp_path / f"bridge-{site}.json"
            link.write_text(json.dumps({**creds, "port": wans[site].port}))
            os.chmod(link, 0o600)
            job = Fleet([Spec(f"pi{i + 1}", 4 + i, path=paths[site], data={"dataset": "synthetic", "shard": [i, 3]})],
                        name=JOB, iterations=STEPS, timeout_s=60, sync={"every": 3} if site == "lab2" else "exact",
                        hierarchy={"site": site, "every": K2, "wait_s": 8.0})
            sites[site] = stack.enter_context(Cluster(tmp_path / site, job, bridge=(site, link)))
        rounds = tmp_path / "average-log.jsonl"
        cfg = toml(tmp_path / "averager.toml", JOB, cloud.credentials_file("cloud"), {
            "train": {"model": "lenet5", "iterations": STEPS, "batch": 8},
            "hierarchy": {"sites": list(SITES), "every": K2, "wait_s": 4.0, "log": str(rounds)}})
        with open(tmp_path / "averager.log", "w") as out:
            averager = subprocess.Popen([sys.executable, "-m", "hiertrain", "cloud", "run", "--config", str(cfg)],
                                        stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path)
        try:
            for c in sites.values():
                c.start("cloud", "edge", *c.job.specs)

            def lab3(test, timeout=120):
                deadline = time.monotonic() + timeout
                while time.monotonic() < deadline:
                    if any(test(row) for row in step_log(sites["lab3"])):
                        return
                    time.sleep(0.1)
                raise AssertionError(sites["lab3"].log("edge")[-2000:])

            lab3(lambda row: "sites" in row.get("average", {}))          # round 1 averaged with everyone
            wans["lab3"].cut()                                           # lab3's uplink goes down
            lab3(lambda row: row.get("average", {}).get("missed"))       # a round without the cloud: it trains on
            wans["lab3"].restore()
            for c in sites.values():
                codes = c.wait(("edge", "cloud", *c.job.specs), timeout=180)
                assert codes == dict.fromkeys(codes, 0), {n: c.log(n)[-2000:] for n in codes}
            assert averager.wait(60) == 0
        finally:
            if averager.poll() is None:
                averager.kill()
        said = (tmp_path / "averager.log").read_text()
        rows = [json.loads(line) for line in rounds.read_text().splitlines()]
        assert [r["round"] for r in rows] == list(range(1, H.rounds(STEPS, K2) + 1)), said
        assert rows[0]["sites"] == list(SITES)
        missed = [r["round"] for r in rows if r["missing"] == ["lab3"]]
        assert missed and f"round {missed[0]}: averaged lab1, lab2; lab3 missing" in said
        assert any("lab3" in r["sites"] for r in rows if r["round"] > missed[0]), said  # it rejoined
        log3 = step_log(sites["lab3"])
        assert "no average from the cloud in 8 s" in sites["lab3"].log("edge")
        assert any("lab3" in row.get("average", {}).get("sites", []) for row in log3 if row["step"] > 3 * missed[0])
        ours = replay_hierarchy(sites, rows)
        for site, c in sites.items():
            log = step_log(c)
            assert [row["step"] for row in log] == list(range(STEPS))
            losses, params = ours[site]
            np.testing.assert_allclose([row["loss"] for row in log], losses, rtol=1e-4, err_msg=site)
            assert rel(c.final_checkpoint().params, params) < 1e-4, site
        # the last average reached every site: they end with one model
        last = rows[-1]
        if last["sites"] == list(SITES):
            assert rel(sites["lab1"].final_checkpoint().params, sites["lab3"].final_checkpoint().params) < 1e-6


def test_rounds_are_numbered_from_the_steps_and_the_last_step_ends_one():
    assert [s for s in range(10) if H.due(s, 3, 10)] == [2, 5, 8, 9]
    assert [H.round_after(s, 3) for s in (2, 5, 8, 9)] == [1, 2, 3, 4] and H.rounds(10, 3) == 4
    assert H.rounds(9, 3) == 3 and H.rounds(1, 5) == 1


def test_the_average_is_weighted_by_each_sites_samples_and_models_unlike_the_others_are_refused():
    from hiertrain.errors import ProtocolError

    a = {"w": np.full(3, 1.0, np.float32), "m:w": np.zeros(3, np.float32)}
    b = {"w": np.full(3, 4.0, np.float32), "m:w": np.ones(3, np.float32)}
    mean = H.average({"lab2": (b, 30.0), "lab1": (a, 10.0)})
    assert np.allclose(mean["w"], 3.25) and np.allclose(mean["m:w"], 0.75) and mean["w"].dtype == np.float32
    with pytest.raises(ProtocolError, match="lab2's model has other tensors") as exc:
        H.average({"lab1": (a, 1.0), "lab2": ({"w": b["w"]}, 1.0)})
    assert exc.value.sender == "lab2"
    for bad in (0, -3, True, "12", float("nan")):
        with pytest.raises(ProtocolError, match="trained"):
            H.check_samples("lab1", bad)


def test_the_sync_topics_parse_and_nothing_else_passes_for_them():
    from hiertrain.errors import TopicError
    from hiertrain.net import topics

    assert topics.parse("hiertrain/farm/sync/up/lab1") == topics.SyncTopic("farm", "lab1")
    assert topics.parse("hiertrain/farm/sync/down") == topics.SyncTopic("farm")
    assert str(topics.SyncTopic("farm", "lab1")) == topics.sync_up("farm", "lab1")
    for bad in ("hiertrain/farm/sync/up/Lab 1", "hiertrain/farm/sync/sideways", "hiertrain/farm/sync/up/bridge-x/y"):
        with pytest.raises(TopicError):
            topics.parse(bad)


@pytest.mark.parametrize("tier,body,why", [
    ("edge", '[fleet]\nfile = "f.toml"\n[hierarchy]\nevery = 3\n', "needs site"),
    ("edge", '[fleet]\nfile = "f.toml"\n[hierarchy]\nsite = "lab1"\n', "every = None"),
    ("edge", '[fleet]\nfile = "f.toml"\n[hierarchy]\nsite = "Lab 1"\nevery = 3\n', "bad site name"),
    ("edge", '[hierarchy]\nsite = "lab1"\nevery = 3\n', "needs a [fleet] table"),
    ("edge", '[fleet]\nfile = "f.toml"\n[hierarchy]\nsite = "lab1"\nevery = 3\nsites = ["a"]\n', "not the edge's"),
    ("cloud", '[hierarchy]\nevery = 3\nsites = []\n', "a list of distinct names"),
    ("cloud", '[hierarchy]\nevery = 3\nsites = ["a", "a"]\n', "a list of distinct names"),
    ("cloud", '[hierarchy]\nevery = 3\nsites = ["a"]\nwait_s = 0\n', "wait_s = 0"),
    ("device", '[hierarchy]\nevery = 3\n', "not the device's"),
])
def test_a_bad_hierarchy_table_is_one_line_naming_it(tmp_path, broker_dir, tier, body, why):
    from hiertrain import tierconfig
    from hiertrain.errors import ConfigError

    cfg = tmp_path / f"{tier}.toml"
    cfg.write_text(f'job = "t"\n[broker]\ncredentials = "{broker_dir.credentials_file(tier)}"\n' + body)
    with pytest.raises(ConfigError, match="hierarchy") as exc:
        tierconfig.load(tier, cfg)
    assert why in str(exc.value) and "\n" not in str(exc.value)


def test_a_good_hierarchy_table_loads(tmp_path, broker_dir):
    from hiertrain import tierconfig

    cfg = tmp_path / "cloud.toml"
    cfg.write_text(f'job = "t"\n[broker]\ncredentials = "{broker_dir.credentials_file("cloud")}"\n'
                   '[hierarchy]\nsites = ["lab1", "lab2"]\nevery = 5\nwait_s = 30\nlog = "rounds.jsonl"\n')
    h = tierconfig.load("cloud", cfg).hierarchy
    assert h == H.Hierarchy(every=5, sites=("lab1", "lab2"), wait_s=30.0, log=str(tmp_path / "rounds.jsonl"))


@pytest.mark.protocol
def test_the_averager_refuses_forged_and_malformed_models_and_averages_what_it_has(tmp_path, broker_dir, mosquitto,
                                                                                    connect):
    """On the cloud's broker, models that are not finite, that say another site than their topic's or an
    impossible sample count are dropped with their reason and counted; the round is averaged over the
    site that sent a good model, the other named missing after wait_s, and the averager ends."""
    import threading

    from hiertrain import tierconfig
    from hiertrain.cloud.averager import Averager
    from hiertrain.net import topics
    from hiertrain.net.wire import Message
    from hiertrain.train import models

    cfg = toml(tmp_path / "averager.toml", "t", broker_dir.credentials_file("cloud"), {
        "train": {"model": "lenet5", "iterations": 2, "batch": 8},
        "hierarchy": {"sites": ["lab1", "lab2"], "every": 2, "wait_s": 2.0, "log": str(tmp_path / "rounds.jsonl")}})
    averager = Averager(tierconfig.load("cloud", cfg))
    done: list[int] = []
    thread = threading.Thread(target=lambda: done.append(averager.run()), daemon=True)
    thread.start()
    edge = connect("edge")
    edge.subscribe(topics.sync_down("t"))
    time.sleep(1.0)
    good = {k: np.full(s, 0.5, np.float32) for k, s in models.get("lenet5").param_shapes().items()}
    bad = {**good, next(iter(good)): np.full(next(iter(good.values())).shape, np.nan, np.float32)}

    def up(site, tensors, **meta):
        edge.send(Message("weights", "t", "edge", "cloud", 1, 0, tensors, 0, {"site": site, "samples": 8, **meta}),
                  topic=topics.sync_up("t", "lab1"))

    up("lab1", bad)                    # not finite
    up("lab2", good)                   # says lab2 on lab1's topic
    up("lab1", good, samples=-3)       # an impossible sample count
    up("lab1", good)
    thread.join(30)
    assert done == [0]
    dropped = dict(averager.transport.inbound.dropped)
    assert dropped == {"non-finite": 1, "unauthorized": 1, "refused": 1}, dropped
    rows = [json.loads(line) for line in (tmp_path / "rounds.jsonl").read_text().splitlines()]
    assert rows == [{"round": 1, "sites": ["lab1"], "missing": ["lab2"], "samples": {"lab1": 8.0}}]
    got = edge.inbound.sync.get(timeout=10)
    assert got.iteration == 1 and got.meta["sites"] == ["lab1"] and got.meta["missing"] == ["lab2"]
    assert all(np.array_equal(got.tensors[k], v) for k, v in good.items())
