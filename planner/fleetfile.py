"""A fleet from what is measured and said: the servers' and each device's profiles, the fleet file
(links, devices described whole, the operator's overrides, pinned paths), and the profiles devices
and the cloud publish over MQTT to join (:mod:`hiertrain.edge.roster`). Each is checked against the
model's layers; anything wrong is a :class:`~hiertrain.errors.PlanError` or
:class:`~hiertrain.errors.ConfigError` saying why. The planning itself is :mod:`.fleet`'s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from hiertrain.errors import PlanError
from hiertrain.planner.fleet import NO_CLOUD_S, Device, Fleet, Path


def from_profiles(servers: Any, devices: Sequence[tuple], *, medium_mbps: float,
                  cloud_mbps: float, need_cloud: bool = True) -> Fleet:
    """A fleet from hiertrain-profile/1 profiles: ``servers`` holds the edge's and the cloud's timings
    (and the model's layers), each device ``(name, its profile, samples, radio Mbit/s, private[, power
    model, joules budget, watts budget])`` its own device timings (``hiertrain profile --tier device`` on that device). Without
    ``need_cloud`` the cloud's timings may be missing (it publishes its own): the fleet is then
    planned as one without a cloud (:func:`without_cloud`)."""
    for tier in ("edge", "cloud") if need_cloud else ("edge",):
        if tier not in servers.tiers:
            raise PlanError(f"the servers' profile has no {tier} timings")

    layers = tuple(layer.name for layer in servers.layers)
    cloud = servers.tiers.get("cloud")
    return Fleet(act_bytes=(servers.sample_bytes, *(layer.output_bytes for layer in servers.layers)),
                 param_bytes=tuple(layer.param_bytes for layer in servers.layers),
                 devices=tuple(device_of(row[0], row[1], layers, *row[2:]) for row in devices),
                 edge_s=_per_unit(servers.tiers["edge"]),
                 cloud_s=_per_unit(cloud) if cloud is not None else (NO_CLOUD_S,) * len(layers),
                 medium_mbps=medium_mbps, cloud_mbps=cloud_mbps, layers=layers)


def _per_unit(times: Any) -> tuple[float, ...]:
    return tuple(f + b for f, b in zip(times.forward_s, times.backward_s))


def _same_model(who: str, prof: Any, layers: Sequence[str]) -> None:
    names = [layer.name for layer in prof.layers]
    if layers and names != list(layers):
        i = next((i for i, (a, b) in enumerate(zip(names, layers)) if a != b), min(len(names), len(layers)))
        theirs, ours = (f"{seq[i]!r}" if i < len(seq) else "none" for seq in (names, layers))
        raise PlanError(f"{who}: its profile is of another model ({prof.model}): its layer {i + 1} is "
                        f"{theirs}, the fleet's {ours}")


def device_of(name: str, prof: Any, layers: Sequence[str], samples: int, rate: float, private: bool,
              power: Any = None, budget_j: Optional[float] = None, budget_w: Optional[float] = None) -> Device:
    """A device from its own profile (``hiertrain profile --tier device`` on it), checked against the
    model's layers; its power model ``power`` (a :class:`~hiertrain.power.PowerModel`), else its
    profile's ``power`` object, else the default class's."""
    from hiertrain.errors import ConfigError
    from hiertrain.power import power_of

    _same_model(f"device {name}", prof, layers)
    times = prof.tiers.get("device")
    if times is None or not times.can_train:
        raise PlanError(f"device {name}: its profile has no device timings")
    if power is None and times.extra.get("power") is not None:
        try:
            power = power_of(times.extra["power"], where=f"device {name}'s profile: power")
        except ConfigError as exc:
            raise PlanError(str(exc)) from None
    if budget_j is not None and not 0 < budget_j < math.inf:
        raise PlanError(f"device {name}: budget_j = {budget_j} must be > 0 joules per step")
    if budget_w is not None and not 0 < budget_w < math.inf:
        raise PlanError(f"device {name}: budget_w = {budget_w} must be > 0 watts on average")
    return Device(name, samples, _per_unit(times), rate, private, power, budget_j, budget_w)


def published_cloud(fleet: Fleet, payload: Any) -> tuple[float, ...]:
    """The cloud's seconds per sample per unit from the profile it published (``[profile] file`` of
    the cloud worker), checked against the fleet's model; :class:`PlanError` saying why otherwise."""
    from hiertrain.profile import Profile

    prof = Profile.from_json(payload, where="the cloud's profile")
    _same_model("the cloud", prof, fleet.layers)
    times = prof.tiers.get("cloud")
    if times is None or not times.can_train:
        raise PlanError("the cloud's profile has no cloud timings")
    return _per_unit(times)


