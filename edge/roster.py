"""Who the fleet's coordinator may plan: the devices its fleet file describes whole, and the ones that
publish their own profile and so join on their own.

- A device described in the fleet file (its ``[[device]]`` names a ``profile``) is planned from the
  file; what it publishes is not read.
- Any other enrolled device joins by publishing its profile, retained, on
  ``hiertrain/<job>/<name>/profile`` (a fleet device does so from its ``[profile] file`` and its
  ``[fleet] samples / rate_mbps / private``). It is validated as telemetry is: of the fleet's model,
  with device timings, within the step's batch; the fleet file's ``[[device]]`` for it, if any,
  overrides what it says (the operator's word on privacy and radio rates wins). A bad one is refused,
  with its reason logged and counted, and that device stays unplanned; the run goes on.
- A device online without a profile (from the file or its own) is named once and not planned, and
  so is one whose samples would take the step past ``[train] batch``.
- A device given up on in a round is left out until it goes offline and comes back.
- The cloud's timings come from the fleet file's profile or, when it has none, from the profile the
  cloud worker publishes (its ``[profile] file``); until then the fleet is planned without it.

The members of a step are the known devices online, in the order they became known.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import replace
from typing import Any

from hiertrain import ACCOUNTS
from hiertrain.errors import ConfigError, PlanError
from hiertrain.net.inbound import tally
from hiertrain.planner import fleet as F
from hiertrain.planner import fleetfile as FF

log = logging.getLogger("hiertrain.edge")


class Roster:
    def __init__(self, file: FF.FleetFile, *, batch: int, where: Any) -> None:
        self.file, self.batch, self.where = file, batch, where
        total = sum(d.samples for d in file.fleet.devices)
        if total > batch:
            raise ConfigError(f"{where}: the devices' samples add up to {total} per step, more than "
                              f"[train] batch = {batch} (the most a step may hold)")
        self.devices: dict[str, F.Device] = {d.name: d for d in file.fleet.devices}
        self.described = frozenset(self.devices)  # planned from the file, whatever they publish
        self.revision = 0  # grows with every change to a known device: the plan is made anew
        self.excluded: set[str] = set()
        self.refused: Counter[str] = Counter()  # refused profiles, by device (on the edge's status)
        self._named: set[tuple[str, str]] = set()
        self._reasons: dict[str, str] = {}  # each device's last refusal
        self.cloud_s = file.fleet.cloud_s if file.cloud_known else None  # per unit, once known

    def check(self, *, wait_for: int, joins: bool, config: Any) -> None:
        """Refuse a fleet that could never start: without the planner's account (which reads the
        profiles) nobody joins, so the file must describe enough devices and the cloud's timings."""
        if not joins and (len(self.described) < wait_for or not self.file.cloud_known):
            lacks = "has no cloud timings" if not self.file.cloud_known else \
                f"describes {len(self.described)} of the {wait_for} devices to wait for"
            raise ConfigError(f"{config}: without [fleet] planner credentials no device or cloud can publish its "
                              f"profile, and {self.where} {lacks}")

    @property
    def cloud_known(self) -> bool:
        return self.cloud_s is not None

    def on_profile(self, name: str, payload: Any) -> None:
        """A device's published profile: it joins (or its description changes) at the next step."""
        if name == "cloud":
            self._on_cloud(payload)
            return
        if name in ACCOUNTS:  # a three-tier job's tier: not a fleet device
            return
        if name in self.described:
            self._say(name, "profile", f"edge: {name} published a profile; it is planned from {self.where} instead")
            return
        try:
            device = FF.published_device(self.file.fleet, name, payload, self.file.overrides.get(name, {}),
                                        batch=self.batch, classes=self.file.classes)
        except PlanError as exc:
            self._refuse(name, exc)
            if self.devices.pop(name, None) is not None:  # what it said before no longer holds
                self.revision += 1
            return
        if self.devices.get(name) != device:
            verb = "joins with its own profile" if name not in self.devices else "publishes a new profile"
            self.devices[name] = device
            self.revision += 1
            self._named = {said for said in self._named if said[0] != name}
            energy = (f", power {device.power.name}" if device.power else "") + \
                (f", budget {device.budget_j:g} J per step" if device.budget_j else "") + \
                (f", budget {device.budget_w:g} W on average" if device.budget_w else "")
            print(f"edge: {name} {verb}: {device.samples} samples per step, radio "
                  f"{device.rate_mbps:g} Mbit/s{', private' if device.private else ''}{energy}", flush=True)

    def _on_cloud(self, payload: Any) -> None:
        if self.file.cloud_known:
            self._say("cloud", "profile", f"edge: the cloud published a profile; its timings come from {self.where}")
            return
        try:
            cloud_s = FF.published_cloud(self.file.fleet, payload)
        except PlanError as exc:
            self._refuse("cloud", exc)
            return
        if cloud_s != self.cloud_s:
            self.cloud_s = cloud_s
            self.revision += 1
            print(f"edge: the cloud published its timings ({sum(cloud_s) * 1e3:.2f} ms per sample through every "
                  f"unit)", flush=True)

    def _refuse(self, name: str, exc: PlanError) -> None:
        """Count and log a refused profile (a flood is not a flood of lines; a new reason is always said)."""
        _, n, say = tally(self.refused, f"{name}: {exc}")
        if say or self._reasons.get(name) != str(exc):
            log.warning("edge: refused the profile %s published: %s (%d so far)", name, exc, n)
        self._reasons[name] = str(exc)

    def members(self, online: set[str]) -> list[str]:
        """The devices to plan in this step: known, online, not given up on, within the batch."""
        for name in sorted(online - set(self.devices) - set(ACCOUNTS)):
            self._say(name, "unknown", f"edge: {name} is online but has no profile, in {self.where} or its own "
                                       f"(its config's [profile] file): not planned")
        self.excluded &= online  # gone: when it is back, it is planned again
        out, total = [], 0
        for name, d in self.devices.items():
            if name not in online or name in self.excluded:
                continue
            if total + d.samples > self.batch:
                self._say(name, "batch", f"edge: {name} is not planned: its {d.samples} samples would take the "
                                         f"step past [train] batch = {self.batch}")
                continue
            out.append(name)
            total += d.samples
        return out

    def retry(self, online: set[str]) -> bool:
        """Plan again the devices given up on that are still online (they hung, or were slow)."""
        back = sorted(self.excluded & online)
        if back:
            print(f"edge: trying {', '.join(back)} again (given up on in a round, still online)", flush=True)
            self.excluded -= set(back)
        return bool(back)

    def fleet_of(self, names: list[str]) -> F.Fleet:
        """The fleet of ``names``; without a cloud while its timings are unknown."""
        fleet = replace(self.file.fleet, devices=tuple(self.devices[n] for n in names))
        return replace(fleet, cloud_s=self.cloud_s) if self.cloud_s is not None else F.without_cloud(fleet)

    def pins_for(self, names: list[str]) -> list[F.Path] | None:
        """The pinned paths of ``names``, if the fleet file pins every one of them."""
        return [self.file.pins[n] for n in names] if all(n in self.file.pins for n in names) else None

    def _say(self, name: str, what: str, line: str) -> None:
        if (name, what) not in self._named:
            self._named.add((name, what))
            print(line, flush=True)
