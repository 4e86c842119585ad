"""A tier service: runs HierTrain iterations over MQTT in whatever role each schedule gives it.

The device drives. For every iteration i it picks the newest schedule whose effective iteration
is <= i, and sends each other tier a ``samples`` message for i (its share of the batch, possibly
none) stamped with that schedule's version: the stamp is how all tiers agree which schedule an
iteration runs, so a switch never happens mid-iteration and no iteration is lost or repeated. The
device sends iteration i+1's samples while i runs (the only input of an iteration that does not
depend on the previous one), as bulk behind the running iteration's activations and
gradients; the labels ride in the samples message to worker_o (or a chain's last stage).

Per iteration and role (paper IV-B; :mod:`hiertrain.train.roles` does the compute):
- s / l: take the weights of units 1..cut from o, forward, send the activations at the cut to o,
  take their gradient, backward, send the parameter gradients;
- o: forward its samples (while s's and l's activations travel), continue theirs, loss, backward,
  send s's and l's gradients as soon as they exist, take their parameter gradients, step the
  optimizer, send the next iteration's s and l their weights; checkpoint every K iterations;
- a stage of a layer chain (JointDNN, JointDNN+, JALAD): forward its units on all samples, pass
  the activations on (8-bit for JALAD), take the gradient, backward, update its own units.

Each unit's weights and optimizer state have one owner (o, or the chain stage holding the unit).
When a new schedule gives units to another tier, their owner hands them over at the iteration
boundary, so nothing is lost when cuts, worker_o or the policy change.

Every wait has a timeout that names the tier, iteration and message; the service then stops
with status ``failed`` and its last checkpoint intact.
"""

from __future__ import annotations

import logging
import math
import queue
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from hiertrain import TIERS
from hiertrain.net import topics
from hiertrain.train import artifacts, checkpoint, collect, models
from hiertrain.net.compress import dequantize, pack_samples, quantize, sample_tensors
from hiertrain.train.data import normalize
from hiertrain.errors import Diverged, HiertrainError, MissingMessage, PlanError, TierLost
from hiertrain.failover import Failover
from hiertrain.train.optim import Optimizer
from hiertrain.train.roles import OwnerRole, SliceRole, StageRole, weights_of
from hiertrain.schedule import Schedule, ScheduleFeed
from hiertrain.train.segments import Runtime
from hiertrain.tierconfig import TierConfig
from hiertrain.net.transport import Transport
from hiertrain.net.validate import max_message_bytes, non_finite, validator
from hiertrain.net.wire import Message

log = logging.getLogger("hiertrain.tier")
LINK_OF = {frozenset(("device", "edge")): "device_edge", frozenset(("edge", "cloud")): "edge_cloud",
           frozenset(("device", "cloud")): "device_cloud"}  # through the edge: the slower link's rate

IDLE_TELEMETRY_EVERY = 2  # the device paces idle tiers by their reports, allowing them window / 2 of lag


@dataclass
class Stats:
    """One iteration's telemetry: phase times and traffic."""

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
        """CPU seconds of the whole process (every thread) since the iteration began."""
        return time.process_time() - self.cpu0