JOIN_KEYS = {"samples": int, "rate_mbps": float, "private": bool, "power": str, "budget_j": float,
             "budget_w": float}
"""What a device says of itself beside its timings when it publishes its profile to join (its
profile's ``"fleet"`` object), and what a fleet file's ``[[device]]`` may override of it: ``power``
names its device class (:data:`hiertrain.power.CLASSES` or the fleet file's ``[power.<class>]``),
``budget_j`` the most joules it may spend in a step, ``budget_w`` the most watts it may draw on average
over training (a budget per hour: its watt-hours per hour); publishing a new one re-plans the fleet."""


def published_device(fleet: Fleet, name: str, payload: Any, override: dict[str, Any], *, batch: int,
                     classes: Any = None) -> Device:
    """A device from the profile it published (``hiertrain/<job>/<name>/profile``: hiertrain-profile/1
    with a ``"fleet"`` object of :data:`JOIN_KEYS`), the fleet file's ``override`` for it applied (the
    operator's word wins: privacy, radio rate). :class:`PlanError`, saying why, for anything else."""
    from hiertrain.config import typed
    from hiertrain.errors import ConfigError
    from hiertrain.profile import Profile

    prof = Profile.from_json(payload, where=f"device {name}'s profile")
    own = prof.extra.get("fleet")
    if not isinstance(own, dict):
        raise PlanError(f"device {name}'s profile has no \"fleet\" object ({', '.join(JOIN_KEYS)})")
    try:
        said = {**typed(own, JOIN_KEYS, where=f"device {name}'s profile: fleet"), **override}
    except ConfigError as exc:
        raise PlanError(str(exc)) from None
    samples, rate = said.get("samples"), said.get("rate_mbps")
    if samples is None or rate is None:
        raise PlanError(f"device {name}'s profile: fleet needs samples and rate_mbps")
    if not 1 <= samples <= batch or not 0 < rate < math.inf:
        raise PlanError(f"device {name}'s profile: fleet samples = {samples} is not in 1..{batch} (the step's "
                        f"batch) or rate_mbps = {rate} is not > 0")
    return device_of(name, prof, fleet.layers, samples, rate, said.get("private", False),
                     _power(said.get("power"), classes, f"device {name}"), said.get("budget_j"), said.get("budget_w"))


def _power(cls: Optional[str], classes: Any, who: str) -> Any:
    """The power model of a class name (None: none given), as a :class:`PlanError` if unknown."""
    from hiertrain.errors import ConfigError
    from hiertrain.power import CLASSES, power_of

    if cls is None:
        return None
    try:
        return power_of(cls, classes=classes or CLASSES, where=f"{who}: power")
    except ConfigError as exc:
        raise PlanError(str(exc)) from None


@dataclass(frozen=True)
class FleetFile:
    """What a fleet file says: the servers, the links and the devices it describes whole
    (``fleet.devices``); what it overrides of devices that publish their own profile; pinned paths."""

    fleet: Fleet
    overrides: dict[str, dict[str, Any]]
    pins: dict[str, Path]
    cloud_known: bool = True  # the servers' profile has the cloud's timings (else the cloud publishes them)
    classes: Any = None       # the power classes, the file's [power.<class>] applied (hiertrain.power)


DEVICE_KEYS = {"name": str, "profile": str, **JOIN_KEYS, "path": list}
FILE_KEYS = {"profile": str, "medium_mbps": float, "cloud_mbps": float, "device": list, "power": "any"}


