"""The exchanges of one step: a pure function from a plan and an account to the messages it sends
and takes, keyed as they travel (kind, peer, layer).

Along each sample group's chain of stages (:mod:`hiertrain.plan`):

- a stage that trains units it does not own takes their **weights** from their owner before the
  step (keyed by the stage's last unit) and sends their parameter gradients back (**wgrad**);
- the activations at a stage's end go to the next stage (**act**, keyed by the stage's last unit)
  and their gradient comes back (**grad**); the last stage's output goes to the group's loss
  account when that is another (keyed by the last unit, U).

A step does them in four phases (weights, act, grad, wgrad), each in group order. This is the
three-tier runtime's protocol (:mod:`hiertrain.tier`: HierTrain's O/S/L groups, a layer chain; the
samples are the clock's, :mod:`hiertrain.clock`). A fleet's messages all pass through its edge, which
relays and batches them (:mod:`hiertrain.edge.coordinator`).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

from hiertrain.errors import PlanError
from hiertrain.plan import Plan

PHASES = ("weights", "act", "grad", "wgrad")


class Exchange(NamedTuple):
    op: str      # "send" or "take"
    kind: str    # one of PHASES
    peer: str
    layer: int
    group: str   # the sample group it belongs to


def _messages(plan: Plan) -> list[tuple[str, str, str, int, str]]:
    """Every message of a step: (kind, sender, receiver, layer, group)."""
    out = []
    for g in plan.groups:
        for j, st in enumerate(g.stages):
            owners = sorted({plan.owners[u - 1] for u in st.units} - {st.tier})
            for owner in owners:
                out += [("weights", owner, st.tier, st.last, g.name), ("wgrad", st.tier, owner, st.last, g.name)]
            if j:
                prev = g.stages[j - 1].tier
                out += [("act", prev, st.tier, st.first - 1, g.name), ("grad", st.tier, prev, st.first - 1, g.name)]
        last = g.stages[-1].tier
        if g.loss != last:
            out += [("act", last, g.loss, plan.units, g.name), ("grad", g.loss, last, plan.units, g.name)]
    return out


def exchanges(plan: Plan, account: str) -> tuple[Exchange, ...]:
    """What ``account`` sends and takes in one step of ``plan``, phase by phase, in group order."""
    mine = []
    for kind, sender, receiver, layer, group in _messages(plan):
        if sender == receiver:
            continue
        if sender == account:
            mine.append(Exchange("send", kind, receiver, layer, group))
        elif receiver == account:
            mine.append(Exchange("take", kind, sender, layer, group))
    return tuple(sorted(mine, key=lambda x: PHASES.index(x.kind)))  # stable: group order within a phase


def select(xs: tuple[Exchange, ...], op: str, kind: str) -> dict[str, Exchange]:
    """The exchanges of one op and kind, by group."""
    return {x.group: x for x in xs if x.op == op and x.kind == kind}


def one(xs: tuple[Exchange, ...], op: str, kind: str) -> Optional[Exchange]:
    """The exchange of one op and kind where a step has at most one (a slice's, a chain stage's)."""
    found = [x for x in xs if x.op == op and x.kind == kind]
    if len(found) > 1:
        raise PlanError(f"{len(found)} exchanges ({op} {kind}) where one was expected: {found}")
    return found[0] if found else None


def need(xs: tuple[Exchange, ...], op: str, kind: str) -> Exchange:
    """:func:`one`, where the step cannot do without it."""
    x = one(xs, op, kind)
    if x is None:
        raise PlanError(f"the plan gives this step no {kind} to {op} (it has: {[(x.op, x.kind) for x in xs]})")
    return x
