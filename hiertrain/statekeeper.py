"""A tier's state beyond the live model: checkpoints, replicas, and the state a run resumes from.

- **Checkpoints**: every ``[checkpoint] every`` iterations the owner of the whole model saves it
  into its directory and pushes it to every collector online; a chain's stages each send their
  own units, which a collector puts together (:class:`hiertrain.train.collect.Keeper`).
- **Replicas** (failover, :mod:`hiertrain.failover`): every ``replica_every`` iterations a
  worker_o other than the data holder (the device) sends it a replica of its state, off the
  critical path; in a chain every stage sends its own units.
- **Resuming**: the owner of the model at a run's first iteration starts from the checkpoint of
  the iteration before: its own, or one fetched from the tier whose status announces it.
"""

from __future__ import annotations

import time
from typing import Optional

from hiertrain import TIERS
from hiertrain.errors import PlanError
from hiertrain.holding import Holding
from hiertrain.runview import RunView
from hiertrain.schedule import Schedule
from hiertrain.service import keeper_for
from hiertrain.tierconfig import TierConfig
from hiertrain.train import checkpoint

REPLICA_HOLDER = "device"  # the data holder: it outlives any other tier's loss


class StateKeeper:
    def __init__(self, cfg: TierConfig, view: RunView, holding: Holding) -> None:
        self.cfg, self.view, self.holding, self.tier = cfg, view, holding, cfg.tier
        self.transport = view.transport
        self.spec = holding.spec
        self.keeper = keeper_for(cfg, self.transport, self.spec)
        self.restored: Optional[checkpoint.Checkpoint] = None  # what a resumed run starts from
        self.completed = -1  # the newest iteration whose update we applied as the model's owner

    def open(self, *, resume: bool) -> None:
        """Before connecting: a new run sets the earlier run's checkpoints aside (they must not be
        pruned for its higher ones); ``--resume`` loads the newest and announces it."""
        directory = self.cfg.checkpoint_dir
        aside = checkpoint.set_aside(directory) if directory and not resume else None
        if aside is not None:
            print(f"{self.tier}: a new run (no --resume): the earlier run's checkpoints moved to {aside}", flush=True)
        if resume and directory:
            self.restored = checkpoint.load(directory, list(self.spec.param_shapes()))
            if self.restored is not None:
                self.transport.status_extra["checkpoint_iteration"] = self.restored.iteration

    def newest_announced(self) -> int:
        """The newest state anyone here holds (ours, or one a tier's status announces); -1 if none."""
        mine = self.restored.iteration if self.restored is not None else -1
        return max([mine, *self.transport.announced().values()])

    def checkpoint(self, i: int, sched: Schedule) -> None:
        """Every ``[checkpoint] every`` iterations: the state into our own directory (if we have
        one and hold the whole model) and to every tier that collects."""
        if not self.cfg.checkpoint_every or (i + 1) % self.cfg.checkpoint_every:
            return
        self.view.pump()  # who collects now
        to = sorted(self.transport.collectors())
        whole = self.holding.whole_model()
        collecting = self.cfg.checkpoint_collect and not whole
        if not (self.cfg.checkpoint_dir and whole or to or collecting):
            return
        ck = self.holding.snapshot(i, sched.to_json())
        if self.cfg.checkpoint_dir and whole:
            checkpoint.save(self.cfg.checkpoint_dir, ck, keep=self.cfg.checkpoint_keep)
            self.transport.announce(checkpoint_iteration=i)
        elif collecting:  # our own part of a chain's checkpoint
            self.keeper.store_part(ck)
        for dest in to:
            self.keeper.push(ck, dest, sched.version)

    def replicate(self, i: int, sched: Schedule) -> None:
        """After our update of ``i``, every K-th iteration: worker_o sends the data holder a replica
        of its state; in a chain every stage sends the state of its units (the holder's own part
        goes straight to its keeper), and the holder has the iteration once the parts cover the model."""
        k = sched.replica_every
        if not k or (i + 1) % k:
            return
        if self.tier == REPLICA_HOLDER:
            if sched.chain is not None:  # (worker_o here: its live state is what a failover resumes from)
                self.keeper.hold_part(self.holding.snapshot(i, sched.to_json()))
        elif REPLICA_HOLDER in self.transport.online():
            self.keeper.push(self.holding.snapshot(i, sched.to_json()), REPLICA_HOLDER, sched.version, op="replica")

    def vouched(self) -> Optional[checkpoint.Checkpoint]:
        """The newest state this tier can hand on: its live state as the model's owner, else the
        newer of the replica it holds (the data holder) and its newest checkpoint on disk (one it
        saved or collected)."""
        if self.holding.optimizer is not None and self.completed >= 0 and self.holding.whole_model():
            return self.holding.snapshot(self.completed)
        disk = checkpoint.load(self.cfg.checkpoint_dir, list(self.spec.param_shapes())) \
            if self.cfg.checkpoint_dir else None
        held = [ck for ck in (self.keeper.held, disk) if ck is not None]
        return max(held, key=lambda ck: ck.iteration) if held else None

    def resume_state(self, first: int, *, failed_over: bool) -> Optional[checkpoint.Checkpoint]:
        """What the owner of the model at the first iteration starts from: nothing (the initial
        weights) in a fresh run; on ``--resume`` (or after a failover) the checkpoint of the
        iteration before ``first``, its own or fetched from the tier whose status announces it."""
        ck, self.restored = self.restored, None
        if first == 0:  # a run starting later always continues from a state (a lost tier back may own it)
            return None
        want = first - 1
        if (ck is None or ck.iteration != want) and self.cfg.checkpoint_dir:
            ck = checkpoint.load(self.cfg.checkpoint_dir, list(self.spec.param_shapes()), iteration=want)
        where = "held when failing over" if failed_over else f"in {self.cfg.checkpoint_dir}"
        if ck is None:
            self.view.pump()
            holders = sorted(t for t, it in self.transport.announced().items() if it == want)
            if not holders:
                raise PlanError(f"{self.tier}: resuming at iteration {first} needs the checkpoint of iteration "
                                f"{want}, and no tier announces it")
            ck, where = self.keeper.fetch(want, holders[0], self.cfg.timeout_s), f"fetched from the {holders[0]}"
        print(f"{self.tier}: resuming from the checkpoint of iteration {want} ({where})", flush=True)
        return ck

    def linger(self) -> None:
        """A collector at the end of a run: worker_o may still be sending the last checkpoint.
        Wait until every other tier has gone (what it sent comes before its last status)."""
        if not self.cfg.checkpoint_collect:
            return
        deadline = time.monotonic() + self.cfg.timeout_s
        while (self.transport.online() & set(TIERS)) - {self.tier} and time.monotonic() < deadline:
            self.view.pump(0.1)
