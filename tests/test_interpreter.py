"""The interpreter: every account of a plan running :func:`hiertrain.interpreter.step` (in threads, over
an in-memory network that delivers in a shuffled order) makes exactly the step the in-process
reference makes, for HierTrain's O/S/L groups, a layer chain, JALAD's 8-bit chain and a fleet; rows
that do not match the plan are the sender's protocol error."""

from __future__ import annotations

import random
import threading
from typing import Any

import numpy as np
import pytest

from hiertrain import interpreter
from hiertrain import plan as P
from hiertrain.errors import ProtocolError
from hiertrain.exchanges import exchanges
from hiertrain.net.wire import Message
from hiertrain.schedule import Schedule
from hiertrain.train import data, models
from hiertrain.train.fleetroles import Member, Round
from hiertrain.train.optim import Optimizer, OptimizerConfig
from hiertrain.train.part import Part
from hiertrain.train.reference import InProcessPlan, split
from hiertrain.train.runtime import Runtime

pytestmark = pytest.mark.compute
U = 7  # LeNet-5's units


@pytest.fixture(scope="module")
def runtime(tmp_path_factory):
    return Runtime(root=tmp_path_factory.mktemp("segments"))


class Network:
    """Messages between accounts in memory; ``first`` answers with a random one of those already here,
    so the accounts see arrival orders the plan order does not fix."""

    def __init__(self, seed: int) -> None:
        self.box: dict[tuple[str, str, str, int], Message] = {}
        self.cond = threading.Condition()
        self.rng = random.Random(seed)
        self.sent: list[tuple[str, str, str, int]] = []

    def io(self, me: str) -> Any:
        net = self

        class _Io:
            def take(self, x):
                key = (x.kind, x.peer, me, x.layer)
                with net.cond:
                    assert net.cond.wait_for(lambda: key in net.box, timeout=20), f"{me} waits for {key}"
                    return net.box.pop(key)

            def first(self, xs):
                with net.cond:
                    here = lambda: [x for x in xs if (x.kind, x.peer, me, x.layer) in net.box]  # noqa: E731
                    assert net.cond.wait_for(here, timeout=20), f"{me} waits for any of {xs}"
                    return net.rng.choice(here())

            def send(self, x, tensors, **meta):
                key = (x.kind, me, x.peer, x.layer)
                with net.cond:
                    assert key not in net.box, f"{key} sent twice"
                    net.box[key] = Message(x.kind, "t", me, x.peer, 0, x.layer, dict(tensors), 0, meta)
                    net.sent.append(key)
                    net.cond.notify_all()

        return _Io()


def run_accounts(plan: P.Plan, spec, runtime, params, optimizers, xs_of_source, y, seed=0):
    """Every account's step of ``plan`` in a thread; the owners step their optimizers. The data sources'
    samples (the clock's) are given to each group's first stage. Returns (loss, params after)."""
    net, part = Network(seed), Part(spec, runtime)
    groups = split(plan, xs_of_source, y)
    owned = {a: {k: v for k, v in params.items() if k in _names(spec, plan.owned(a))} for a in set(plan.owners)}
    results: dict[str, Any] = {}

    def account(a: str) -> None:
        try:
            xs = exchanges(plan, a)
            local = {}
            for g in plan.groups:  # the clock's samples: at the first stage where the driver has the data,
                if plan.driver == g.source and g.stages[0].tier == a:  # else sent by their source
                    local[g.name] = groups[g.name][0]
                elif plan.driver != g.source and g.source == a and g.stages[0].tier != a:
                    up = next(e for e in xs if e.op == "send" and e.kind == "samples" and g.name in e.groups)
                    net.io(a).send(up, {"x": groups[g.name][0], "y": groups[g.name][1]})
                elif g.source == a:
                    local[g.name] = groups[g.name][0]
            if a in owned:
                interpreter.send_weights(plan, xs, part, owned[a], net.io(a).send)
            results[a] = interpreter.step(plan, a, xs, part, owned.get(a, {}), net.io(a), local=local,
                                          labels=lambda g: groups[g.name][1])
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            results[a] = exc

    threads = [threading.Thread(target=account, args=(a,)) for a in sorted(plan.working | {g.source for g in plan.groups})]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    errors = {a: r for a, r in results.items() if isinstance(r, BaseException)}
    if errors:
        raise AssertionError({a: str(e)[:200] for a, e in errors.items()})
    new = dict(params)
    for a, opt in optimizers.items():
        new.update(opt.step(owned[a], results[a].grads))
    assert not net.box, f"sent but never taken: {sorted(net.box)}"
    reports = [a for a, r in results.items()  # the losses of those who report theirs to no one
               if r.loss is not None and not any(e.op == "send" and e.kind == "wgrad" for e in exchanges(plan, a))]
    return sum(results[a].loss for a in reports), new


