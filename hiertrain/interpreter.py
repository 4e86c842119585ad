"""One account's part of one step of any plan: the interpreter every service runs (issue 23).

:func:`step` runs what an account computes and exchanges in one step of a :class:`~hiertrain.plan.Plan`,
from its exchanges (:func:`hiertrain.exchanges.exchanges`) and a way to send and take them
(:class:`Io`). The three-tier tiers (:mod:`hiertrain.tier`) and a fleet's edge, devices and cloud
(``edge/coordinator.py``, ``device/worker.py``, ``cloud/worker.py``) all run it; what stays theirs is
the clock (who sends the samples and starts a step) and what they do with the outcome (an owner's
optimizer step, checkpoints, telemetry).

- **Batches.** Groups whose rows reach the account in one message and go on the same way (a fleet's
  members cut at the same unit, at the cloud) run as one batch; every other group runs on its own,
  as the in-process reference runs them (:mod:`hiertrain.train.reference`).
- **Forward**, batch by batch as their input arrives (rows already here first): the account's units
  of the batch (none where it only passes the rows on), then the loss where it is the groups' loss
  account (the mean over the rows weighted by rows / B; the gradient at its input goes back at once),
  else the activations on (8-bit for JALAD). A message several groups share leaves once every group
  in it is computed.
- **Backward**, gradients as they arrive: the account's units backward, the gradient at their input
  back, and the parameter gradients to the units' owner (with the losses the account computed).
- **An owner** takes the others' parameter gradients; its caller steps the optimizer.

Labels come from the clock where the plan's driver holds the data (the three-tier device sends them
with the samples); in a fleet, whose driver holds none, they ride with the rows they belong to.
Whatever order messages arrive in, the sums are in one order: the account's losses in plan order,
then its backward passes in plan order, then the gradients it takes, in exchange order.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Protocol, Sequence

import numpy as np

from hiertrain.errors import Diverged, ProtocolError, SegmentError
from hiertrain.exchanges import Exchange, select
from hiertrain.net.compress import dequantize, quantize
from hiertrain.net.wire import Message
from hiertrain.plan import Group, Plan
from hiertrain.train.data import normalize
from hiertrain.train.part import Params, Part, add_into, rows


class Io(Protocol):
    """How an account's exchanges travel in one step (over MQTT, or anything else)."""

    def take(self, x: Exchange) -> Message: ...
    def first(self, xs: Sequence[Exchange]) -> Exchange: ...  # the one whose message is here first (waits)
    def send(self, x: Exchange, tensors: Params, **meta: Any) -> None: ...


@dataclass
class Stats:
    """One step's telemetry: phase times and the time spent waiting."""

    wait_s: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)
    compute_cpu_s: float = 0.0  # CPU seconds of this thread inside the phases (the rest is framework)
    cpu0: float = field(default_factory=time.process_time)

    @staticmethod
    def mark() -> tuple[float, float]:
        return time.perf_counter(), time.thread_time()

    def timed(self, phase: str, t0: tuple[float, float]) -> None:
        self.phases[phase] = self.phases.get(phase, 0.0) + time.perf_counter() - t0[0]
        self.compute_cpu_s += time.thread_time() - t0[1]

    def cpu_s(self) -> float:
        """CPU seconds of the whole process (every thread) since the step began."""
        return time.process_time() - self.cpu0


@dataclass
class Outcome:
    loss: Optional[float]  # the losses computed here and reported with the gradients taken; None: none
    grads: Params          # the parameter gradients of the units this account owns, summed


@dataclass
class _Batch:
    groups: tuple[Group, ...]     # in plan order
    first: int                    # units first..last here (last < first: the rows only pass through)
    last: int
    loss: bool                    # the groups' loss is computed here
    entry: Optional[Exchange]     # the message their rows come in; None: they are here (the clock's)
    order: int = 0                # the first group's place in the plan
    stash: Any = None
    grads: Optional[Params] = None
    loss_value: float = 0.0

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(g.name for g in self.groups)


