"""Re-planning on telemetry: the pure state machine, then the service on a real Mosquitto."""

import subprocess

import numpy as np
import pytest

from hiertrain import TIERS
from hiertrain.net import topics
from hiertrain.schedule import Schedule, ScheduleFeed, Stage
from hiertrain.planner.costmodel import TCP_EFFICIENCY
from hiertrain.profile import Profile
from hiertrain.errors import PlanError
from hiertrain.planner.replan import PlannerState

from conftest import PYTHON, ROOT
from synthetic import planner_config, random_profile


def state(**kw):
    s = PlannerState(batch=32, hysteresis=0.2, lead=2, **kw)
    s.profile = random_profile(np.random.default_rng(4), 5)
    return s


def test_first_schedule_needs_profiles_and_both_rates():
    s = PlannerState(batch=32)
    assert s.decide() is None
    s.profile = random_profile(np.random.default_rng(4), 5)
    s.on_rate("device_edge", 5)
    assert s.decide() is None
    s.on_telemetry("edge", {"iteration": 7, "links": {"edge_cloud": 1.5}})
    first = s.decide()
    assert first.version == 1 and first.effective_iteration == 7  # the first applies at once
    assert s.decide() is None


def test_noise_inside_the_band_never_replans_and_a_real_change_does():
    s = state()
    s.on_rate("device_edge", 5), s.on_rate("edge_cloud", 5)
    assert s.decide().version == 1
    rng = np.random.default_rng(0)
    for i in range(200):  # +-10 % noise around 5 Mbit/s
        s.on_telemetry("edge", {"iteration": i, "links": {"edge_cloud": 5 * rng.uniform(0.9, 1.1)}})
        assert s.decide() is None
    s.on_telemetry("edge", {"iteration": 299, "links": {"edge_cloud": 1.5}})  # a step change, once: maybe noise
    assert s.decide() is None
    s.on_telemetry("edge", {"iteration": 300, "links": {"edge_cloud": 1.5}})  # confirmed: follow it
    new = s.decide()
    assert new.version == 2 and new.effective_iteration == 302
    assert s.planned_rates["edge_cloud"] == pytest.approx(1.5 / TCP_EFFICIENCY)


