"""Checkpoints over MQTT: collected in one place, and fetched back for a resume.

Whichever tier plays worker_o writes every K-th iteration's state (weights and optimizer
moments, :mod:`hiertrain.train.checkpoint`) into its own ``[checkpoint] dir`` if it has one, and sends
it as a ``checkpoint`` message (``op: push``) to every online tier whose status says it collects
(``[checkpoint] collect = true``). The collector writes it into its directory, keeps the newest
``keep`` and announces the iteration in its status, so the checkpoints are in one place however
the planner moves the model between tiers.

On ``--resume`` the tier that owns the model at the first iteration needs the state of the
iteration before it. When its own directory does not hold that one, it asks the tier whose
status announced it (``op: request``), and that tier answers from its directory (``op: reply``).

A ``replica`` is the same state sent to the device for failover (:mod:`hiertrain.failover`): kept in
memory, never written, and handed to whoever asks for its iteration.

In a layer chain no tier holds the whole model: each stage pushes (and replicates) its own units,
and the collector writes (the device holds) an iteration's state once its parts cover the model.

Every tier runs a :class:`Keeper` thread. A push to a tier that does not collect, a request for
a checkpoint nobody has, a full disk: each is a logged warning on the tier that saw it, and
training goes on.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Optional

from hiertrain.train import checkpoint
from hiertrain.train.checkpoint import Checkpoint
from hiertrain.errors import ConfigError, HiertrainError, PlanError
from hiertrain.train.models import ModelSpec
from hiertrain.net.wire import Message

log = logging.getLogger("hiertrain.train.collect")
KIND = "checkpoint"
OPS = ("push", "replica", "request", "reply")


class Keeper:
    """A tier's checkpoint thread: stores pushed checkpoints (when this tier collects), answers
    requests from its directory, and hands replies to :meth:`fetch`."""

    def __init__(self, transport, spec: ModelSpec, directory: Optional[Path], *, keep: int, collect: bool,
                 on_stored: Callable[[int], None]) -> None:
        self.transport, self.spec, self.dir, self.keep, self.collect = transport, spec, directory, keep, collect
        self.on_stored = on_stored
        self.names = list(spec.param_shapes())
        self.replies: "queue.Queue[Message]" = queue.Queue()
        self.held: Optional[Checkpoint] = None  # the newest state held in memory for others (a replica)
        self._parts: dict[str, dict[int, Checkpoint]] = {"push": {}, "replica": {}}  # iteration -> parts so far
        self._lock = threading.Lock()
        self.stored = 0
        self._thread = threading.Thread(target=self._serve, name="hiertrain-checkpoints", daemon=True)

    def start(self) -> "Keeper":
        self._thread.start()
        return self

    def stop(self, timeout: float = 60.0) -> None:
        """Handle what has arrived (a last checkpoint being written), then end."""
        self.transport.service[KIND].put(None)
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _serve(self) -> None:
        q = self.transport.service[KIND]
        while (msg := q.get()) is not None:
            op = msg.meta.get("op")
            try:
                if op == "reply":
                    self.replies.put(msg)
                elif op == "push":
                    self._store(msg)
                elif op == "replica":
                    self.hold_part(Checkpoint.from_message(msg.tensors, dict(msg.meta)))
                elif op == "request":
                    self._answer(msg)
                else:
                    raise PlanError(f"unknown checkpoint op {op!r}")
            except HiertrainError as exc:  # one bad message (or a full disk) never stops training
                log.warning("%s: checkpoint %s from %s not handled: %s", self.transport.account, op, msg.sender, exc)

    def _store(self, msg: Message) -> None:
        if not self.collect or self.dir is None:
            raise PlanError("this tier does not collect checkpoints ([checkpoint] collect = true)")
        self.store_part(Checkpoint.from_message(msg.tensors, dict(msg.meta)), sender=msg.sender)

    def store_part(self, ck: Checkpoint, *, sender: str = "") -> None:
        """The collector: write a pushed checkpoint once the parts of its iteration (a chain's
        stages push their own units) cover the whole model."""
        whole = self._merge("push", ck)
        if whole is None:
            return
        ahead = checkpoint.set_aside(self.dir, after=whole.iteration)  # an earlier run's: never resumed from
        if ahead is not None:
            log.warning("%s: the checkpoint of iteration %d from %s is behind those held: they are another run's, "
                        "moved to %s", self.transport.account, whole.iteration, sender or "itself", ahead)
        path = checkpoint.save(self.dir, whole, keep=self.keep)
        self.stored += 1
        log.info("%s: collected the checkpoint of iteration %d from %s in %s", self.transport.account,
                 whole.iteration, sender or "itself", path)
        self.on_stored(whole.iteration)

    def _merge(self, purpose: str, ck: Checkpoint) -> Optional[Checkpoint]:
        """Add ``ck`` (the whole state or some units of it) to the parts of its iteration; return
        the whole state once they cover every parameter. Parts of older iterations are dropped."""
        unknown = sorted(set(ck.params) - set(self.names))
        if unknown:
            raise PlanError(f"state of iteration {ck.iteration} has unknown parameters {unknown[:3]}")
        with self._lock:
            parts = self._parts[purpose]
            part = parts.get(ck.iteration)
            part = parts[ck.iteration] = ck if part is None else replace(
                part, params={**part.params, **ck.params}, moments={**part.moments, **ck.moments},
                optimizer_step=max(part.optimizer_step, ck.optimizer_step))
            for it in sorted(parts)[:-2]:  # parts that never complete must not pile up
                del parts[it]
            if not set(part.params) >= set(self.names):
                return None
            del parts[ck.iteration]
            return part

    def hold(self, ck: Checkpoint) -> None:
        """Keep ``ck`` in memory for others (if it is newer than what we hold)."""
        with self._lock:
            if self.held is None or ck.iteration >= self.held.iteration:
                self.held = ck

    def hold_part(self, ck: Checkpoint) -> None:
        """A replica, of the whole model or of a chain stage's units: held once whole."""
        whole = self._merge("replica", ck)
        if whole is not None:
            self.hold(whole)

    def _answer(self, msg: Message) -> None:
        it = msg.meta.get("iteration")
        meta: dict = {"op": "reply", "iteration": it}
        tensors = {}
        try:
            held = self.held
            ck = held if held is not None and held.iteration == it else \
                checkpoint.load(self.dir, self.names, iteration=it) if self.dir is not None and type(it) is int else None
            if ck is None:
                raise ConfigError(f"{self.transport.account} has no checkpoint of iteration {it!r}")
            tensors, meta = ck.tensors(), {**meta, **ck.meta()}
        except ConfigError as exc:
            meta["error"] = str(exc)
        self.transport.send(Message(KIND, self.transport.job, self.transport.account, msg.sender, msg.iteration, 0,
                                    tensors, 0, meta))
        log.info("%s: sent the checkpoint of iteration %r to %s%s", self.transport.account, it, msg.sender,
                 f" (refused: {meta['error']})" if "error" in meta else "")

    def push(self, ck: Checkpoint, dest: str, version: int, *, op: str = "push") -> None:
        """worker_o: send ``ck`` to the collector ``dest`` (or, ``op="replica"``, to the device)."""
        self.transport.send(Message(KIND, self.transport.job, self.transport.account, dest, ck.iteration, 0,
                                    ck.tensors(), version, {"op": op, **ck.meta()}))

    def fetch(self, iteration: int, holder: str, timeout: float) -> Checkpoint:
        """The checkpoint of ``iteration`` from the tier ``holder``; :class:`PlanError` naming what failed."""
        self.transport.send(Message(KIND, self.transport.job, self.transport.account, holder, iteration, 0, {}, 0,
                                    {"op": "request", "iteration": iteration}))
        deadline = time.monotonic() + timeout
        while True:
            try:
                msg = self.replies.get(timeout=max(deadline - time.monotonic(), 0.001))
            except queue.Empty:
                raise PlanError(f"{self.transport.account}: no checkpoint of iteration {iteration} from {holder} "
                                f"within {timeout:g} s") from None
            if msg.sender == holder and msg.meta.get("iteration") == iteration:
                break
        if "error" in msg.meta:
            raise PlanError(f"resuming needs the checkpoint of iteration {iteration}: {msg.meta['error']}")
        ck = Checkpoint.from_message(msg.tensors, dict(msg.meta))
        missing = sorted(set(self.names) - set(ck.params))
        if missing:
            raise PlanError(f"the checkpoint of iteration {iteration} from {holder} lacks parameters {missing[:3]}")
        log.info("%s: fetched the checkpoint of iteration %d from %s", self.transport.account, iteration, holder)
        return ck