def _batches(plan: Plan, account: str, xs: Sequence[Exchange], local: Mapping[str, Any]) -> list[_Batch]:
    """What ``account`` computes in a step, as batches (see the module's docstring)."""
    entries = {g: x for x in xs if x.op == "take" and x.kind in ("samples", "act") for g in x.groups}
    order = {g.name: j for j, g in enumerate(plan.groups)}
    out: dict[tuple[Any, ...], _Batch] = {}
    for g in plan.groups:
        st, entry = g.stage_of(account), None if g.name in local else entries.get(g.name)
        if st is not None:
            first, last = st.first, st.last
        elif g.loss == account:
            first, last = plan.units + 1, plan.units  # the loss alone, on another's output
        elif entry is not None:
            first, last = entry.layer + 1, entry.layer  # passed on (a fleet's edge between device and cloud)
        else:
            continue
        loss = g.loss == account and last == plan.units
        key = (entry, first, last, loss) if entry is not None else (g.name,)
        if key in out:
            out[key].groups += (g,)
        else:
            out[key] = _Batch((g,), first, last, loss, entry, order[g.name])
    return list(out.values())


def _owner_of(plan: Plan, account: str, b: _Batch) -> Optional[str]:
    """Who owns the units of batch ``b`` (None: it has none)."""
    if account in plan.keeps:
        return account  # its own copy: it steps it itself
    owners = {plan.owners[u - 1] for u in range(b.first, b.last + 1)}
    if len(owners) > 1:
        raise ValueError(f"{account}: units {b.first}..{b.last} have several owners ({sorted(owners)}); "
                         f"a stage trains units of one owner")
    return owners.pop() if owners else None


def _slices(plan: Plan, x: Exchange) -> dict[str, slice]:
    """Each group's rows in a message that carries several (in the exchange's group order)."""
    sizes = {g.name: g.samples for g in plan.groups}
    out, start = {}, 0
    for name in x.groups:
        out[name] = slice(start, start + sizes[name])
        start += sizes[name]
    return out


