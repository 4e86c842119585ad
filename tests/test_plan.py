"""The plan model (hiertrain.plan): every job's step as sample groups along chains of stages, with an
owner per unit. Pure functions, exact outputs asserted."""

import json

import pytest

from hiertrain.errors import PlanError
from hiertrain.plan import Group, Plan, Stage, for_fleet, from_schedule, handover, paths
from hiertrain.schedule import Schedule, ScheduleFeed

U = 7


def osl(o="cloud", s="edge", l="device", m_s=2, m_l=5, b=(20, 4, 8), **kw):
    return Schedule(mapping={"o": o, "s": s, "l": l}, m_s=m_s, m_l=m_l, b_o=b[0], b_s=b[1], b_l=b[2], **kw)


def test_an_osl_schedule_is_three_groups_owned_by_o():
    p = from_schedule(osl(), units=U, batch=32)
    assert p.groups == (Group("o", "device", 20, (Stage("cloud", 1, 7),)),
                        Group("s", "device", 4, (Stage("edge", 1, 2), Stage("cloud", 3, 7)), loss="cloud"),
                        Group("l", "device", 8, (Stage("device", 1, 5), Stage("cloud", 6, 7)), loss="cloud"))
    assert p.owners == ("cloud",) * U and p.driver == "device" and p.batch == 32
    assert p.owned("cloud") == frozenset(range(1, 8)) and p.owned("edge") == frozenset()
    assert p.replicas("edge") == {1, 2} and p.replicas("device") == {1, 2, 3, 4, 5} and p.replicas("cloud") == set()
    assert p.working == {"cloud", "edge", "device"}


def test_idle_roles_are_left_out_and_a_cut_at_the_last_unit_leaves_o_only_the_loss():
    p = from_schedule(osl(m_s=0, m_l=U, b=(24, 0, 8)), units=U, batch=32)
    assert [g.name for g in p.groups] == ["o", "l"]
    assert p.groups[1].stages == (Stage("device", 1, 7),) and p.groups[1].loss == "cloud"
    assert p.groups[1].accounts == ("device", "cloud") and p.working == {"cloud", "device"}
    alone = from_schedule(osl(o="device", s="edge", l="cloud", m_s=0, m_l=0, b=(32, 0, 0)), units=U, batch=32)
    assert alone.groups == (Group("o", "device", 32, (Stage("device", 1, 7),)),) and alone.working == {"device"}


def test_a_chain_is_one_group_whose_stages_own_their_units():
    chain = (Stage("device", 1, 2), Stage("edge", 3, 5), Stage("cloud", 6, 7))
    p = from_schedule(osl(chain=chain, compress_bits=8), units=U, batch=16)
    assert p.groups == (Group("chain", "device", 16, chain),)
    assert p.owners == ("device", "device", "edge", "edge", "edge", "cloud", "cloud") and p.compress_bits == 8
    assert p.replicas("edge") == set() and p.owned("edge") == {3, 4, 5}


def test_a_fleet_is_a_group_per_member_owned_by_the_edge_which_drives():
    p = for_fleet([("pi1", 4, 2, 5), ("pi2", 6, 0, U), ("pi3", 3, U, U), ("pi4", 5, 1, 1)], units=U)
    assert [g.stages for g in p.groups] == [
        (Stage("pi1", 1, 2), Stage("edge", 3, 5), Stage("cloud", 6, 7)),
        (Stage("edge", 1, 7),),
        (Stage("pi3", 1, 7),),
        (Stage("pi4", 1, 1), Stage("cloud", 2, 7))]
    assert [g.source for g in p.groups] == ["pi1", "pi2", "pi3", "pi4"] and p.driver == "edge"
    assert p.owners == ("edge",) * U and p.replicas("cloud") == {2, 3, 4, 5, 6, 7} and p.replicas("pi3") == set(range(1, 8))
    assert paths(p) == {"pi1": (2, 5), "pi2": (0, 7), "pi3": (7, 7), "pi4": (1, 1)}
    assert p.describe() == [
        "pi1: 4 samples of the pi1's data: pi1 1..2 -> edge 3..5 -> cloud 6..7",
        "pi2: 6 samples of the pi2's data: edge 1..7",
        "pi3: 3 samples of the pi3's data: pi3 1..7",
        "pi4: 5 samples of the pi4's data: pi4 1..1 -> cloud 2..7",
        "owners: edge 1..7"]


def test_in_a_fleet_every_message_reaches_its_receiver_from_the_edge_and_in_a_three_tier_job_from_its_sender():
    fleet = for_fleet([("pi1", 4, 2, 5), ("pi4", 5, 1, 1)], units=U)
    assert fleet.arrives_from("pi4", "cloud") == "edge" and fleet.arrives_from("cloud", "pi4") == "edge"
    assert fleet.arrives_from("pi1", "edge") == "pi1" and fleet.arrives_from("edge", "cloud") == "edge"
    three = from_schedule(osl(), units=U, batch=32)
    assert three.arrives_from("device", "cloud") == "device" and three.arrives_from("edge", "cloud") == "edge"