class TierService(Failover):
    def __init__(self, cfg: TierConfig, *, resume: bool = False) -> None:
        self.cfg, self.tier, self.resume = cfg, cfg.tier, resume
        self.spec = models.get(cfg.model)
        self.transport = Transport(cfg.endpoint, account=cfg.tier, job=cfg.job, chunk_bytes=cfg.chunk_bytes,
                                   validator=validator(self.spec, cfg.batch),
                                   max_message_bytes=max_message_bytes(self.spec, cfg.batch),
                                   expire_s=max(60.0, 2 * cfg.timeout_s))
        self.transport.subscribe(topics.schedule(cfg.job))
        self.transport.subscribe(topics.all_of_kind(cfg.job, "status"))  # who is online, who is lost
        self.supply = artifacts.Supply(self.transport, directory=cfg.segments_dir, timeout=cfg.timeout_s)
        self.runtime = Runtime(threads=cfg.threads, root=cfg.cache / "segments" if cfg.cache else None,
                               provider=self.supply.provider)
        self.feed = ScheduleFeed()
        self.schedules: dict[int, Schedule] = {}   # version -> schedule
        self.history: dict[int, Schedule] = {}     # iteration -> schedule it ran
        self.owner: Optional[OwnerRole] = None
        self.slice: Optional[SliceRole] = None
        self.stage: Optional[StageRole] = None
        self.units: frozenset[int] = frozenset()      # units whose weights and optimizer state we own
        self.params: dict[str, np.ndarray] = {}
        self.optimizer: Optional[Optimizer] = None
        self._weights_sent = -1
        self.dataset = cfg.training_data(self.spec) if cfg.tier == "device" else None
        self.sent_go: set[int] = set()
        self.online: set[str] = set()
        if cfg.checkpoint_collect:
            self.transport.status_extra["collector"] = True
        self.keeper = collect.Keeper(self.transport, self.spec, cfg.checkpoint_dir, keep=cfg.checkpoint_keep,
                                     collect=cfg.checkpoint_collect, on_stored=self._announce_checkpoint)
        self.done = -1  # newest iteration whose loss worker_o (or a chain's last stage) reported
        self.reached: dict[str, int] = {}  # tier -> the newest iteration it finished in this run (telemetry)
        if cfg.tier == "device":  # the others' progress (not its own: it would only come back)
            for tier in TIERS[1:]:
                self.transport.subscribe(topics.telemetry(cfg.job, tier))
        self._local: dict[int, tuple[Schedule, np.ndarray, np.ndarray]] = {}
        self._before_run: set[int] = set()  # schedule versions retained from before this run started
        self._shown_version, self._shown_at = -1, 0.0  # progress lines
        self._first = 0
        self._end_at = 0  # the device stops the run here (set once: a failover does not move it)
        self.run_id = uuid.uuid4().hex[:8]
        self.run_starts: dict[str, int] = {}  # the device's run -> its first iteration (its status)
        self._completed = -1  # the newest iteration whose update we applied as the model's owner
        self.failovers = 0    # how often this process carried on without a lost tier
        self.abandoned: dict[str, Any] = {}  # tier -> the run its status says it abandoned (a failover)
        self.followed: dict[str, Any] = {}  # tier -> the run its status says it follows (the device: runs)
        self._restored: Optional[checkpoint.Checkpoint] = None

    # ------------------------------------------------------------------ plumbing

    def _send(self, kind: str, dest: str, iteration: int, layer: int, tensors: dict[str, np.ndarray],
              version: int, *, bulk: bool = False, **meta: Any) -> None:
        for name, t in tensors.items():  # the receiver would drop it and wait: fail here, naming the cause
            why = non_finite(f"{kind} {name} to {dest}", t)
            if why:
                raise Diverged(f"{self.tier}: training diverged at iteration {iteration} ({why}); "
                                f"lower the learning rate (now {self.cfg.optimizer.lr})")
        self.transport.send(Message(kind, self.cfg.job, self.tier, dest, iteration, layer, tensors, version,
                                    {"run": self.run_id, **meta}), bulk=bulk)

    def _take(self, kind: str, sender: str, iteration: int, layer: int, stats: Optional[Stats] = None) -> Message:
        t0 = time.perf_counter()
        msg = self.transport.take(kind, sender, iteration, layer, timeout=self.cfg.timeout_s)
        if stats is not None:
            stats.wait_s += time.perf_counter() - t0
        return msg

    def _pump_schedules(self, wait: float = 0.0) -> None:
        """Handle every schedule, status and telemetry event that arrived (waiting up to ``wait``
        for the first one)."""
        timeout: Optional[float] = wait
        while True:
            try:
                event = self.transport.events.get(timeout=timeout) if timeout else self.transport.events.get_nowait()
            except queue.Empty:
                return
            timeout = None  # drain what is there, then return
            if isinstance(event.topic, topics.ScheduleTopic):
                sched = self.feed.offer(event.payload)
                if sched is not None and event.retained:
                    self._before_run.add(sched.version)
                if sched is not None:
                    try:
                        self.schedules[sched.version] = sched.check(n_units=self.spec.n_units, batch=self.cfg.batch)
                    except PlanError as exc:
                        log.warning("%s: ignored schedule version %d: %s", self.tier, sched.version, exc)
                        continue
                    log.info("%s: schedule version %d from iteration %d", self.tier, sched.version,
                             sched.effective_iteration)
            elif event.topic.kind == "telemetry" and isinstance(event.payload, dict):
                it = event.payload.get("iteration")
                if isinstance(it, int) and event.payload.get("run") == self.run_id:  # not an abandoned run's
                    self.reached[event.topic.account] = max(self.reached.get(event.topic.account, it), it)
                    if "loss" in event.payload:
                        self.done = max(self.done, it)
            elif event.topic.kind == "status" and isinstance(event.payload, dict):
                online = event.payload.get("state") == "online"
                (self.online.add if online else self.online.discard)(event.topic.account)
                self.abandoned[event.topic.account] = event.payload.get("abandoned")
                run, start = event.payload.get("run"), event.payload.get("start_iteration")
                self.followed[event.topic.account] = run
                if event.topic.account == "device" and isinstance(run, str) and type(start) is int:
                    self.run_starts[run] = start

    def _schedule_version(self, version: int, iteration: int) -> Schedule:
        deadline = time.monotonic() + self.cfg.timeout_s
        while version not in self.schedules:
            self.transport.mailbox.check_lost(f"schedule version {version}")
            if time.monotonic() > deadline:
                raise MissingMessage(kind="schedule", sender="planner", iteration=iteration, layer=version,
                                     timeout=self.cfg.timeout_s)
            self._pump_schedules(0.1)
        return self.schedules[version]

    def _effective(self, sched: Schedule) -> int:
        """When a schedule takes effect in this run: one retained from before the run (a previous
        run's, effective at its iteration 301, say) is in effect from the start of this one."""
        return min(sched.effective_iteration, self._first) if sched.version in self._before_run else \
            sched.effective_iteration

    def _schedule_for(self, iteration: int) -> Schedule:
        """The device's choice: the newest schedule in effect at ``iteration`` (waiting for the first)."""
        self._pump_schedules()
        deadline = time.monotonic() + self.cfg.timeout_s
        while True:
            ready = [s for s in self.schedules.values() if self._effective(s) <= iteration]
            if ready:
                sched = max(ready, key=lambda s: s.version)
                return sched
            if time.monotonic() > deadline:
                raise MissingMessage(kind="schedule", sender="planner", iteration=iteration, layer=0,
                                     timeout=self.cfg.timeout_s)
            self._pump_schedules(0.1)

    # --------------------------------------------------------------- the device

    def _wait_online(self) -> None:
        """The device starts only once edge and cloud listen (an early message would be lost)."""
        deadline = time.monotonic() + 10 * self.cfg.timeout_s
        while not {"edge", "cloud"} <= self.online:
            if time.monotonic() > deadline:
                missing = sorted({"edge", "cloud"} - self.online)
                raise MissingMessage(kind="status online", sender=missing[0], iteration=self._first, layer=0,
                                     timeout=10 * self.cfg.timeout_s)
            self._pump_schedules(0.1)

    def _wait_done(self, iteration: int) -> None:
        """The device: wait until ``iteration`` is finished (o's telemetry says so), so that an idle
        device does not race ahead stamping iterations with a schedule that is about to change;
        and until no tier lags more than half its mailbox window behind: nothing else paces an
        idle tier, and it refuses frames more than the window ahead of it."""
        lag = self.transport.mailbox.window // 2
        deadline = time.monotonic() + 10 * self.cfg.timeout_s
        while iteration >= self._first:
            behind = [t for t, it in self.reached.items() if t in self.online and it < iteration - lag]
            if self.done >= iteration and not behind:
                return
            self.transport.mailbox.check_lost(f"the loss of iteration {iteration}" if self.done < iteration else
                                              f"the {behind[0]} to finish iteration {iteration - lag}")
            if time.monotonic() > deadline:
                sched = self.history.get(iteration)
                finisher = "o" if sched is None else sched.chain[-1].tier if sched.chain else sched.tier_of("o")
                if self.done >= iteration:
                    raise MissingMessage(kind="telemetry", sender=behind[0], iteration=iteration - lag, layer=0,
                                         timeout=10 * self.cfg.timeout_s)
                raise MissingMessage(kind="telemetry (loss)", sender=finisher, iteration=iteration, layer=0,
                                     timeout=10 * self.cfg.timeout_s)
            self._pump_schedules(0.05)

    def _send_go(self, iteration: int, *, stop: bool = False, ahead: bool = False) -> None:
        """The device: samples of ``iteration`` to every other tier, stamped with the version; the
        labels ride in the message to the tier that computes the loss (one message fewer a step).
        ``ahead``: sent while the iteration before runs, behind its activations and gradients (bulk)."""
        if iteration in self.sent_go:
            return
        self.sent_go.add(iteration)
        assert self.dataset is not None
        if stop:
            for tier in ("edge", "cloud"):
                self._send("samples", tier, iteration, 0, {}, 0, stop=True)
            return
        sched = self._schedule_for(iteration)
        x, y = self.dataset.batch_raw(iteration, self.cfg.batch, seed=self.cfg.seed)  # uint8 images travel as such
        if sched.chain is None:
            parts = dict(zip("osl", np.split(x, [sched.b_o, sched.b_o + sched.b_s])))
            share = {t: parts[sched.role_of(t)] for t in TIERS}
            labels_to = sched.tier_of("o")
        else:  # a chain: every sample goes to the first stage, the labels to the last
            share = {t: (x if t == sched.chain[0].tier else x[:0]) for t in TIERS}
            labels_to = sched.chain[-1].tier
        for tier in ("edge", "cloud"):
            tensors, codec = sample_tensors(share[tier], self.cfg.compress_samples)
            if tier == labels_to:
                tensors["y"] = y
            self._send("samples", tier, iteration, 0, tensors, sched.version, bulk=ahead and bool(tensors), **codec)
        self._local[iteration] = (sched, normalize(share["device"]), y)

    def _labels(self, go: Message) -> np.ndarray:
        if "y" not in go.tensors:
            raise PlanError(f"{self.tier}: the device sent iteration {go.iteration}'s samples without labels, "
                            f"though schedule v{go.schedule_version} has this tier compute the loss")
        return go.tensors["y"]

    # --------------------------------------------------------------- ownership

    def _owned(self, sched: Schedule, tier: str) -> frozenset[int]:
        """The units whose weights and optimizer state ``tier`` holds under ``sched`` (the plan model's owners)."""
        return sched.plan(units=self.spec.n_units, batch=self.cfg.batch).owned(tier)

    def _names(self, units: frozenset[int]) -> dict[str, tuple[int, ...]]:
        return {k: v for u in sorted(units) for k, v in self.spec.param_shapes(u, u).items()}

    def _acquire(self, i: int, sched: Schedule, prev: Schedule, stats: Stats) -> bool:
        """Hold exactly the units ``sched`` gives us, taking the missing ones from their previous
        owners (or from the initial weights / checkpoint at the first iteration). True if any moved."""
        need = self._owned(sched, self.tier)
        if need == self.units:
            return False
        params = {k: v for k, v in self.params.items() if k in self._names(need)}
        moments = {k: v for k, v in (self.optimizer.moments.items() if self.optimizer else ()) if k[2:] in params}
        step = self.optimizer.step_count if self.optimizer else 0
        missing = need - self.units
        if i == self._run_start():
            ck = self._resume_state(i)
            source = ck.params if ck is not None else models.init_params(self.spec, self.cfg.seed)
            params.update({k: source[k] for k in self._names(missing)})
            if ck is not None:
                moments.update({k: v for k, v in ck.moments.items() if k[2:] in params})
                step = ck.optimizer_step
        elif i == self._first:  # we joined a run under way (a lost tier back): weights come by handover only
            raise PlanError(f"{self.tier}: joined run {self.run_id} at iteration {i} as the owner of units "
                            f"{sorted(missing)}, but who held them before is not known here; restart this tier")
        else:
            for tier in TIERS:
                if tier != self.tier and self._owned(prev, tier) & missing:
                    msg = self._take("weights", tier, i, 0, stats)
                    params.update({k: v for k, v in msg.tensors.items() if k[:2] not in ("m:", "v:")})
                    moments.update({k: v for k, v in msg.tensors.items() if k[:2] in ("m:", "v:")})
                    step = int(msg.meta.get("optimizer_step", step))
        shapes = self._names(need)
        if set(params) != set(shapes):
            raise PlanError(f"{self.tier}: after handover the weights of units {sorted(need)} are incomplete")
        self.params, self.units = params, need
        self.optimizer = Optimizer(self.cfg.optimizer, shapes, step_count=step, moments=moments) if shapes else None
        self.owner = self.stage = None
        return True

    def _run_start(self) -> int:
        """The first iteration of the device's current run (a tier that joined later starts after it)."""
        if self.tier == "device":
            return self._first
        self._pump_schedules()
        return self.run_starts.get(self.run_id, self._first)

    def _resume_state(self, first: int) -> Optional[checkpoint.Checkpoint]:
        """What the owner of the model at the first iteration starts from: nothing (the initial
        weights) in a fresh run; on ``--resume`` the checkpoint of the iteration before ``first``,
        its own or fetched from the tier whose status announces it (the collector, say)."""
        ck, self._restored = self._restored, None
        if first == 0:  # a run starting later always continues from a state (a lost tier back may own it)
            return None
        want = first - 1
        if (ck is None or ck.iteration != want) and self.cfg.checkpoint_dir:
            ck = checkpoint.load(self.cfg.checkpoint_dir, list(self.spec.param_shapes()), iteration=want)
        where = f"in {self.cfg.checkpoint_dir}" if self.failovers == 0 else "held when failing over"
        if ck is None:
            self._pump_schedules()
            holders = sorted(t for t, it in self.transport.announced().items() if it == want)
            if not holders:
                raise PlanError(f"{self.tier}: resuming at iteration {first} needs the checkpoint of iteration "
                                f"{want}, and no tier announces it")
            ck, where = self.keeper.fetch(want, holders[0], self.cfg.timeout_s), f"fetched from the {holders[0]}"
        print(f"{self.tier}: resuming from the checkpoint of iteration {want} ({where})", flush=True)
        return ck

    def _hand_over(self, i: int, sched: Schedule, nxt: Schedule) -> None:
        """End of iteration ``i - 1``: send the units we lose under ``nxt`` to their next owners."""
        mine = self._owned(sched, self.tier)
        for tier in TIERS:
            give = mine & self._owned(nxt, tier) if tier != self.tier else frozenset()
            if give:
                names = self._names(give)
                opt = self.optimizer
                tensors = {k: self.params[k] for k in names}
                if opt is not None:
                    tensors.update({k: v for k, v in opt.moments.items() if k[2:] in names})
                self._send("weights", tier, i, 0, tensors, nxt.version, optimizer_step=opt.step_count if opt else 0)

    def _next_schedule(self, i: int) -> Optional[Schedule]:
        """The schedule of iteration ``i`` as the device stamped it (None if the device stops)."""
        if self.tier == "device":
            return self._local[i][0] if i in self._local else None
        go = self.transport.mailbox.peek("samples", "device", i, 0, timeout=self.cfg.timeout_s)
        return None if go.meta.get("stop") else self._schedule_version(go.schedule_version, i)

    def _end(self, i: int, sched: Schedule) -> None:
        """After our update in iteration ``i``: pass on what the next iteration needs from us."""
        nxt = self._next_schedule(i + 1)
        if nxt is None:
            return
        self._hand_over(i + 1, sched, nxt)
        if nxt.chain is None and nxt.tier_of("o") == self.tier and self._owned(sched, self.tier) == self._owned(nxt, self.tier):
            self._send_weights(i + 1, nxt)  # pipelined: s and l get them while the device prepares i + 1
            self._weights_sent = i + 1

    # ------------------------------------------------------------------- a step

    def iteration(self, i: int) -> Optional[dict[str, Any]]:
        """Run iteration ``i``; ``None`` when the device said stop."""
        first = self._first
        stats = Stats()
        t_start = time.perf_counter()
        self.transport.advance(i)
        if self.tier == "device":
            if i >= self._end_at:
                self._send_go(i, stop=True)
                self.transport.flush(self.cfg.timeout_s)
                return None
            self._send_go(i)
            self._wait_done(i - 1)  # flow control: at most one iteration in flight ahead of o
            self._send_go(i + 1, stop=i + 1 >= self._end_at, ahead=True)  # prefetch: travels while i computes
            sched, mine, labels = self._local.pop(i)
            get_labels: Any = labels
        else:
            go = self._take("samples", "device", i, 0, stats)
            if go.meta.get("stop"):
                return None
            sched = self._schedule_version(go.schedule_version, i)
            mine = normalize(go.tensors["x"]) if "x" in go.tensors else None
            get_labels = lambda: self._labels(go)  # noqa: E731
        self.history[i] = sched
        prev = self.history.get(i - 1, sched) if i > first else sched
        self._acquire(i, sched, prev, stats)
        out: dict[str, Any] = {"iteration": i, "schedule_version": sched.version}
        if sched.chain is not None:
            self.slice = None
            out.update(self._as_stage(i, sched, mine, get_labels, stats))
        else:
            out["role"] = role = sched.role_of(self.tier)
            if role == "o":
                self.slice = None
                out.update(self._as_owner(i, sched, mine, get_labels, stats))
            elif sched.samples(role):
                self._as_slice(i, sched, role, mine, stats)
            else:
                self.slice = None  # idle this iteration
        if self.units:
            self._end(i, sched)
        if "loss" in out:
            if not math.isfinite(out["loss"]):  # fail now, naming the cause, not later on a dropped message
                raise Diverged(f"{self.tier}: training diverged at iteration {i} (loss {out['loss']}); "
                                f"lower the learning rate (now {self.cfg.optimizer.lr})")
            self.done = max(self.done, i)
        out["iteration_s"] = time.perf_counter() - t_start
        out["wait_s"] = stats.wait_s
        out["phases"] = stats.phases
        out["cpu_s"], out["compute_cpu_s"] = stats.cpu_s(), stats.compute_cpu_s
        if self.tier == "device" or stats.phases or "loss" in out or i % IDLE_TELEMETRY_EVERY == 0 \
                or sched.version != self._shown_version:
            self._telemetry(out)  # an idle edge or cloud reports less often: each report costs the device a message
        self._progress(i, sched, out)
        return out

    def _progress(self, i: int, sched: Schedule, out: dict[str, Any]) -> None:
        """What a person watching the service wants: a line whenever this tier starts a schedule,
        and from whoever computes the loss a line per iteration (at most one a second, and the last)."""
        if sched.version != self._shown_version:
            self._shown_version = sched.version
            print(f"{self.tier}: schedule v{sched.version} from iteration {i}: {out.get('role', 'idle')} "
                  f"({sched.describe()})", flush=True)
        now = time.monotonic()
        last = i == self._end_at - 1  # the run's final loss is always shown
        if "loss" in out and (now - self._shown_at >= 1.0 or out["iteration_s"] >= 1.0 or last):
            self._shown_at = now
            print(f"{self.tier}: iteration {i} loss {out['loss']:.4f} {out['iteration_s'] * 1e3:.0f} ms "
                  f"(schedule v{sched.version}, run {self.run_id})", flush=True)

    def _as_slice(self, i: int, sched: Schedule, role: str, x: Optional[np.ndarray], stats: Stats) -> None:
        cut, o = sched.cut(role), sched.tier_of("o")
        weights = self._take("weights", o, i, cut, stats).tensors
        t0 = stats.mark()
        if self.slice is None or self.slice.cut != cut:
            self.slice = SliceRole(self.spec, self.runtime, cut, weights)
        else:
            self.slice.load(weights)
        if x is None or len(x) != sched.samples(role):
            raise PlanError(f"{self.tier}: got {0 if x is None else len(x)} samples, schedule says {sched.samples(role)}")
        act = self.slice.forward(x)
        stats.timed("forward", t0)
        self._send("act", o, i, cut, {"x": act}, sched.version)
        g = self._take("grad", o, i, cut, stats).tensors["x"]
        t0 = stats.mark()
        grads = self.slice.backward(g)
        stats.timed("backward", t0)
        self._send("wgrad", o, i, cut, grads, sched.version)

    def _as_owner(self, i: int, sched: Schedule, x_o: Optional[np.ndarray], labels: Any, stats: Stats) -> dict[str, Any]:
        spec, v = self.spec, sched.version
        assert self.optimizer is not None
        if self.owner is None or (self.owner.m_s, self.owner.m_l) != (sched.m_s, sched.m_l):
            self.owner = OwnerRole(spec, self.runtime, sched.m_s, sched.m_l, self.params, self.optimizer)
        if self._weights_sent != i:  # first iteration, or we just became o: s and l wait for their weights
            self._send_weights(i, sched)
        s, l = sched.tier_of("s"), sched.tier_of("l")
        t0 = stats.mark()
        x_o = x_o if x_o is not None else np.zeros((0, *spec.input_shape), np.float32)
        res = self.owner.forward_backward(
            x_o, labels,
            (lambda: self._take("act", s, i, sched.m_s, stats).tensors["x"]) if sched.b_s else None,
            (lambda: self._take("act", l, i, sched.m_l, stats).tensors["x"]) if sched.b_l else None,
            send_s=lambda g: self._send("grad", s, i, sched.m_s, {"x": g}, v),
            send_l=lambda g: self._send("grad", l, i, sched.m_l, {"x": g}, v))
        stats.timed("forward_backward", t0)
        remote = []
        if sched.b_s:
            remote.append(self._take("wgrad", s, i, sched.m_s, stats).tensors)
        if sched.b_l:
            remote.append(self._take("wgrad", l, i, sched.m_l, stats).tensors)
        t0 = stats.mark()
        self.owner.step(*remote)
        self.params = self.owner.params
        self._completed = i
        stats.timed("update", t0)
        self._checkpoint(i, sched)
        self._replicate(i, sched)
        return {"loss": res.loss}

    def _as_stage(self, i: int, sched: Schedule, x: Optional[np.ndarray], labels: Any, stats: Stats) -> dict[str, Any]:
        """One stage of a chain: forward, pass on, take the gradient, backward, own update."""
        chain = sched.chain
        assert chain is not None
        k = next((n for n, st in enumerate(chain) if st.tier == self.tier), None)
        if k is None:
            return {"role": "idle"}
        st = chain[k]
        assert self.optimizer is not None
        if self.stage is None or (self.stage.first, self.stage.last) != (st.first, st.last):
            self.stage = StageRole(self.spec, self.runtime, st.first, st.last, self.params, self.optimizer)
        v, prev_tier = sched.version, chain[k - 1].tier if k else None
        if k:
            msg = self._take("act", prev_tier, i, st.first - 1, stats)
            x = dequantize(msg.tensors["q"], msg.meta["lo"], msg.meta["scale"]) if "q" in msg.tensors else msg.tensors["x"]
        t0 = stats.mark()
        out: dict[str, Any] = {"role": f"stage {k + 1} of {len(chain)}"}
        if self.stage.is_last:
            loss, gx = self.stage.head(x, labels() if callable(labels) else labels)
            out["loss"] = loss
        else:
            y = self.stage.forward(x)
            stats.timed("forward", t0)
            if sched.compress_bits:
                q, lo, scale = quantize(y)
                self._send("act", chain[k + 1].tier, i, st.last, {"q": q}, v, lo=lo, scale=scale)
            else:
                self._send("act", chain[k + 1].tier, i, st.last, {"x": y}, v)
            g = self._take("grad", chain[k + 1].tier, i, st.last, stats).tensors["x"]
            t0 = stats.mark()
            gx = self.stage.backward(g)
        stats.timed("backward_update", t0)
        self.params = self.stage.params
        if k:
            self._send("grad", prev_tier, i, st.first - 1, {"x": gx}, v)
        self._checkpoint(i, sched)  # after the gradient: off the critical path
        self._replicate(i, sched)
        return out

    def _send_weights(self, i: int, sched: Schedule) -> None:
        for role in ("s", "l"):
            tier = sched.tier_of(role)
            if sched.samples(role) and tier != self.tier:
                cut = sched.cut(role)
                self._send("weights", tier, i, cut, weights_of(self.spec, self.params, cut), sched.version)
        self._weights_sent = i

    def _holds_whole_model(self) -> bool:
        return self.units == frozenset(range(1, self.spec.n_units + 1))

    def _checkpoint(self, i: int, sched: Schedule) -> None:
        """Every ``[checkpoint] every`` iterations: the state into our own directory (if we have
        one and hold the whole model) and to every tier that collects (a chain's stages each send
        their own units, which the collector puts together)."""
        if not self.cfg.checkpoint_every or (i + 1) % self.cfg.checkpoint_every:
            return
        self._pump_schedules()  # who collects now
        to = sorted(self.transport.collectors())
        whole = self._holds_whole_model()
        collecting = self.cfg.checkpoint_collect and not whole
        if not (self.cfg.checkpoint_dir and whole or to or collecting):
            return
        opt = self.optimizer
        assert opt is not None
        ck = checkpoint.Checkpoint(i, self.params, dict(opt.moments), opt.step_count, sched.to_json())
        if self.cfg.checkpoint_dir and whole:
            checkpoint.save(self.cfg.checkpoint_dir, ck, keep=self.cfg.checkpoint_keep)
            self._announce_checkpoint(i)
        elif collecting:  # our own part of a chain's checkpoint
            self.keeper.store_part(ck)
        for dest in to:
            self.keeper.push(ck, dest, sched.version)

    def _linger_for_checkpoints(self) -> None:
        """A collector at the end of a run: worker_o may still be sending the last checkpoint.
        Wait until every other tier has gone (what it sent comes before its last status)."""
        deadline = time.monotonic() + self.cfg.timeout_s
        while (self.online & set(TIERS)) - {self.tier} and time.monotonic() < deadline:
            self._pump_schedules(0.1)

    def _announce_checkpoint(self, iteration: int) -> None:
        self.transport.announce(checkpoint_iteration=iteration)

    def _telemetry(self, out: dict[str, Any]) -> None:
        links = {}
        for sender, mbps in self.transport.take_rates().items():
            link = LINK_OF.get(frozenset((sender, self.tier)))
            if link:
                links[link] = round(mbps, 3)
        payload = {**out, "run": self.run_id, "t": time.time(), "links": links, "bytes_sent": self.transport.sent_bytes,
                   "bytes_received": self.transport.received_bytes,
                   "messages_sent": self.transport.sent_messages, "messages_received": self.transport.received_messages,
                   "dropped": dict(self.transport.dropped)}
        self.transport.publish_json(topics.telemetry(self.cfg.job, self.tier), payload)

    # ---------------------------------------------------------------------- run

    def _start_iteration(self) -> int:
        """0, or after the newest checkpoint when resuming (o announces it in its retained status),
        or after a failover the newest state a survivor holds."""
        mailbox = self.transport.mailbox
        if self.tier != "device":  # follow the device: start at the first iteration it sends, in its run
            first = mailbox.first("samples", "device", 10 * self.cfg.timeout_s)
            run = mailbox.peek("samples", "device", first, 0, self.cfg.timeout_s).meta.get("run")
            if isinstance(run, str):
                self.run_id = run
                mailbox.follow(run)
                self.transport.status_extra["run"] = run  # the device waits for us only if we took part
                self.transport.publish_status("online")
            return first
        if not self.failovers:
            self._wait_online()  # retained statuses (and checkpoints) arrive with it
        mailbox.follow(self.run_id)
        start = 0
        if self.resume:
            mine = self._restored.iteration if self._restored is not None else -1
            start = max([mine, *self.transport.announced().values()]) + 1
        # pace the run by the tiers here now (one that joins later, from its first report on)
        self.reached = {t: start - 1 for t in self.online & set(TIERS) - {self.tier}}
        # a new run: the planner restarts its iteration count there; tiers and logs name it
        self.transport.status_extra.update(run=self.run_id, start_iteration=start)
        self.transport.publish_status("online")
        return start

    def _sample_bytes(self) -> float:
        """What a sample weighs on the wire: as stored, or compressed (measured on a few batches)."""
        assert self.dataset is not None
        if not (self.cfg.compress_samples and self.dataset.images.dtype == np.uint8):
            return self.dataset.sample_bytes
        x = np.concatenate([self.dataset.batch_raw(i, self.cfg.batch, seed=self.cfg.seed)[0] for i in range(4)])
        return round(len(pack_samples(x)) / len(x), 1)

    def publish_profile(self, profile: dict[str, Any]) -> None:
        self.transport.publish_json(topics.profile(self.cfg.job, self.tier), profile, retain=True)

    def run(self) -> int:
        aside = checkpoint.set_aside(self.cfg.checkpoint_dir) if self.cfg.checkpoint_dir and not self.resume else None
        if aside is not None:  # a new run: its checkpoints must not be pruned for an earlier run's higher ones
            print(f"{self.tier}: a new run (no --resume): the earlier run's checkpoints moved to {aside}", flush=True)
        if self.resume and self.cfg.checkpoint_dir:
            self._restored = checkpoint.load(self.cfg.checkpoint_dir, list(self.spec.param_shapes()))
            if self._restored is not None:
                self.transport.status_extra["checkpoint_iteration"] = self._restored.iteration
        with self.transport, self.supply.serving(self.spec, self.runtime.root):
            if self.cfg.profile is not None:  # the device's data says what a sample weighs on the wire
                self.publish_profile({**self.cfg.profile, **({"sample_bytes": self._sample_bytes()}
                                                             if self.dataset is not None else {})})
            self.keeper.start()
            try:
                i = self._first = self._start_iteration()
                self._end_at = self._first + self.cfg.iterations
                log.info("%s: starting at iteration %d", self.tier, i)
                while True:
                    try:
                        while self.iteration(i) is not None:
                            i += 1
                        break
                    except TierLost as exc:
                        i = self._first = self._fail_over_until_resumed(exc, i)
                if self.cfg.checkpoint_collect:
                    self._linger_for_checkpoints()
                self.transport.flush(self.cfg.timeout_s)
                return 0
            except HiertrainError as exc:
                log.error("%s: %s", self.tier, exc)
                self.transport.status_extra["error"] = str(exc)  # the status on the way out says why
                raise
            finally:
                self.keeper.stop()


def run_tier(tier: str, config: str, *, resume: bool = False, profile: Optional[dict[str, Any]] = None) -> int:
    """``hiertrain <tier> run --config F``."""
    from dataclasses import replace

    from hiertrain import tierconfig

    cfg = tierconfig.load(tier, config)
    return TierService(replace(cfg, profile=profile or cfg.profile), resume=resume).run()