def step(plan: Plan, account: str, xs: Sequence[Exchange], part: Part, params: Params, io: Io, *,
         replicas: Optional[Params] = None, local: Mapping[str, Optional[np.ndarray]] = {},
         labels: Optional[Callable[[Group], np.ndarray]] = None, stats: Optional[Stats] = None,
         at: str = "this step", lr: Optional[float] = None,
         describe: Callable[[Sequence[str]], str] = lambda names: "group " + ", ".join(names)) -> Outcome:
    """``account``'s part of one step of ``plan`` (its exchanges ``xs``), computed with ``params`` (the
    units it owns) and ``replicas`` (those it trains for their owner; ``None``: taken from the owner's
    weights messages). ``local``: rows already here, per group (the clock's samples); ``labels``: a
    group's labels where they do not ride with its rows. ``at`` and ``describe`` name the step and the
    groups in errors. Rows that do not match the plan are a :class:`ProtocolError` naming the sender
    (its ``sender``); a loss that is not finite is :class:`Diverged`."""
    stats = stats or Stats()
    B = plan.batch
    ride = lambda g: plan.driver != g.source  # noqa: E731 - labels travel with the rows
    if replicas is None:
        replicas = {}
        for x in {x for x in xs if x.op == "take" and x.kind == "weights"}:
            replicas.update(io.take(x).tensors)
    P = {**params, **replicas}
    batches = _batches(plan, account, xs, local)
    sends = {kind: select(tuple(xs), "send", kind) for kind in ("act", "samples", "grad", "wgrad")}
    buffers: dict[Exchange, dict[str, Any]] = {}

    def send(x: Exchange, name: str, value: Any) -> None:
        """``value`` for group ``name`` into the message ``x``; it leaves once every group it carries is in."""
        buf = buffers.setdefault(x, {})
        buf[name] = value
        if len(buf) < len(x.groups):
            return
        if x.kind == "wgrad":
            grads: Params = {}
            done = sorted({id(b): b for b in buf.values()}.values(), key=lambda b: (not b.loss, b.order))
            for b in done:
                add_into(grads, {} if account in plan.keeps else b.grads or {})  # (a kept copy: the loss alone)
            meta = {"loss": sum(b.loss_value for b in done)} if any(b.loss for b in done) else {}
            io.send(x, grads, **meta)
            return
        parts = [buf[name] for name in x.groups]
        if x.kind == "grad":
            io.send(x, {"x": rows(parts)})
            return
        hs = [h for h, _ in parts]
        if x.kind == "samples" and len({h.dtype for h in hs}) > 1:  # raw samples of several kinds: as the model's input
            hs = [normalize(h) for h in hs]
        h, tensors, meta = rows(hs), {}, {}
        if x.kind == "act" and plan.compress_bits:
            tensors["q"], meta["lo"], meta["scale"] = quantize(h)
        else:
            tensors["x"] = h
        if all(y is not None for _, y in parts):
            tensors["y"] = rows(y for _, y in parts)
        io.send(x, tensors, **meta)

    def split(b: _Batch, kind: str, value: Optional[np.ndarray], y: Optional[np.ndarray] = None) -> None:
        """Batch ``b``'s rows of ``value`` (and labels) into each group's ``kind`` message, if it has one."""
        start = 0
        for g in b.groups:
            x = sends[kind].get(g.name) or (sends["samples"].get(g.name) if kind == "act" else None)
            part_y = y[start:start + g.samples] if y is not None and ride(g) else None
            if x is not None and value is not None:
                send(x, g.name, value[start:start + g.samples] if kind == "grad" else
                     (value[start:start + g.samples], part_y))
            start += g.samples

    def settle(b: _Batch) -> None:
        """Batch ``b``'s parameter gradients to the owner of its units (or kept, if that is us)."""
        owner = _owner_of(plan, account, b)
        if account in plan.keeps:  # its own copy: its loss, if it computed one, to the units' owner
            for g in b.groups:
                if b.loss and g.name in sends["wgrad"]:
                    send(sends["wgrad"][g.name], g.name, b)
        elif owner is not None and owner != account:
            for g in b.groups:
                x = sends["wgrad"].get(g.name)
                if x is None or x.peer != owner:
                    raise ProtocolError(f"{account}: the plan has no gradients go to {owner} for group {g.name}")
                send(x, g.name, b)

    def compute(b: _Batch, fn: Callable[[], Any], phase: str) -> Any:
        t0 = stats.mark()
        try:
            return fn()
        except SegmentError as exc:
            raise SegmentError(f"{account}: {at}, training {describe(b.names)}: {exc}") from None
        finally:
            stats.timed(phase, t0)

    def forward(b: _Batch, h: Optional[np.ndarray], y: Optional[np.ndarray], sender: str) -> None:
        n = sum(g.samples for g in b.groups)
        if h is None or len(h) != n:
            raise ProtocolError(f"{account}: got {0 if h is None else len(h)} rows of {describe(b.names)} at unit "
                                f"{b.first} at {at}, the plan says {n}", sender=sender)
        if not b.loss:
            out, b.stash = compute(b, lambda: part.forward(P, b.first, b.last, h), "forward")
            split(b, "act", out, y)
            return
        if y is None:
            assert labels is not None, "labels that do not ride with the rows come from the clock"
            y = rows(labels(g) for g in b.groups)
        w = n / B
        value, g_in, b.grads = compute(b, lambda: part.loss(P, b.first, h, y, w), "forward_backward")
        if not math.isfinite(value):
            raise Diverged(f"{account}: training diverged at {at}: the loss of {describe(b.names)} is {value}"
                           + (f"; lower the learning rate (now {lr}) or check that data" if lr is not None else ""))
        b.loss_value = w * value
        split(b, "grad", g_in)
        settle(b)

    # forward: the rows here first, then each message as it arrives
    for b in batches:
        if b.entry is None:
            g = b.groups[0]
            forward(b, local.get(g.name), rows([labels(g)]) if ride(g) and labels is not None else None, account)
    first_of = {g.name: j for j, g in enumerate(plan.groups)}
    for x in _as_they_arrive(io, sorted({b.entry for b in batches if b.entry is not None},
                                        key=lambda x: first_of[x.groups[0]])):
        h = _rows_in(x, io.take(x), plan, at, describe, ride=any(ride(g) for g in plan.groups if g.name in x.groups))
        where = _slices(plan, x)
        for b in (b for b in batches if b.entry == x):
            sl = [where[g.name] for g in b.groups]
            forward(b, rows(h[0][s] for s in sl), None if h[1] is None else rows(h[1][s] for s in sl), x.peer)
    # backward: each gradient as it arrives
    takes = select(tuple(xs), "take", "grad")
    got: dict[str, np.ndarray] = {}
    for x in _as_they_arrive(io, sorted({takes[g.name] for b in batches if not b.loss for g in b.groups
                                         if g.name in takes}, key=lambda x: first_of[x.groups[0]])):
        g_all, where = io.take(x).tensors.get("x"), _slices(plan, x)
        n = sum(s.stop - s.start for s in where.values())
        if g_all is None or len(g_all) != n:
            raise ProtocolError(f"{x.peer} sent {0 if g_all is None else len(g_all)} rows of gradient for the {n} "
                                f"samples of {describe(x.groups)} at {at}", sender=x.peer)
        for name, s in where.items():
            got[name] = g_all[s]
        for b in batches:
            if b.loss or b.grads is not None or any(g.name not in got for g in b.groups):
                continue
            g_out = rows(got[g.name] for g in b.groups)
            g_in, b.grads = compute(b, lambda: part.backward(P, b.first, b.last, b.stash, g_out), "backward")
            split(b, "grad", g_in)
            settle(b)
    # the owner: its own gradients, then the others'
    grads: Params = {}
    mine = [b for b in batches if b.grads is not None and _owner_of(plan, account, b) in (account, None)]
    for b in sorted(mine, key=lambda b: (not b.loss, b.order)):
        add_into(grads, b.grads or {})
    losses = [b.loss_value for b in sorted(batches, key=lambda b: b.order) if b.loss]
    taken = list(dict.fromkeys(x for x in xs if x.op == "take" and x.kind == "wgrad"))
    msgs = {x: io.take(x) for x in _as_they_arrive(io, taken)}  # summed below in exchange order
    for x in taken:
        add_into(grads, msgs[x].tensors)
        if "loss" in msgs[x].meta:
            value = float(msgs[x].meta["loss"]) if isinstance(msgs[x].meta["loss"], (int, float)) else math.nan
            if not math.isfinite(value):
                raise Diverged(f"{account}: training diverged at {at}: the loss {x.peer} computed on "
                               f"{describe(x.groups)} is {value}"
                               + (f"; lower the learning rate (now {lr})" if lr is not None else ""))
            losses.append(value)
    return Outcome(sum(losses) if losses else None, grads)


