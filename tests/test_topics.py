import pytest
from hypothesis import given
from hypothesis import strategies as st

from hiertrain import ACCOUNTS, TIERS
from hiertrain.net import topics
from hiertrain.errors import TopicError


jobs = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,20}", fullmatch=True)


@given(jobs, st.sampled_from(TIERS), st.sampled_from(topics.TENSOR_KINDS), st.sampled_from(TIERS),
       st.integers(0, topics.MAX_LAYER))
def test_tensor_topics_round_trip(job, sender, kind, dest, layer):
    name = topics.tensor(job, sender, kind, dest, layer)
    assert topics.parse(name) == topics.TensorTopic(job, sender, kind, dest, layer)


@given(jobs, st.sampled_from(ACCOUNTS), st.sampled_from(["status", "telemetry"]))
def test_account_topics_round_trip(job, account, kind):
    name = getattr(topics, kind)(job, account)
    assert topics.parse(name) == topics.AccountTopic(job, account, kind)


def test_schedule_and_profile_topics():
    assert topics.schedule("j") == "hiertrain/j/schedule"
    assert topics.parse("hiertrain/j/schedule") == topics.ScheduleTopic("j")
    assert topics.profile("j", "edge") == "hiertrain/j/edge/profile"
    with pytest.raises(TopicError):
        topics.profile("j", "planner")


@pytest.mark.parametrize("bad", [
    "other/j/schedule", "hiertrain/j", "hiertrain/j/Lap top/status", "hiertrain/j/laptop/act/planner/1", "hiertrain/j/device/act/cloud/01",
    "hiertrain/j/device/act/cloud/-1", "hiertrain/j/device/pickle/cloud/1", "hiertrain/+/schedule",
    "hiertrain/j/device/act/planner/1", "hiertrain/j/device/act/cloud/1/x", "hiertrain//schedule",
])
def test_malformed_topics_are_refused_with_the_topic_named(bad):
    with pytest.raises(TopicError, match="topic"):
        topics.parse(bad)


@pytest.mark.parametrize("job", ["", "a/b", "a+b", "#", "-lead", "x" * 65, None, 3])
def test_bad_job_ids(job):
    with pytest.raises(TopicError, match="job id"):
        topics.validate_job(job)


def test_inbox_matches_only_tensors_for_that_tier():
    from hiertrain.broker.embedded import topic_matches

    inbox = topics.inbox("j", "edge")
    assert topic_matches(inbox, topics.tensor("j", "device", "samples", "edge", 0))
    assert not topic_matches(inbox, topics.tensor("j", "device", "samples", "cloud", 0))
    assert not topic_matches(inbox, topics.schedule("j"))


def test_each_account_writes_only_its_own_topics():
    from hiertrain.broker.embedded import topic_matches

    assert topics.writable_by("observer") == []  # read-only
    for account in set(ACCOUNTS) - {"observer"}:
        allowed = topics.writable_by(account)
        assert topic_matches(allowed[0], topics.status("j", account))
        assert any(topic_matches(f, topics.schedule("j")) for f in allowed) == (account == "planner")
        for other in set(ACCOUNTS) - {account}:
            assert not any(topic_matches(f, topics.status("j", other)) for f in allowed)


def test_a_sites_bridge_account_and_the_sync_topics():
    from hiertrain.broker.embedded import topic_matches

    assert topics.writable_by("bridge-lab1", "farm") == ["hiertrain/farm/sync/up/lab1"]
    assert topics.readable_by("bridge-lab1", "farm") == ["hiertrain/farm/sync/down"]
    assert any(topic_matches(f, topics.sync_up("farm", "lab1")) for f in topics.writable_by("edge", "farm"))
    assert any(topic_matches(f, topics.sync_down("farm")) for f in topics.writable_by("cloud", "farm"))
    for account in ("device", "planner", "observer", "pi3"):
        assert not any(topic_matches(f, t) for f in topics.writable_by(account, "farm")
                       for t in (topics.sync_up("farm", "lab1"), topics.sync_down("farm")))
    for bad in ("sync", "bridge-lab1"):  # a device cannot take a site's bridge or the sync topics' name
        with pytest.raises(TopicError):
            topics.validate_device_name(bad)
    with pytest.raises(TopicError):
        topics.validate_site("Lab 1")