def _names(spec, units):
    return {k for u in units for k in spec.param_shapes(u, u)}


def three_tier(sched: Schedule, batch: int) -> P.Plan:
    return P.from_schedule(sched, units=U, batch=batch)


PLANS = {
    "o/s/l": lambda: three_tier(Schedule({"o": "cloud", "s": "edge", "l": "device"}, m_s=2, m_l=4, b_o=4, b_s=3,
                                         b_l=5), 12),
    "chain": lambda: P.Plan(U, (P.Group("chain", "device", 12, (P.Stage("device", 1, 2), P.Stage("edge", 3, 5),
                                                                P.Stage("cloud", 6, 7))),),
                            ("device",) * 2 + ("edge",) * 3 + ("cloud",) * 2),
    "fleet": lambda: Round(0, 0, 1, U, (Member("pi0", 3, 0, 0, 0), Member("pi1", 4, 0, 2, 2), Member("pi2", 2, 0, 0, 2),
                                        Member("pi3", 5, 0, 1, 4), Member("pi4", 3, 0, U, U),
                                        Member("pi5", 2, 0, 0, U))).plan(),
}


@pytest.mark.parametrize("name", sorted(PLANS))
def test_every_account_interpreting_its_exchanges_makes_the_reference_step(runtime, name):
    spec = models.get("lenet5")
    plan = PLANS[name]()
    ds = data.synthetic(spec.input_shape, spec.classes, n=plan.batch, seed=3)
    x, y = ds.take_raw(np.arange(plan.batch))
    sgd = OptimizerConfig(kind="sgd", lr=0.1)
    ref = InProcessPlan(spec, optimizer=sgd, runtime=runtime, seed=1)
    params = dict(ref.params)
    want = ref.step(plan, x, y)
    for seed in range(2):  # two arrival orders: the same sums
        owners = {a: Optimizer(sgd, {k: v for k, v in spec.param_shapes().items() if k in _names(spec, plan.owned(a))})
                  for a in set(plan.owners)}
        loss, got = run_accounts(plan, spec, runtime, params, owners, x, y, seed=seed)
        assert loss == pytest.approx(want, rel=1e-6)
        for k in ref.params:
            np.testing.assert_allclose(got[k], ref.params[k], rtol=1e-6, atol=1e-7, err_msg=k)


@pytest.mark.parametrize("tensors,why", [
    (lambda x, y: {"x": x}, "pi2 sent 0 rows of labels for the 4 samples"),
    (lambda x, y: {"x": x, "y": y[:3]}, "pi2 sent 3 rows of labels for the 4 samples"),
    (lambda x, y: {"y": y}, "pi2 sent 0 rows of samples for the 4 samples"),
    (lambda x, y: {"x": x[:3], "y": y}, "pi2 sent 3 rows of samples for the 4 samples")])
def test_rows_and_labels_that_disagree_with_the_plan_are_the_senders_protocol_error(runtime, tensors, why):
    """Labels ride with a fleet member's rows; one missing or miscounted is that member's fault (the
    edge redoes the round without it)."""
    spec = models.get("lenet5")
    plan = Round(0, 0, 1, U, (Member("pi2", 4, 0, 0, U),)).plan()
    x, y = np.zeros((4, 1, 28, 28), np.uint8), np.arange(4, dtype=np.int64)
    net = Network(0)
    net.io("pi2").send(exchanges(plan, "pi2")[0], tensors(x, y))
    with pytest.raises(ProtocolError, match=why) as caught:
        interpreter.step(plan, "edge", exchanges(plan, "edge"), Part(spec, runtime), {}, net.io("edge"))
    assert caught.value.sender == "pi2"
