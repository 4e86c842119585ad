"""The coordinator's state on disk and on the wire: what a resumed or standby coordinator continues from.

A fleet's state after a step is the model's (weights, optimizer moments and step) and the fleet's:
every device's place in its data and the plan version. The coordinator writes it into its
``[checkpoint] dir`` every ``every`` steps and pushes it to every collector online (a cloud with
``[checkpoint] collect = true``: a machine other than the edge's). ``--resume`` continues after the
newest one, its own or, newer, one a collector announces in its status (fetched over MQTT): so a
standby coordinator on a second edge machine, with an empty directory, takes over from the
checkpoint the cloud collected.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from hiertrain.errors import ConfigError, PlanError
from hiertrain.train import checkpoint
from hiertrain.train.checkpoint import Checkpoint
from hiertrain.train.optim import Optimizer


def snapshot(step: int, params: dict, optimizer: Any, version: int, offsets: dict[str, int]) -> Checkpoint:
    """The state after ``step``: a resumed run trains the very samples the lost one would have."""
    return Checkpoint(step, dict(params), dict(optimizer.moments), optimizer.step_count,
                      {"fleet": {"version": version, "offsets": dict(offsets)}})


def save(directory: Path, ck: Checkpoint, *, keep: int, transport: Any, keeper: Any) -> None:
    """Write ``ck`` and push it to every collector online; our status announces it."""
    checkpoint.save(directory, ck, keep=keep)
    transport.status_extra["checkpoint_iteration"] = ck.iteration
    for dest in sorted(transport.collectors()):
        keeper.push(ck, dest, ck.schedule["fleet"]["version"])


def fresh(directory: Optional[Path]) -> None:
    """A new run: an earlier run's checkpoints are set aside, not mixed with (or pruned for) its own."""
    aside = checkpoint.set_aside(directory) if directory else None
    if aside is not None:
        print(f"edge: a new run (no --resume): the earlier run's checkpoints moved to {aside}", flush=True)


def newest(directory: Path, names: list[str], *, keep: int, transport: Any, keeper: Any,
           timeout: float) -> Optional[Checkpoint]:
    """The newest checkpoint: ours, or a newer one a peer announces (fetched, then kept in ours)."""
    ck = checkpoint.load(directory, names)
    mine = ck.iteration if ck is not None else -1
    held = {a: it for a, it in transport.announced().items() if it > mine}
    for holder in sorted(held, key=lambda a: -held[a]):
        try:
            got = keeper.fetch(held[holder], holder, timeout)
        except PlanError as exc:
            print(f"edge: {exc}", flush=True)
            continue
        checkpoint.save(directory, got, keep=keep)
        print(f"edge: fetched the checkpoint of step {got.iteration} from the {holder}", flush=True)
        return got
    return ck


def fleet_of(ck: Checkpoint, where: Any) -> tuple[dict[str, int], int]:
    """(every device's offset, the plan version) of a fleet's checkpoint; ConfigError for another job's."""
    fleet = (ck.schedule or {}).get("fleet")
    if not isinstance(fleet, dict) or not isinstance(fleet.get("offsets"), dict):
        raise ConfigError(f"{where}: checkpoint of step {ck.iteration} is not a fleet's (it has no devices' "
                          f"offsets): resume it with the job that wrote it")
    offsets = {n: o for n, o in fleet["offsets"].items() if isinstance(n, str) and type(o) is int and o >= 0}
    version = fleet.get("version", 0)
    return offsets, version if type(version) is int else 0


def resumed(cfg: Any, spec: Any, *, transport: Any, keeper: Any) -> Optional[tuple[Checkpoint, Optimizer, dict[str, int], int]]:
    """What ``--resume`` continues from: the newest checkpoint (:func:`newest`), the optimizer it holds,
    every device's offset and the plan version; ``None`` (said in a line) when there is none."""
    ck = newest(cfg.checkpoint_dir, list(spec.param_shapes()), keep=cfg.checkpoint_keep, transport=transport,
                keeper=keeper, timeout=cfg.timeout_s)
    if ck is None:
        print(f"edge: no checkpoint in {cfg.checkpoint_dir} or announced to resume from: starting at step 0", flush=True)
        return None
    offsets, version = fleet_of(ck, cfg.checkpoint_dir)
    optimizer = Optimizer(cfg.optimizer, spec.param_shapes(), step_count=ck.optimizer_step, moments=ck.moments,
                          momenta=spec.momentum)
    transport.status_extra["checkpoint_iteration"] = ck.iteration
    return ck, optimizer, offsets, version
