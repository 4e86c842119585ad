import threading
import time

import numpy as np
import pytest

from hiertrain.errors import MissingMessage, TierLost
from hiertrain.net.mailbox import NEW_RUN, PARKED, RESTARTED, Mailbox
from hiertrain.net.wire import Message



def msg(iteration, layer=2, sender="device", kind="act"):
    return Message(kind, "j", sender, "cloud", iteration, layer, {"x": np.zeros(1, np.float32)})


def test_take_waits_for_the_matching_key():
    box = Mailbox()
    threading.Timer(0.05, lambda: box.put(msg(3))).start()
    box.put(msg(3, layer=1))
    got = box.take("act", "device", 3, 2, timeout=5)
    assert got.key == ("act", 3, 2, "device")
    assert box.pending() == [("act", 3, 1, "device")]


def test_timeout_names_kind_tier_iteration_and_layer():
    with pytest.raises(MissingMessage) as err:
        Mailbox().take("grad", "cloud", 12, 4, timeout=0.01)
    text = str(err.value)
    assert "'grad'" in text and "'cloud'" in text and "iteration 12" in text and "layer 4" in text
    assert isinstance(err.value, TimeoutError)


def test_duplicates_are_refused_before_and_after_delivery():
    box = Mailbox()
    assert box.put(msg(1)) is None
    assert box.put(msg(1)) == "duplicate"
    box.take("act", "device", 1, 2, timeout=1)
    assert box.put(msg(1)) == "duplicate"


def test_stale_iterations_are_refused_and_dropped():
    box = Mailbox()
    box.put(msg(4))
    assert box.advance(5) == 1
    assert box.put(msg(4, layer=9)).startswith("stale")
    assert box.put(msg(5)) is None


def test_iterations_far_ahead_are_refused_once_the_owner_advanced():
    box = Mailbox(window=8)
    assert box.put(msg(500)) is None  # before the first advance (a resumed run starts anywhere)
    box.advance(10)
    assert box.put(msg(18)) is None
    assert box.put(msg(19)).startswith("too far ahead")


def test_a_lost_tier_ends_every_wait_at_once_naming_it():
    box = Mailbox()
    threading.Timer(0.2, box.lose, args=("cloud", "offline")).start()
    t0 = time.monotonic()
    with pytest.raises(TierLost, match="tier 'cloud' is offline .*'act' from 'edge' for iteration 3"):
        box.take("act", "edge", 3, 2, timeout=60)
    assert time.monotonic() - t0 < 30
    box.found("cloud")
    with pytest.raises(MissingMessage):
        box.take("act", "edge", 3, 2, timeout=0.1)


def run_msg(iteration, run, sender="device"):
    return Message("samples", "j", sender, "cloud", iteration, 0, {"x": np.zeros(1, np.float32)}, meta={"run": run})


def test_a_device_message_of_a_run_not_followed_is_parked_and_ends_the_wait():
    """A tier that followed an attempt the others abandoned learns of the device's new run from its
    first message: parked (for the failover's next mailbox), and the wait ends naming the device."""
    box = Mailbox()
    box.follow("old")
    box.put(run_msg(20, "old"))
    box.advance(20)
    assert box.put(run_msg(12, "new")) is None  # earlier than the watermark: the new run resumed earlier
    assert box.put(run_msg(12, "new", sender="edge")).startswith("stale")  # only the device starts runs
    with pytest.raises(TierLost) as err:
        box.take("samples", "device", 21, 0, timeout=5)
    assert err.value.tier == "device" and err.value.state == NEW_RUN
    box.found("device")  # its status saying online does not undo it
    with pytest.raises(TierLost):
        box.check_lost("x")
    nxt = Mailbox(retired=frozenset({"old"}))
    for m in box.parked.values():
        nxt.put(m)
    assert nxt.take("samples", "device", 12, 0, timeout=1).meta["run"] == "new"
    for i in range(PARKED + 3):  # bounded
        box.put(run_msg(100 + i, "other"))
    assert len(box.parked) == PARKED


def test_a_tier_back_as_a_new_process_stays_lost_until_the_next_run():
    box = Mailbox()
    box.lose("edge", RESTARTED)
    box.found("edge")
    with pytest.raises(TierLost):
        box.check_lost("x")
    box.follow("r2")  # nothing of the new run was exchanged with the old process
    box.check_lost("x")


def test_a_tier_the_device_started_the_followed_run_without_is_no_reason_to_abandon_it():
    """The failover race: the device, not hearing the edge on a standby broker, starts a run without
    it; a follower already in that run must not abandon it when its own grace timer expires for the
    edge (it did once: the device then waited forever for the cloud's weights)."""
    from hiertrain.net.membership import Membership

    box = Mailbox()
    members = Membership("cloud", lambda: box, own=("c0:1", 1.0), on_own_replaced=lambda: None,
                         on_reconnected=lambda peer: None)
    box.follow("run2")
    members.status_of("device", {"state": "online", "run": "run2", "run_without": ["edge"], "lost": ["edge"],
                                 "session": "d0:2", "started": 1.0}, retained=False)
    assert members.run_without(box.run, "edge") and not members.run_without(box.run, "cloud")
    assert not members.run_without("run1", "edge")  # a run started with the edge still waits for it
    # the edge came back and a later run has it again, though the device still lists it lost once
    members.status_of("device", {"state": "online", "run": "run3", "run_without": [], "lost": ["edge"],
                                 "session": "d0:3", "started": 1.0}, retained=False)
    assert not members.run_without("run3", "edge")