def test_handover_names_the_units_that_change_owner():
    a = from_schedule(osl(), units=U, batch=32)
    b = from_schedule(osl(chain=(Stage("device", 1, 2), Stage("edge", 3, 5), Stage("cloud", 6, 7))), units=U, batch=32)
    assert handover(a, b) == {("cloud", "device"): {1, 2}, ("cloud", "edge"): {3, 4, 5}}
    assert handover(b, b) == {} and handover(a, for_fleet([("pi", 1, 1, 1)], units=U)) == {("cloud", "edge"): set(range(1, 8))}
    with pytest.raises(PlanError, match="plans of 7 and 3 units"):
        handover(a, for_fleet([("pi", 1, 1, 1)], units=3))


def test_plans_round_trip_through_json_and_bad_ones_are_refused_naming_why():
    for p in (from_schedule(osl(), units=U, batch=32), for_fleet([("pi1", 4, 2, 5), ("pi2", 1, 0, 0)], units=U)):
        assert Plan.from_json(json.loads(json.dumps(p.to_json()))) == p
    good = for_fleet([("pi1", 4, 2, 5)], units=U).to_json()
    for bad, why in [
        ({**good, "kind": "chain"}, "expected an object of kind 'groups'"),
        ({**good, "owners": [["edge", 1, 3]]}, "needs an owner for each, got 3"),
        ({**good, "owners": [["edge", 2, 7]]}, "consecutive from unit 1"),
        ({**good, "owners": [["edge", 1, 3], ["planner", 4, 7]]}, "bad account 'planner'"),
        ({**good, "units": True}, "True is not an integer"),
        ({**good, "groups": [{**good["groups"][0], "samples": 0}]}, "samples must be an integer >= 1"),
        ({**good, "groups": [{**good["groups"][0], "stages": [["pi1", 1, 2], ["edge", 4, 7]]}]}, "must cover units 1..7"),
        ({**good, "groups": [{**good["groups"][0], "stages": [["pi1", 1, 2], ["pi1", 3, 7]]}]}, "visits an account twice"),
        ({**good, "groups": good["groups"] * 2}, "distinct names"),
        ({**good, "groups": [{**good["groups"][0], "source": "../x"}]}, "bad account"),
        ({k: v for k, v in good.items() if k != "groups"}, "KeyError"),
    ]:
        with pytest.raises(PlanError, match="not a plan") as err:
            Plan.from_json(bad)
        assert why in str(err.value), (why, err.value)


def test_the_schedule_topic_carries_the_plan_model_checked_against_the_osl_keys():
    s = osl(version=3, effective_iteration=10).with_groups(units=U, batch=32)
    data = json.loads(json.dumps(s.to_json()))
    assert data["groups"]["owners"] == [["cloud", 1, 7]] and data["mapping"]["o"] == "cloud"
    assert Schedule.from_json(data) == s and s.plan(units=U, batch=32) == s.groups
    lying = {**data, "b_o": 24, "b_l": 4}
    with pytest.raises(PlanError, match="do not describe this schedule's O/S/L placement"):
        Schedule.from_json(lying)


def test_a_fleets_schedule_is_its_plan_alone_and_three_tier_tiers_refuse_it():
    plan = for_fleet([("pi1", 4, 2, 5), ("pi2", 6, 0, U)], units=U)
    s = Schedule(mapping={}, m_s=0, m_l=0, b_o=0, b_s=0, b_l=0, policy="hiertrain", cost_model="fleet",
                 iteration_s=0.25, version=2, effective_iteration=7, groups=plan)
    data = json.loads(json.dumps(s.to_json()))
    assert "mapping" not in data and data["version"] == 2 and data["groups"]["driver"] == "edge"
    back = Schedule.from_json(data)
    assert back == s and back.is_fleet and back.working == {"pi1", "edge", "cloud"}  # pi2 only sends samples
    assert back.describe() == "hiertrain: fleet of 2: pi1 (4), pi2 (6); 0.2500 s/step"
    with pytest.raises(PlanError, match="is a fleet's plan, not a three-tier schedule"):
        back.check(n_units=U, batch=10)
    feed = ScheduleFeed()
    assert feed.offer(data) == s and feed.offer(data) is None  # a repeat is ignored


def test_schedule_watch_prints_a_fleet_plan_as_one_row():
    from hiertrain.watch import row

    s = Schedule(mapping={}, m_s=0, m_l=0, b_o=0, b_s=0, b_l=0, cost_model="fleet", iteration_s=0.25, version=2,
                 effective_iteration=7, groups=for_fleet([("pi1", 4, 2, 5), ("pi2", 6, 0, U)], units=U))
    assert row(s) == "      2      7  hiertrain  fleet pi1:2,5/4 pi2:0,7/6      0.2500"
