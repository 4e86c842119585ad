"""Periodic sync over real Mosquitto: the devices keep their own copies, averaged every K steps.

K = 1 is exact mode's training step for step; K > 1 equals the in-process reference of the same
algorithm (:class:`hiertrain.train.reference.Periodic`), a device lost mid-window included."""

from __future__ import annotations

import time

import numpy as np
import pytest

from hiertrain.lab.cluster import Cluster
from hiertrain.lab.jobs import Fleet, Spec
from hiertrain.lab.replay import rel, replay, step_log

pytestmark = pytest.mark.integration
U = 7  # LeNet-5


def test_periodic_sync_every_step_is_exact_mode(tmp_path):
    devices = [Spec("pi1", 4, path=(2, 5)), Spec("pi2", 6, path=(0, U)), Spec("pi3", 3, path=(U, U))]
    with Cluster(tmp_path, Fleet(devices, iterations=6, timeout_s=60, sync={"every": 1})) as c:
        c.start("cloud", "edge", "pi1", "pi2", "pi3")
        codes = c.wait(("edge", "cloud", "pi1", "pi2", "pi3"), timeout=120)
        assert codes == dict.fromkeys(codes, 0), {n: c.log(n)[-2000:] for n in codes}
        log = step_log(c)
        assert [row["step"] for row in log] == list(range(6))
        assert all(row["every"] == 1 and row["upload"] for row in log)
        assert log[0]["fresh"] == ["pi1", "pi3"] and all(row["fresh"] == ["pi1", "pi3"] for row in log)
        losses, params = replay(c, exact=True)  # single-process SGD over the same samples
        np.testing.assert_allclose([row["loss"] for row in log], losses, rtol=1e-4)
        assert rel(c.final_checkpoint().params, params) < 1e-4


def test_periodic_sync_every_three_steps_equals_its_reference_with_a_device_lost_mid_window(tmp_path):
    """pi2 trains units 1..2 on its own copy and is killed mid-window: the round it hung in is
    redone without it (the others roll their local step back and redo it), its copy never comes
    back and the window's average is of the others' and the edge's. The schedule topic says the
    devices keep their copies."""
    devices = [Spec("pi1", 4, path=(3, 5)), Spec("pi2", 5, path=(2, U)), Spec("pi3", 3, path=(U, U)),
               Spec("pi4", 4, path=(0, U))]
    job = Fleet(devices, iterations=10, timeout_s=60, sync={"every": 3}, optimizer="adamw", lr=2e-3)
    with Cluster(tmp_path, job) as c:
        c.start("cloud", "edge", "pi1", "pi2", "pi3", "pi4")
        c.wait_iteration(3)                                # mid-window (steps 3..5)
        c.pause("pi2")
        time.sleep(1.0)
        c.kill("pi2")
        codes = c.wait(("edge", "cloud", "pi1", "pi3", "pi4"), timeout=120)
        assert codes == dict.fromkeys(codes, 0), {n: c.log(n)[-2000:] for n in codes}
        log = step_log(c)
        assert [row["step"] for row in log] == list(range(10))
        assert [row["upload"] for row in log] == [s % 3 == 2 or s == 9 for s in range(10)]
        assert log[0]["fresh"] == ["pi1", "pi2", "pi3"] and log[1]["fresh"] == []
        assert "pi2" not in [m[0] for m in log[-1]["members"]]
        redone = [row for row in log if row["round"] > log[row["step"] - 1]["round"] + 1]
        assert redone and "redone without it" in c.log("edge")
        losses, params = replay(c)
        np.testing.assert_allclose([row["loss"] for row in log], losses, rtol=1e-4)
        assert rel(c.final_checkpoint().params, params) < 1e-4
        _, exact = replay(c, exact=True)
        assert rel(params, exact) > 1e-3  # (not exact mode: the reference is of its own algorithm)
        c.pump()
        first, last = c.schedules[0], c.schedules[-1]  # the plans as the schedule topic carried them
        assert first["groups"]["keeps"] == ["pi1", "pi2", "pi3"] and first["sync_every"] == 3
        assert last["groups"]["keeps"] == ["pi1", "pi3"]