def _as_they_arrive(io: Io, xs: Sequence[Exchange]) -> Any:
    """``xs``, each as its message is here (the one left last without waiting for it to be first)."""
    waiting = list(xs)
    while waiting:
        x = io.first(waiting) if len(waiting) > 1 else waiting[0]
        waiting.remove(x)
        yield x


def _rows_in(x: Exchange, msg: Message, plan: Plan, at: str, describe: Callable[[Sequence[str]], str], *,
             ride: bool) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """The rows (and their labels, where they ride) a samples or act message carries, one per sample of
    the groups it carries (float32, or 8-bit for JALAD): anything else is the sender's :class:`ProtocolError`."""
    n, t = sum(g.samples for g in plan.groups if g.name in x.groups), msg.tensors
    h = dequantize(t["q"], msg.meta["lo"], msg.meta["scale"]) if "q" in t and "lo" in msg.meta else t.get("x")
    what = "samples" if x.kind == "samples" else "activations"
    for got, name in ((h, what), (t.get("y") if ride else h, "labels")):
        if got is None or len(got) != n:
            raise ProtocolError(f"{x.peer} sent {0 if got is None else len(got)} rows of {name} for the {n} samples "
                                f"of {describe(x.groups)} at {at}", sender=x.peer)
    return h, t.get("y") if ride else None


def send_weights(plan: Plan, xs: Sequence[Exchange], part: Part, params: Params, send: Callable[..., None]) -> None:
    """An owner's weights to each account that trains units it owns (its replicas, before the step)."""
    for x in dict.fromkeys(x for x in xs if x.op == "send" and x.kind == "weights"):
        units = plan.replicas(x.peer)
        send(x, part.weights(params, min(units), max(units)))
