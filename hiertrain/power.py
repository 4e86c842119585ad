"""How much power a machine draws: the model the planner plans with and a tier falls back on.

A :class:`PowerModel` is four numbers: the watts of the machine idle and with its CPU busy training,
and the radio's (or network interface's) joules per bit sent and received. One step of a tier costs

    E = idle_w * T + (busy_w - idle_w) * busy_s + tx_nj_per_bit * 1e-9 * 8 * sent + rx_nj_per_bit * 1e-9 * 8 * received

with ``T`` the step's seconds, ``busy_s`` the seconds it computed and ``sent`` / ``received`` bytes
(:func:`joules`, a pure function the planner and the tiers share). The idle draw runs all step long:
a machine waiting for its peers still burns it.

Defaults per device class (:data:`CLASSES`), each with where its figures come from. Measured
whole-board figures at the wall (USB-C/micro-USB meter), CPU idle and all cores busy:

- ``pi3``: Raspberry Pi 3 B+, 1.9 W idle, 5.1 W under ``stress --cpu 4``; ``pi4``: Raspberry Pi 4 B,
  2.7 W idle, 6.4 W busy (both: the Pi Dramble power benchmarks, pidramble.com/wiki/benchmarks/power-consumption);
- ``pi5``: Raspberry Pi 5, 2.7 W idle, 7.2 W busy (Jeff Geerling's Pi 5 measurements, 2023);
- ``jetson``: Jetson Nano, 2.0 W idle, 10 W busy (its 10 W power mode's cap, NVIDIA's module data sheet);
- ``server``: a one-socket x86 server, 50 W idle, 150 W busy (the range SPECpower_ssj2008 results report
  at 0 % and 100 % load for such machines).

Radios: 802.11n Wi-Fi on the boards, 283 nJ/bit sent and 137 nJ/bit received (Huang et al., "A close
examination of performance and power characteristics of 4G LTE networks", MobiSys 2012: Wi-Fi's
uplink and downlink power per Mbit/s); a server's gigabit Ethernet, 2 nJ/bit each way (a NIC of about
2 W at line rate).

Every number can be set per device class in a fleet file (``[power.<class>]``) or per tier
(``[energy]`` of its config, a profile's ``power`` object).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Mapping

from hiertrain.errors import ConfigError

NJ = 1e-9


@dataclass(frozen=True)
class PowerModel:
    idle_w: float
    busy_w: float
    tx_nj_per_bit: float
    rx_nj_per_bit: float
    name: str = "custom"  # the class it came from, for telemetry's ``source``

    def __post_init__(self) -> None:
        for key in ("idle_w", "busy_w", "tx_nj_per_bit", "rx_nj_per_bit"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ConfigError(f"power model {self.name}: {key} = {v!r} must be a finite number >= 0")
        if self.busy_w < self.idle_w:
            raise ConfigError(f"power model {self.name}: busy_w = {self.busy_w:g} is below idle_w = {self.idle_w:g}")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


CLASSES: dict[str, PowerModel] = {
    "pi3": PowerModel(1.9, 5.1, 283.0, 137.0, "pi3"),
    "pi4": PowerModel(2.7, 6.4, 283.0, 137.0, "pi4"),
    "pi5": PowerModel(2.7, 7.2, 283.0, 137.0, "pi5"),
    "jetson": PowerModel(2.0, 10.0, 283.0, 137.0, "jetson"),
    "server": PowerModel(50.0, 150.0, 2.0, 2.0, "server"),
}
DEFAULT_CLASS = {"device": "pi4", "edge": "server", "cloud": "server"}  # by tier (a fleet device: "device")
KEYS = ("idle_w", "busy_w", "tx_nj_per_bit", "rx_nj_per_bit")


def power_of(spec: Any, *, classes: Mapping[str, PowerModel] = CLASSES, where: str = "power") -> PowerModel:
    """A power model from a class name (``"pi4"``), or a table of a ``class`` and/or the numbers
    (``{"class": "pi4", "busy_w": 7.0}``: the class's figures, those given replacing them)."""
    if isinstance(spec, PowerModel):
        return spec
    if isinstance(spec, str):
        spec = {"class": spec}
    if not isinstance(spec, Mapping):
        raise ConfigError(f"{where}: expected a device class ({', '.join(classes)}) or a table, got {spec!r}")
    unknown = set(spec) - {"class", *KEYS}
    if unknown:
        raise ConfigError(f"{where}: unknown key {sorted(unknown)[0]!r}; known: class, {', '.join(KEYS)}")
    name = spec.get("class")
    if name is not None and name not in classes:
        raise ConfigError(f"{where}: unknown device class {name!r}; known: {', '.join(classes)}")
    given = {k: spec[k] for k in KEYS if k in spec}
    if name is None:
        missing = [k for k in KEYS if k not in given]
        if missing:
            raise ConfigError(f"{where}: without a class it needs {', '.join(missing)}")
        return PowerModel(**given, name="custom")
    for k, v in given.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ConfigError(f"{where}: {k} = {v!r} is not a number")
    return replace(classes[name], **{k: float(v) for k, v in given.items()},
                   name=name if not given else f"{name}*")


def with_overrides(tables: Mapping[str, Any], *, where: str) -> dict[str, PowerModel]:
    """:data:`CLASSES` with a fleet file's ``[power.<class>]`` tables applied (a new name is a new class,
    which then needs every number)."""
    out = dict(CLASSES)
    for name, table in tables.items():
        if not isinstance(table, Mapping):
            raise ConfigError(f"{where} [power.{name}] is not a table")
        base = {"class": name} if name in CLASSES else {}
        out[name] = replace(power_of({**base, **table}, where=f"{where} [power.{name}]"), name=name)
    return out


def joules(model: PowerModel, step_s: Any, busy_s: Any, sent_bytes: Any, received_bytes: Any) -> Any:
    """A machine's joules over one step (works on numpy arrays too: the planner calls it on many)."""
    return (model.idle_w * step_s + (model.busy_w - model.idle_w) * busy_s
            + 8.0 * NJ * (model.tx_nj_per_bit * sent_bytes + model.rx_nj_per_bit * received_bytes))