def read(path: Any, *, units: Optional[int] = None) -> FleetFile:
    """A fleet file (TOML)::

        profile = "profile.json"          # the edge's and the cloud's timings
        medium_mbps = 20                  # the shared device-edge medium
        cloud_mbps = 5                    # the edge-cloud link
        [[device]]                        # a device described here, whole:
        name = "pi3-greenhouse"
        profile = "profile-pi3.json"      # its own `hiertrain profile --tier device`
        samples = 16                      # its samples in every iteration
        rate_mbps = 8                     # its radio
        private = true                    # its raw samples never leave it (default false)
        path = [2, 4]                     # optional: pinned (units 1..2 on it, 3..4 on the edge)
        power = "pi3"                     # optional: its device class (default pi4), for its joules
        budget_j = 4.0                    # optional: the most joules it may spend per step
        budget_w = 3.0                    # optional: the most watts it may draw on average (Wh per hour)
        [[device]]                        # one that publishes its own profile: only what the operator
        name = "pi7"                      # overrides (samples, rate_mbps, private, power, budgets, path)
        private = true
        [power.pi3]                       # optional: a device class's figures (hiertrain.power), or a new class
        busy_w = 5.5

    ``[[device]]`` tables are optional: a device that publishes its profile joins on its own.
    """
    from pathlib import Path as FilePath

    from hiertrain.config import read_toml, typed
    from hiertrain.errors import ConfigError
    from hiertrain.profile import Profile

    from hiertrain.power import with_overrides

    path = FilePath(path)
    raw = typed(read_toml(path, "fleet file"), FILE_KEYS, where=f"{path}:")
    if not isinstance(raw.get("power", {}), dict):
        raise ConfigError(f"{path}: power must be tables [power.<class>]")
    classes = with_overrides(raw.get("power", {}), where=f"{path}:")

    def need(table: dict, key: str, where: str) -> Any:
        if key not in table:
            raise ConfigError(f"{path}: {where} needs {key}")
        return table[key]

    def profile(p: str) -> Profile:
        full = FilePath(p) if FilePath(p).is_absolute() else path.parent / p
        return Profile.load(full)

    rows, overrides, pins = [], {}, {}
    for k, d in enumerate(raw.get("device", []), 1):
        where = f"[[device]] {k}"
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: {where} is not a table")
        d = typed(d, DEVICE_KEYS, where=f"{path}: {where}")
        name = need(d, "name", where)
        if name in overrides:
            raise ConfigError(f"{path}: two devices share a name ({name!r})")
        if d.get("samples", 1) < 1 or not d.get("rate_mbps", 1.0) > 0:
            raise ConfigError(f"{path}: {where}: samples must be >= 1 and rate_mbps > 0")
        if "path" in d:
            p = d.pop("path")
            if not (len(p) == 2 and all(type(v) is int for v in p) and 0 <= p[0] <= p[1]
                    and (units is None or p[1] <= units)):
                raise ConfigError(f"{path}: device {name}: path = {p!r} is not [m, k] with 0 <= m <= k"
                                  f"{f' <= {units}' if units is not None else ''}")
            pins[name] = Path(*p)
        overrides[name] = {key: v for key, v in d.items() if key in JOIN_KEYS}
        if "profile" in d:
            try:
                power = _power(d.get("power"), classes, f"{path}: device {name}")
            except PlanError as exc:
                raise ConfigError(str(exc)) from None
            rows.append((name, profile(d["profile"]), need(d, "samples", where), need(d, "rate_mbps", where),
                         d.get("private", False), power, d.get("budget_j"), d.get("budget_w")))
    if pins and len(pins) != len(overrides):
        raise ConfigError(f"{path}: pin a path on every [[device]] or on none")
    servers = profile(need(raw, "profile", "the fleet"))
    fleet = from_profiles(servers, rows, medium_mbps=need(raw, "medium_mbps", "the fleet"),
                          cloud_mbps=need(raw, "cloud_mbps", "the fleet"), need_cloud=False)
    return FleetFile(fleet, overrides, pins, cloud_known="cloud" in servers.tiers, classes=classes)


def load(path: Any) -> Fleet:
    """The fleet a fleet file describes whole (:func:`read`): every device with its profile."""
    from hiertrain.errors import ConfigError

    file = read(path)
    if not file.fleet.devices:
        raise ConfigError(f"{path}: no [[device]] tables with a profile to plan")
    if not file.cloud_known:
        raise ConfigError(f"{path}: its profile has no cloud timings (`hiertrain profile --tier cloud --merge`)")
    return file.fleet
