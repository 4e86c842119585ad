"""Joules per step, measured where the hardware tells and modeled where it does not.

Readers, one per interface, each naming itself as telemetry's ``source``:

- :class:`Rapl` (``rapl``): Intel/AMD RAPL through ``/sys/class/powercap/intel-rapl:N/energy_uj``, the
  packages' cumulative microjoules (the CPU packages, not the whole machine), wrapping at
  ``max_energy_range_uj``;
- :class:`Pmic` (``pmic``): the Raspberry Pi 5's power-management IC, ``vcgencmd pmic_read_adc``, every
  rail's volts times its amps (the board's draw, without the USB devices), a power reading;
- :class:`Jetson` (``jetson``): a Jetson's INA3221 rails through jetson-stats (``jtop``, an optional
  dependency), ``power["tot"]["power"]`` in milliwatts, a power reading.

:class:`Meter` turns a reader into joules per step (an energy counter's difference, a power reading
integrated by the trapezoid rule over the step), or, with none, the tier's
:class:`~hiertrain.power.PowerModel` applied to what the step did (its seconds, the seconds it
computed, the bytes it sent and received). :func:`detect` finds the reader a machine has.
"""

from __future__ import annotations

import math
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from hiertrain.errors import ConfigError
from hiertrain.power import DEFAULT_CLASS, KEYS, PowerModel, joules, power_of

POWERCAP = Path("/sys/class/powercap")
SOURCES = ("auto", "model", "rapl", "pmic", "jetson")


class Reader:
    source = "?"
    cumulative = True  # True: read() gives joules so far; False: watts now

    def read(self) -> float:
        raise NotImplementedError


class Rapl(Reader):
    """The top-level RAPL zones (``intel-rapl:0``, ``intel-rapl:1``: one per package; their sub-zones,
    core and dram, are parts of them and left out), summed, in joules, wraps undone."""

    source = "rapl"

    def __init__(self, root: Path = POWERCAP) -> None:
        self.zones = sorted(p for p in Path(root).glob("intel-rapl:*") if re.fullmatch(r"intel-rapl:\d+", p.name))
        if not self.zones:
            raise ConfigError(f"no RAPL zones under {root}")
        self.ranges = [int((z / "max_energy_range_uj").read_text()) for z in self.zones]
        self.last = [self._raw(z) for z in self.zones]
        self.total_uj = 0

    @staticmethod
    def _raw(zone: Path) -> int:
        return int((zone / "energy_uj").read_text())

    def read(self) -> float:
        for i, z in enumerate(self.zones):
            now = self._raw(z)
            delta = now - self.last[i]
            if delta < 0:  # the counter wrapped
                delta += self.ranges[i] + 1
            self.total_uj += delta
            self.last[i] = now
        return self.total_uj * 1e-6


PMIC_LINE = re.compile(r"^\s*(\S+)_([AV])\s+(?:current|volt)\(\d+\)=([-+0-9.eE]+)[AV]\s*$")


def pmic_watts(text: str) -> float:
    """Watts from ``vcgencmd pmic_read_adc``'s output: each rail's ``<RAIL>_V`` times its ``<RAIL>_A``."""
    amps: dict[str, float] = {}
    volts: dict[str, float] = {}
    for line in text.splitlines():
        m = PMIC_LINE.match(line)
        if m:
            (amps if m.group(2) == "A" else volts)[m.group(1)] = float(m.group(3))
    rails = amps.keys() & volts.keys()
    if not rails:
        raise ConfigError("vcgencmd pmic_read_adc printed no rail with both a current and a voltage")
    return sum(amps[r] * volts[r] for r in rails)


class Pmic(Reader):
    source = "pmic"
    cumulative = False

    def __init__(self, run: Optional[Callable[[], str]] = None) -> None:
        self.run = run or (lambda: subprocess.run(["vcgencmd", "pmic_read_adc"], capture_output=True, text=True,
                                                  timeout=5, check=True).stdout)
        pmic_watts(self.run())  # fails now on a board without the PMIC

    def read(self) -> float:
        return pmic_watts(self.run())


class Jetson(Reader):
    """jetson-stats' total board power; ``handle`` an open ``jtop.jtop()`` (tests give a recorded one)."""

    source = "jetson"
    cumulative = False

    def __init__(self, handle: Any = None) -> None:
        if handle is None:
            from jtop import jtop  # type: ignore[import-not-found]  # optional: pip install jetson-stats

            handle = jtop()
            handle.start()
        self.handle = handle
        self.read()

    def read(self) -> float:
        try:
            return float(self.handle.power["tot"]["power"]) / 1000.0
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"jetson-stats reported no total power ({exc})") from None


def detect(source: str = "auto") -> Optional[Reader]:
    """The reader for ``source``; ``auto``: the first this machine has (RAPL, the Pi 5 PMIC, jetson-stats),
    or None (the power model); a named one this machine lacks is a :class:`ConfigError`."""
    if source not in SOURCES:
        raise ConfigError(f"unknown energy source {source!r}; known: {', '.join(SOURCES)}")
    if source == "model":
        return None
    tries: list[tuple[str, Callable[[], Reader]]] = [("rapl", Rapl), ("pmic", _pmic), ("jetson", Jetson)]
    for name, make in tries:
        if source not in ("auto", name):
            continue
        try:
            return make()
        except Exception as exc:  # whatever a missing or broken interface raises (jtop's own, say): not here
            if source == name:
                raise ConfigError(f"energy source {name}: not available here ({type(exc).__name__}: {exc})") from None
    return None