def test_a_link_swinging_past_the_band_does_not_make_plans_thrash_and_a_big_change_still_replans():
    """The thrash the MobileNetV2 demo showed: rates that swing past the band every few iterations
    make plans alternate whose predicted times differ by a few percent. A new placement is published
    only when it beats the current one by min_gain at today's rates."""
    def run(min_gain, then=None):
        s = PlannerState(batch=32, hysteresis=0.2, lead=2, min_gain=min_gain)
        s.profile = random_profile(np.random.default_rng(4), 8)
        s.on_rate("device_edge", 5), s.on_rate("edge_cloud", 20)
        published = [s.decide()]
        for i in range(150):  # 5 <-> 8 Mbit/s, six iterations each
            s.on_telemetry("edge", {"iteration": i, "links": {"device_edge": 5 if (i // 6) % 2 == 0 else 8}})
            published.append(s.decide())
        for i in range(150, 160) if then else ():
            s.on_telemetry("edge", {"iteration": i, "links": {"device_edge": then}})
            published.append(s.decide())
        return [p for p in published if p is not None]

    assert len(run(0.0)) > 20  # without it: a new schedule every swing
    assert len(run(0.1)) <= 2
    slow = run(0.1, then=0.2)  # the device's link collapses: that plan pays, and is published
    assert len(slow) >= 2 and slow[-1].effective_iteration >= 150


def test_a_device_cloud_rate_is_attributed_to_the_slower_link():
    s = state()
    s.on_telemetry("cloud", {"iteration": 1, "links": {"device_cloud": 1.0}})  # nothing known yet: ignored
    assert s.rates == {}
    s.on_rate("device_edge", 5), s.on_rate("edge_cloud", 5)
    s.on_telemetry("cloud", {"iteration": 2, "links": {"device_cloud": 4}})  # a tie: the WAN side
    line = 4 / TCP_EFFICIENCY  # tiers measure payload; plans use line rates
    assert s.samples["edge_cloud"][-1] == pytest.approx(line) and s.samples["device_edge"] == [5]
    s.on_rate("edge_cloud", 20), s.on_rate("edge_cloud", 20)  # a step, confirmed: taken at once
    for i in (3, 4):  # the device link is now the slower: a step too
        s.on_telemetry("cloud", {"iteration": i, "links": {"device_cloud": 1}})
    assert s.rates["device_edge"] == pytest.approx(1 / TCP_EFFICIENCY) and s.rates["edge_cloud"] == 20


def test_rate_outliers_never_move_the_estimate_and_identical_plans_are_not_republished():
    s = state()
    s.on_rate("device_edge", 5), s.on_rate("edge_cloud", 5)
    first = s.decide()
    rng = np.random.default_rng(3)
    published = []
    for i in range(300):  # what unshaped links measured from small transfers: 30 .. 11,500 Mbit/s
        mbps = 5 if i % 7 else float(rng.choice([30, 11_500]))
        s.on_telemetry("edge", {"iteration": i, "links": {"edge_cloud": mbps, "device_edge": 5}})
        new = s.decide()
        if new is not None:
            published.append(new)
    assert first is not None and published == []


def test_an_offline_tier_is_planned_around():
    s = state()
    s.on_rate("device_edge", 50), s.on_rate("edge_cloud", 0.5)  # tempting to use the edge
    s.decide()
    s.on_status("edge", "offline")
    sched = s.decide()
    assert sched is not None and sched.version == 2
    edge_role = sched.role_of("edge")
    assert edge_role != "o" and sched.samples(edge_role) == 0
    s.on_status("edge", "online")
    assert s.decide().version == 3


def test_an_idle_tier_coming_and_going_republishes_nothing():
    s = state()
    s.on_rate("device_edge", 0.01), s.on_rate("edge_cloud", 0.01)
    first = s.decide()
    idle = sorted(set(TIERS) - first.working)
    assert idle and "device" not in idle, first.describe()
    for state_ in ("offline", "online", "offline", "online"):  # e.g. the end of a run, the start of the next
        s.on_status(idle[0], state_)
        assert s.decide() is None


def test_another_planners_newer_schedule_bumps_our_version():
    s = state()
    s.on_rate("device_edge", 5), s.on_rate("edge_cloud", 5)
    ours = s.decide()
    assert s.on_schedule(ours.to_json()) is None  # our own echo
    theirs = dict(ours.to_json(), version=5, m_l=0)
    again = s.on_schedule(theirs)
    assert again.version == 6


def test_a_standby_planner_numbers_on_from_the_tiers_and_plans_without_a_tier_the_device_lost():
    """Next to a standby broker the planner never saw the edge, and no schedule is retained there:
    the tiers' telemetry says which version they run, the device's status which tiers it lost."""
    s = state()
    s.on_rate("device_edge", 50), s.on_rate("edge_cloud", 0.5)  # tempting to use the edge
    for tier in ("device", "cloud"):
        s.on_status(tier, "online")
    s.on_telemetry("cloud", {"iteration": 14, "schedule_version": 7})
    s.on_telemetry("device", {"iteration": 14, "schedule_version": 2 ** 40})  # not a version: ignored
    s.on_lost(["edge", "device", "nobody"])  # only tiers other than the device count
    sched = s.decide()
    assert sched.version == 8 and "edge" not in sched.working, sched.describe()
    s.on_status("edge", "online")  # it comes back: planned in again
    assert "edge" in s.decide().working


def test_a_tier_the_planner_saw_online_is_not_made_offline_by_the_devices_list():
    s = state()
    s.on_rate("device_edge", 50), s.on_rate("edge_cloud", 0.5)
    for tier in TIERS:
        s.on_status(tier, "online")
    s.on_lost(["edge"])  # an earlier failover the edge has come back from: its status decides
    assert "edge" in s.decide().working


def test_subscribers_ignore_older_or_repeated_versions():
    s = state()
    s.on_rate("device_edge", 5), s.on_rate("edge_cloud", 5)
    sched = s.decide().to_json()
    feed = ScheduleFeed()
    assert feed.offer(dict(sched, version=3)) is not None
    assert feed.offer(dict(sched, version=2)) is None
    assert feed.offer(dict(sched, version=3)) is None
    assert feed.offer({"version": 9}) is None  # malformed
    assert feed.offer(dict(sched, version=4)).version == 4
    assert feed.ignored == 3


def next_schedule(transport, timeout=20):
    import queue
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            ev = transport.events.get(timeout=deadline - time.monotonic())
        except queue.Empty:
            break
        if isinstance(ev.topic, topics.ScheduleTopic):
            return ev.payload
    raise AssertionError("no schedule arrived")


@pytest.mark.integration
def test_planner_service_replans_on_telemetry_past_the_threshold(mosquitto, broker_dir, connect, tmp_path):
    cfg, profile = planner_config(tmp_path, broker_dir.credentials_file("planner"))
    watcher = connect("cloud", observer=True)
    watcher.subscribe(topics.schedule("t"))
    device = connect("cloud")  # the edge-cloud link is the cloud's (and the edge's) to report
    proc = subprocess.Popen([PYTHON, "-m", "hiertrain", "planner", "run", "--config", str(cfg)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        first = next_schedule(watcher)
        assert first["version"] == 1 and first["b_o"] + first["b_s"] + first["b_l"] == 32
        device.publish_json(topics.telemetry("t", "cloud"), {"iteration": 10, "links": {"edge_cloud": 5.5}})
        device.publish_json(topics.telemetry("t", "cloud"), {"iteration": 11, "links": {"edge_cloud": 4.6}})
        device.publish_json(topics.telemetry("t", "cloud"), {"iteration": 12, "links": {"edge_cloud": 0.5}})
        device.publish_json(topics.telemetry("t", "cloud"), {"iteration": 13, "links": {"edge_cloud": 0.5}})
        second = next_schedule(watcher)  # a step change, confirmed by a second measurement
        assert second["version"] == 2 and second["effective_iteration"] == 15
        device.publish_json(topics.telemetry("t", "cloud"), "not an object")  # dropped with a log line
        for i in (20, 21):
            device.publish_json(topics.telemetry("t", "cloud"), {"iteration": i, "links": {"edge_cloud": 0.05}})
        # what the same state machine decides: a new placement is published, the same one is not
        twin = PlannerState(batch=32, hysteresis=0.25, profile=Profile.load(profile))
        for link, mbps in (("device_edge", 5.0), ("edge_cloud", 5.0)):
            twin.on_rate(link, mbps)
        twin.decide()
        for i, mbps in ((10, 5.5), (11, 4.6), (12, 0.5), (13, 0.5), (20, 0.05), (21, 0.05)):
            twin.on_telemetry("cloud", {"iteration": i, "links": {"edge_cloud": mbps}})
            twin.decide()
        if twin.version == 3:
            assert next_schedule(watcher)["version"] == 3
        else:
            with pytest.raises(AssertionError, match="no schedule arrived"):
                next_schedule(watcher, timeout=4)
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert "telemetry must be a JSON object" in err


@pytest.mark.integration
def test_a_planner_says_what_it_waits_for_and_a_second_one_waits_for_the_first(mosquitto, broker_dir, tmp_path):
    import threading
    import time

    cfg, _ = planner_config(tmp_path, broker_dir.credentials_file("planner"), rates=False)  # it must say so
    outs: dict[str, list[str]] = {"a": [], "b": []}

    def start(name):
        proc = subprocess.Popen([PYTHON, "-m", "hiertrain", "planner", "run", "--config", str(cfg)],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
        threading.Thread(target=lambda: [outs[name].append(line) for line in proc.stdout], daemon=True).start()
        return proc

    def said(name, text, timeout=20):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(text in line for line in outs[name]):
                return True
            time.sleep(0.1)
        return False

    a = start("a")
    b = None
    try:
        assert said("a", "no schedule yet, waiting for the device_edge and edge_cloud rate (set bw_device_edge"), outs
        b = start("b")
        assert said("b", f"another planner (pid {a.pid}) holds the job; waiting until it goes offline"), outs
        assert not said("b", "no schedule yet", timeout=2)
        a.terminate()
        a.wait(20)
        assert said("b", "no schedule yet, waiting for"), outs  # b took over
    finally:
        for p in (a, b):
            if p is not None and p.poll() is None:
                p.terminate()
                p.wait(20)


def test_the_replica_interval_keeps_replicas_within_their_share_of_the_device_link():
    from dataclasses import replace

    from hiertrain.planner.costmodel import REPLICA_SHARE, Bandwidth, replica_every

    profile = random_profile(np.random.default_rng(4), 5)
    state_bytes = 3 * sum(layer.param_bytes for layer in profile.layers)
    base = Schedule(mapping={"o": "cloud", "s": "device", "l": "edge"}, m_s=1, m_l=3, b_o=8, b_s=4, b_l=4,
                    iteration_s=0.5)
    for rate in (0.5, 5.0, 50.0):
        bw = Bandwidth(rate, 100.0)  # the device link is the slower: the replica's path
        k = replica_every(profile, bw, base)
        assert k >= 1 and 8e-6 * state_bytes / rate <= REPLICA_SHARE * k * 0.5 + 1e-9
        assert k == 1 or 8e-6 * state_bytes / rate > REPLICA_SHARE * (k - 1) * 0.5  # the smallest such K
    assert replica_every(profile, Bandwidth(0.5, 100), base) >= replica_every(profile, Bandwidth(50, 100), base)
    on_device = replace(base, mapping={"o": "device", "s": "edge", "l": "cloud"})
    assert replica_every(profile, Bandwidth(5, 5), on_device) == 0  # the device holds the state itself
    # a chain: every stage off the device replicates its own units
    chain = replace(base, chain=(Stage("device", 1, 2), Stage("edge", 3, 5)))
    k = replica_every(profile, Bandwidth(0.5, 100), chain)
    edge_bytes = 3 * sum(layer.param_bytes for layer in profile.layers[2:])
    assert k >= 1 and 8e-6 * edge_bytes / 0.5 <= REPLICA_SHARE * k * 0.5 + 1e-9
    assert k <= replica_every(profile, Bandwidth(0.5, 100), base)  # a part of the model, not all of it
    assert replica_every(profile, Bandwidth(5, 5), replace(base, chain=(Stage("device", 1, 5),))) == 0
    s = state()
    s.on_rate("device_edge", 5), s.on_rate("edge_cloud", 5)
    sched = s.decide()
    assert sched.replica_every == replica_every(s.profile, Bandwidth(5, 5), sched)


def _hungry_device_profile(seed=3):
    """A device as fast as the edge but drawing 30 W busy: the fastest plans compute on it."""
    from dataclasses import replace

    p = random_profile(np.random.default_rng(seed), 5)
    device = replace(p.tiers["edge"], extra={"power": {"class": "pi4", "busy_w": 30.0}})
    return Profile(p.model, p.sample_bytes, p.layers, {**p.tiers, "device": device}, p.extra)


def test_a_device_whose_energy_budget_drops_is_replanned_within_two_steps():
    from hiertrain.planner import energy as E
    from hiertrain.planner.costmodel import Bandwidth

    s = PlannerState(batch=32, hysteresis=0.2, lead=2, profile=_hungry_device_profile())
    s.on_rate("device_edge", 5), s.on_rate("edge_cloud", 5)
    first = s.decide()
    bw = Bandwidth(5, 5)
    spent = E.schedule_joules(s.profile, bw, first)["device"]
    least = E.plan_three_tier(s.profile, bw, 32, E.Goal("energy")).joules["device"]
    assert least < 0.5 * spent  # the fastest plan is the hungry one
    budget = (least + spent) / 2
    s.on_telemetry("device", {"iteration": 40, "budget_j": budget})  # its battery fell low at step 40
    new = s.decide()
    assert new.version == 2 and new.effective_iteration == 42  # in effect two steps on
    assert E.schedule_joules(s.profile, bw, new)["device"] <= budget * (1 + 1e-9)
    assert new.to_json()["budget_j"] == budget and new.to_json()["joules"]["device"] <= budget * (1 + 1e-9)
    best = E.plan_three_tier(s.profile, bw, 32, E.Goal("budget", budget_j={"device": budget}))
    assert new.iteration_s == pytest.approx(best.schedule.iteration_s)
    s.on_telemetry("device", {"iteration": 41, "budget_j": budget})  # the same budget again: nothing new
    assert s.decide() is None
    s.on_telemetry("device", {"iteration": 50, "budget_j": least / 10})  # cannot be met: the least-energy plan
    s.decide()  # (published only if it places work otherwise than the plan in force)
    assert E.schedule_joules(s.profile, bw, s.current)["device"] == pytest.approx(least)
    for account, payload, why in (("edge", {"budget_j": 3.0}, "only the device has one"),
                                  ("device", {"budget_j": -1}, "not a positive number"),
                                  ("device", {"budget_j": "lots"}, "not a positive number")):
        with pytest.raises(PlanError, match=why):
            s.on_telemetry(account, payload)


def test_a_device_reporting_average_watts_gets_a_paced_schedule_two_steps_on():
    """budget_w in the device's telemetry (its battery's watt-hours per hour): the planner publishes the
    schedule of least paced seconds (its pace_s in the schedule, the device's joules over the step
    within the watts), in effect two steps on; bad values are refused."""
    from hiertrain.planner import energy as E
    from hiertrain.planner.costmodel import Bandwidth
    from hiertrain.schedule import Schedule

    s = PlannerState(batch=32, hysteresis=0.2, lead=2, profile=_hungry_device_profile())
    s.on_rate("device_edge", 5), s.on_rate("edge_cloud", 5)
    first = s.decide()
    bw = Bandwidth(5, 5)
    idle = E.tier_powers(s.profile)["device"].idle_w
    drawn = E.schedule_joules(s.profile, bw, first)["device"] / first.iteration_s
    watts = idle + 0.3 * (drawn - idle)  # below what the fastest plan draws
    s.on_telemetry("device", {"iteration": 40, "budget_w": watts})
    new = s.decide()
    assert new is not None and new.version == 2 and new.effective_iteration == 42
    sent = Schedule.from_json(new.to_json())  # as the device reads it from the topic
    best = E.plan_three_tier(s.profile, bw, 32, E.Goal("budget", budget_w={"device": watts}))
    assert sent.iteration_s == pytest.approx(best.schedule.iteration_s)
    assert sent.extra["budget_w"] == watts and sent.extra["joules"]["device"] / sent.iteration_s <= watts * (1 + 1e-9)
    if "pace_s" in sent.extra:
        assert sent.extra["pace_s"] == pytest.approx(sent.iteration_s)
    assert s.decide() is None  # nothing new
    s.on_telemetry("device", {"iteration": 50, "budget_w": idle + 0.001})  # a milliwatt to spare: every plan paced
    paced = Schedule.from_json(s.decide().to_json())
    assert paced.effective_iteration == 52 and paced.extra["pace_s"] == pytest.approx(paced.iteration_s)
    assert paced.extra["joules"]["device"] / paced.iteration_s <= (idle + 0.001) * (1 + 1e-9)
    for account, payload, why in (("cloud", {"budget_w": 3.0}, "only the device has one"),
                                  ("device", {"budget_w": 0}, "budget_w = 0 from the device is not a positive number of watts")):
        with pytest.raises(PlanError, match=why):
            s.on_telemetry(account, payload)
