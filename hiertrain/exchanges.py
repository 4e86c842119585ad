"""The exchanges of one step: a pure function from a plan and an account to the messages it sends
and takes, keyed as they travel (kind, peer, layer).

Along each sample group's chain of stages (:mod:`hiertrain.plan`):

- the group's **samples** go from its data source to its first stage, when that is another account
  (keyed by layer 0);
- a stage that trains units it does not own takes their **weights** from their owner before the
  step (keyed by the stage's last unit) and sends their parameter gradients back (**wgrad**), unless
  its account keeps its own copy (:attr:`hiertrain.plan.Plan.keeps`): then a wgrad without tensors
  carries the loss it computed, if it computes one;
- the activations at a stage's end go to the next stage (**act**, keyed by the stage's last unit)
  and their gradient comes back (**grad**); the last stage's output goes to the group's loss
  account when that is another (keyed by the last unit, U).

In a plan whose driver holds no samples (a fleet's edge) every message passes through the driver
(:meth:`hiertrain.plan.Plan.arrives_from`): a device's activations for the cloud go to the edge,
which sends them on. Messages of several groups with the same key are one message, their rows in
group order (a fleet's members cut at the same unit reach the cloud together; the cloud's weights
and parameter gradients are one message each).

A step does them in five phases (samples, weights, act, grad, wgrad), each in group order. Every
service runs them with :func:`hiertrain.interpreter.step` (the samples are the clock's to send: the
three-tier device's, :mod:`hiertrain.clock`; a fleet device's own).
"""

from __future__ import annotations

from typing import NamedTuple

from hiertrain.plan import Plan

PHASES = ("samples", "weights", "act", "grad", "wgrad")


class Exchange(NamedTuple):
    op: str                  # "send" or "take"
    kind: str                # one of PHASES
    peer: str
    layer: int
    groups: tuple[str, ...]  # the sample groups whose rows (or units) it carries, in plan order

    def key(self, step: int) -> tuple[str, int, int, str]:
        """The mailbox's key of this exchange's message in ``step`` (kind, step, layer, sender)."""
        return self.kind, step, self.layer, self.peer


def _messages(plan: Plan) -> list[tuple[str, str, str, int, str]]:
    """Every message of a step: (kind, sender, receiver, layer, group), relayed where the plan says."""
    out = []
    for g in plan.groups:
        if g.source != g.stages[0].tier:
            out.append(("samples", g.source, g.stages[0].tier, 0, g.name))
        for j, st in enumerate(g.stages):
            owners = sorted({plan.owners[u - 1] for u in st.units} - {st.tier})
            if st.tier in plan.keeps:  # its own copy: only the loss it computes goes to the owner (an empty wgrad)
                out += [("wgrad", st.tier, o, st.last, g.name) for o in owners if g.loss == st.tier == g.stages[-1].tier]
                owners = []
            for owner in owners:
                out += [("weights", owner, st.tier, st.last, g.name), ("wgrad", st.tier, owner, st.last, g.name)]
            if j:
                prev = g.stages[j - 1].tier
                out += [("act", prev, st.tier, st.first - 1, g.name), ("grad", st.tier, prev, st.first - 1, g.name)]
        last = g.stages[-1].tier
        if g.loss != last:
            out += [("act", last, g.loss, plan.units, g.name), ("grad", g.loss, last, plan.units, g.name)]
    relayed = []
    for kind, sender, receiver, layer, group in out:
        hop = plan.arrives_from(sender, receiver)
        relayed += [(kind, sender, hop, layer, group), (kind, hop, receiver, layer, group)] if hop != sender \
            else [(kind, sender, receiver, layer, group)]
    return relayed


def exchanges(plan: Plan, account: str) -> tuple[Exchange, ...]:
    """What ``account`` sends and takes in one step of ``plan``, phase by phase, in group order; the
    same key in several groups is one exchange carrying them all."""
    mine: dict[tuple[str, str, str, int], list[str]] = {}
    for kind, sender, receiver, layer, group in _messages(plan):
        if sender == receiver or account not in (sender, receiver):
            continue
        key = ("send", kind, receiver, layer) if sender == account else ("take", kind, sender, layer)
        if group not in mine.setdefault(key, []):
            mine[key].append(group)
    xs = [Exchange(*key, tuple(groups)) for key, groups in mine.items()]
    return tuple(sorted(xs, key=lambda x: PHASES.index(x.kind)))  # stable: group order within a phase


def select(xs: tuple[Exchange, ...], op: str, kind: str) -> dict[str, Exchange]:
    """The exchanges of one op and kind, by each group they carry."""
    return {g: x for x in xs if x.op == op and x.kind == kind for g in x.groups}