def _pmic() -> Reader:
    if shutil.which("vcgencmd") is None:
        raise ConfigError("no vcgencmd")
    return Pmic()


class Meter:
    """Joules per step of one tier: from ``reader`` when there is one, else from ``model``. A power
    reading (a subprocess on a Pi 5) is taken once per ``every_s`` seconds of steps, not every step:
    the steps between are charged the last reading."""

    def __init__(self, model: PowerModel, reader: Optional[Reader] = None, *, every_s: float = 1.0) -> None:
        self.model, self.reader, self.every_s = model, reader, every_s
        self.sent = self.received = 0
        self.total_j = 0.0
        self.unread_s = 0.0  # step seconds since the last power reading
        self.last = reader.read() if reader is not None else 0.0

    @property
    def source(self) -> str:
        return self.reader.source if self.reader is not None else f"model:{self.model.name}"

    def step(self, step_s: float, busy_s: float, sent_total: int, received_total: int) -> dict[str, Any]:
        """This step's joules (``sent_total`` / ``received_total``: the tier's byte counters so far)."""
        sent, received = sent_total - self.sent, received_total - self.received
        self.sent, self.received = sent_total, received_total
        if self.reader is None:
            j = float(joules(self.model, step_s, min(busy_s, step_s), sent, received))
        elif self.reader.cumulative:
            now = self.reader.read()
            j, self.last = now - self.last, now
        else:
            self.unread_s += step_s
            if self.unread_s < self.every_s:
                j = self.last * step_s
            else:
                now = self.reader.read()
                j, self.last, self.unread_s = 0.5 * (now + self.last) * step_s, now, 0.0
        self.total_j += j
        return {"joules": round(j, 6), "joules_total": round(self.total_j, 6), "source": self.source}


@dataclass(frozen=True)
class EnergyConfig:
    """A tier's ``[energy]`` table: where its joules come from, its power model, and (a device) its
    budget per step, lowered to ``low_budget_j`` while its battery is below ``low_pct`` percent, and its
    average watts over training (``budget_w``, ``low_budget_w``: a budget per hour)."""

    source: str = "auto"
    power: PowerModel = power_of(DEFAULT_CLASS["device"])
    budget_j: Optional[float] = None
    battery: Optional[Path] = None
    low_pct: float = 20.0
    low_budget_j: Optional[float] = None
    budget_w: Optional[float] = None
    low_budget_w: Optional[float] = None

    @classmethod
    def of(cls, table: dict[str, Any], *, tier: str, resolve: Callable[[str], Path] = Path) -> "EnergyConfig":
        source = table.get("source", "auto")
        if source not in SOURCES:
            raise ConfigError(f"source = {source!r} is not one of {', '.join(SOURCES)}")
        spec = {"class": table.get("power", DEFAULT_CLASS.get(tier, DEFAULT_CLASS["device"])),
                **{k: table[k] for k in KEYS if k in table}}
        power = power_of(spec, where="power")
        for key, unit in (("budget_j", "joules per step"), ("low_budget_j", "joules per step"),
                          ("budget_w", "watts on average"), ("low_budget_w", "watts on average")):
            if key in table and not 0 < table[key] < math.inf:
                raise ConfigError(f"{key} = {table[key]} must be a positive number of {unit}")
        if not 0 <= table.get("low_pct", 20.0) <= 100:
            raise ConfigError(f"low_pct = {table['low_pct']} is not a percentage")
        if ("battery" in table) != ("low_budget_j" in table or "low_budget_w" in table):
            raise ConfigError("battery goes with low_budget_j or low_budget_w (the budget while the battery is low)")
        return cls(source, power, table.get("budget_j"), resolve(table["battery"]) if "battery" in table else None,
                   table.get("low_pct", 20.0), table.get("low_budget_j"), table.get("budget_w"),
                   table.get("low_budget_w"))

    def meter(self) -> Meter:
        return Meter(self.power, detect(self.source))

    def low(self) -> bool:
        """Whether the battery reads below ``low_pct`` (an unreadable battery counts as not low)."""
        if self.battery is None:
            return False
        try:
            return float(self.battery.read_text().strip()) < self.low_pct
        except (OSError, ValueError):
            return False

    def budgets_now(self) -> dict[str, float]:
        """Every budget in force, as a device reports them: ``budget_j`` (``low_budget_j`` while the battery
        is low) and ``budget_w`` (``low_budget_w``)."""
        low = self.low()
        out = {"budget_j": self.low_budget_j if low and self.low_budget_j is not None else self.budget_j,
               "budget_w": self.low_budget_w if low and self.low_budget_w is not None else self.budget_w}
        return {k: v for k, v in out.items() if v is not None}
