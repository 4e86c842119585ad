"""What the fleet's services share: a connection under their account, the segments, sends and waits.

The coordinator (``edge/coordinator.py``) drives; the workers (``device/worker.py``,
``cloud/worker.py``) wait for a round's weights, run their part of its plan (:func:`run_step`)
and wait again. A worker gives a round up as soon as the coordinator starts a newer one (a member
left and the step is redone without it), so nobody waits out a timeout for a message that will
never come.

Every message names the coordinator's *run* (one per coordinator process): the coordinator accepts
only replies of its own run, a worker follows the run of the rounds it gets. A coordinator lost
(its Last Will) or back as a new process (restarted with ``--resume``, or a standby's) does not end
the workers: they drop what they held of the old run and follow the new one from its first round.
A coordinator that *failed* (its status says why) ends them, naming its error.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from hiertrain import interpreter
from hiertrain.meters import EnergyConfig
from hiertrain.exchanges import Exchange, exchanges
from hiertrain.net import topics
from hiertrain.train import checkpoint, models
from hiertrain.errors import HiertrainError, MissingMessage, ProtocolError, TierLost
from hiertrain.train.fleetroles import Round
from hiertrain.train.part import Part
from hiertrain.tierconfig import TierConfig
from hiertrain.service import check_finite, keeper_for, open_service, tier_of, transport_figures
from hiertrain.net.wire import Message


log = logging.getLogger("hiertrain.fleet")
POLL_S = 0.2


class Abandoned(HiertrainError):
    """The coordinator started a newer round: this one will not complete."""


class FleetService:
    def __init__(self, cfg: TierConfig, *, account: str, peers: Optional[frozenset[str]]) -> None:
        self.cfg, self.account = cfg, account
        self.spec = models.get(cfg.model)
        self.units = self.spec.n_units
        self.transport, self.supply, self.runtime = open_service(cfg, self.spec, account=account, peers=peers)
        self.transport.subscribe(topics.all_of_kind(cfg.job, "status"))
        self.part = Part(self.spec, self.runtime)
        self.keeper = keeper_for(cfg, self.transport, self.spec)
        held = checkpoint.iterations(cfg.checkpoint_dir) if cfg.checkpoint_collect else []
        if held:  # a restarted collector still holds the coordinator's checkpoints (a standby resumes from them)
            self.transport.status_extra["checkpoint_iteration"] = held[-1]
        self.run_id: Optional[str] = None  # the coordinator's run: its own (the edge), or the one followed
        self.energy = cfg.energy or EnergyConfig()
        self.meter = self.energy.meter()  # a worker's joules per step, in its telemetry
        self.stats = interpreter.Stats()  # this round's compute phases (its busy seconds)
        self.since: Optional[float] = None  # when its previous round ended: a step's joules include the wait

    @contextmanager
    def connected(self) -> Iterator[None]:
        """Connected under our account, building segments for others or fetching ours."""
        with self.transport, self.supply.serving(self.spec, self.runtime.root):
            self.keeper.start()
            try:
                yield
            finally:
                self.keeper.stop()

    def send(self, kind: str, dest: str, rnd: int, layer: int, tensors: dict[str, np.ndarray], **meta: Any) -> None:
        check_finite(self.account, f"in round {rnd}", kind, dest, tensors, self.cfg.optimizer.lr)
        if self.run_id is not None:
            meta = {"run": self.run_id, **meta}
        self.transport.send(Message(kind, self.cfg.job, self.account, dest, rnd, layer, tensors, 0, meta))

    # ---------------------------------------------------------------- workers

    def newer_round(self, rnd: int) -> bool:
        return any(k[0] == "weights" and k[1] > rnd and k[3] == "edge" for k in self.transport.mailbox.pending())

    def take(self, kind: str, sender: str, rnd: int, layer: int) -> Message:
        """A worker's wait: the message, or :class:`Abandoned` once the coordinator moved on. The
        coordinator gives a round up after ``timeout_s`` of silence: a worker waits longer."""
        deadline = time.monotonic() + 3 * self.cfg.timeout_s
        while True:
            try:
                return self.transport.take(kind, sender, rnd, layer, timeout=POLL_S)
            except MissingMessage:
                if self.newer_round(rnd):
                    raise Abandoned(f"round {rnd} was given up for a newer one") from None
                if time.monotonic() > deadline:
                    raise MissingMessage(kind=kind, sender=sender, iteration=rnd, layer=layer,
                                         timeout=3 * self.cfg.timeout_s) from None

    def serve(self, hello: str) -> int:
        """A worker's life: wait for each round, do its part (:meth:`work`), until the edge ends the run.
        A round given up for a newer one is left for the next, and so is one the edge sent that breaks
        the protocol (named in the log). Divergence ends the run, naming this worker and the value."""
        with self.connected():
            self.announce()
            print(f"{self.account}: {hello}, waiting for the edge's rounds", flush=True)
            done = -1
            try:
                while True:
                    try:
                        got = self.next_round(done)
                    except TierLost as lost:
                        done = self._edge_lost(lost)
                        continue
                    if got is None:
                        print(f"{self.account}: the edge ended the run after round {done}", flush=True)
                        return 0
                    rnd, msg = got
                    if self.since is None:
                        self.since = time.perf_counter()
                    try:
                        self.work(rnd, msg)
                        self.report(rnd)
                    except TierLost as lost:
                        done = self._edge_lost(lost)
                        continue
                    except Abandoned as exc:
                        print(f"{self.account}: {exc}", flush=True)
                    except ProtocolError as exc:
                        log.warning("%s: refused round %d: %s", self.account, rnd.round, exc)
                    done = rnd.round
                    self.after_round()
            except HiertrainError as exc:
                self.transport.status_extra["error"] = str(exc)  # the status on the way out says why
                raise

    def report(self, rnd: Round) -> None:
        """After its part of a round, the worker's telemetry: the step, its plan, its links and refusals,
        and its joules since its previous round ended (:class:`hiertrain.meters.Meter`: its own reader,
        or its power model over those seconds, the seconds it computed and the bytes it moved)."""
        now = time.perf_counter()
        seconds, self.since = now - (self.since or now), now
        busy, self.stats = sum(self.stats.phases.values()), interpreter.Stats()
        energy = self.meter.step(seconds, busy, self.transport.sent_bytes, self.transport.received_bytes)
        budgets = self.energy.budgets_now() if tier_of(self.account) == "device" else {}
        self.transport.publish_json(topics.telemetry(self.cfg.job, self.account), {
            "iteration": rnd.step, "round": rnd.round, "schedule_version": rnd.version,
            "role": f"{tier_of(self.account)} worker", "iteration_s": seconds, "busy_s": busy, "energy": energy,
            **budgets, **transport_figures(self.transport, self.account)})

    def announce(self) -> None:
        """Once connected, a worker publishes its profile (retained), if it has one to give."""
        profile = self.published_profile()
        if profile is not None:
            self.transport.publish_json(topics.profile(self.cfg.job, self.account), profile, retain=True)

    def published_profile(self) -> Optional[dict[str, Any]]:
        """What :meth:`announce` publishes: nothing, unless a worker says otherwise."""
        return None

    def work(self, rnd: Round, msg: Message) -> None:
        """Its part of round ``rnd``, which came with ``msg`` (the weights the edge sent it)."""
        raise NotImplementedError

    def after_round(self) -> None:
        """What a worker does between rounds: nothing, unless it says otherwise."""

    def _edge_lost(self, lost: TierLost) -> int:
        """The coordinator went away mid-run, or is back as a new process: drop the old run and wait
        for the edge's next one (returns the round to follow from). A coordinator that failed ends
        this worker too, with its reason."""
        if lost.tier != "edge" or lost.state == "failed":
            why = self.transport.errors.get(lost.tier)
            raise TierLost(tier=lost.tier, state=f"{lost.state}{f' ({why})' if why else ''}",
                           waiting_for="the next round") from None
        print(f"{self.account}: the edge is {lost.state}; waiting for its next run", flush=True)
        self.transport.renew_mailbox(retire=self.run_id or "")
        self.run_id = None
        while "edge" not in self.transport.online():
            time.sleep(POLL_S)
        return -1

    def next_round(self, after: int) -> Optional[tuple[Round, Message]]:
        """Wait for the coordinator's next round after ``after``: (round, the weights message), or
        ``None`` when it says the run is over. Waits as long as the edge is online (an idle device)."""
        box = self.transport.mailbox
        while True:
            try:
                r = box.first("weights", "edge", timeout=self.cfg.timeout_s)
            except MissingMessage:
                continue  # not planned in (yet): the edge is online, keep waiting
            msg = box.take("weights", "edge", r, self._layer_of(r), timeout=1.0)
            run = msg.meta.get("run")
            if isinstance(run, str) and run != self.run_id:  # the first round of a coordinator's run
                self.run_id = run
                box.follow(run)
            self.transport.advance(r)
            if r <= after:
                continue
            if msg.meta.get("stop"):
                return None
            try:
                return Round.from_meta(msg.meta), msg
            except ProtocolError as exc:
                log.warning("%s: ignored round %d from the edge: %s", self.account, r, exc)

    def _layer_of(self, rnd: int) -> int:
        return next(k[2] for k in self.transport.mailbox.pending() if k[:2] == ("weights", rnd) and k[3] == "edge")


def run_step(worker: FleetService, rnd: Round, params: dict[str, np.ndarray], **kw: Any) -> interpreter.Outcome:
    """A worker's part of round ``rnd``'s plan (:func:`hiertrain.interpreter.step`), with the weights the
    round came with (or its own copy); its waits give the round up once the coordinator moves on
    (:meth:`FleetService.take`). Returns the gradients of a copy it keeps."""
    r, plan = rnd.round, rnd.plan()

    class _Io:
        def take(self, x: Exchange) -> Message:
            return worker.take(x.kind, x.peer, r, x.layer)

        def first(self, xs: Sequence[Exchange]) -> Exchange:
            keys = [x.key(r) for x in xs]
            deadline = time.monotonic() + 3 * worker.cfg.timeout_s
            while time.monotonic() < deadline:
                key = worker.transport.mailbox.wait_any(keys, POLL_S)
                if key is not None:
                    return xs[keys.index(key)]
                if worker.newer_round(r):
                    raise Abandoned(f"round {r} was given up for a newer one")
            return xs[0]  # (its take says what is missing)

        def send(self, x: Exchange, tensors: dict[str, np.ndarray], **meta: Any) -> None:
            worker.send(x.kind, x.peer, r, x.layer, tensors, **meta)

    return interpreter.step(plan, worker.account, exchanges(plan, worker.account), worker.part, {}, _Io(), replicas=params,
                     at=f"round {r}", lr=worker.cfg.optimizer.lr, stats=worker.stats,
                     describe=lambda names: ", ".join(f"{n}'s samples" for n in names), **kw)
