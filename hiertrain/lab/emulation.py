"""Emulating the paper's three machines on this one: CPU quotas calibrated to their speed ratios.

The paper's prototype is a Raspberry Pi 3 (device), one core of an Intel NUC i3-7100U (edge) and
a Xeon workstation with a GTX 1080 Ti (cloud), "one order of magnitude" faster than both. We keep
those *ratios* of training speed, not the absolute speeds: ``SPEEDS`` = device 1 : edge 4 : cloud
40 (a Pi 3's four 1.2 GHz Cortex-A53 cores train roughly four times slower than one 2.4 GHz
Kaby Lake core; the cloud is ten times the edge). The cloud runs unrestricted on every core of
this machine; the edge and the device get cgroup CPU quotas found by :func:`calibrate`:

1. profile the cloud unrestricted, and the edge and the device at a probe quota;
2. a quota scales compute time inversely (throttling in short periods), so the quota that makes
   tier t ``SPEEDS[cloud] / SPEEDS[t]`` times slower than the cloud is
   ``probe_t * time_t(probe_t) / (time_cloud * SPEEDS[cloud] / SPEEDS[t])``;
3. profile edge and device again at those quotas: that profile is what the planner uses, and
   the ratios it shows are the ones reported (they are measured, not assumed).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping, Optional

from hiertrain.errors import ConfigError

SPEEDS = {"device": 1.0, "edge": 4.0, "cloud": 40.0}
THREADS = {"cloud": 0, "edge": 1, "device": 1}  # ORT intra-op threads per tier (0 = every core)
PROBE = {"edge": 0.5, "device": 0.2}
MIN_QUOTA, MAX_QUOTA = 0.01, 1.0
# The quotas `bench testbed` calibrated for LeNet-5 on these machines (stop 12): fixed references for
# the benchmarks that scale a measurement to the emulated Pi 3 and edge without calibrating again
REFERENCE_QUOTAS = {"device": 0.0233, "edge": 0.1125}


def parse_speeds(text: str) -> dict[str, float]:
    """``"1:4:40"`` -> relative speeds of device, edge and cloud."""
    try:
        values = [float(x) for x in text.split(":")]
    except ValueError:
        values = []
    if len(values) != 3 or not all(v > 0 for v in values):
        raise ConfigError(f"speeds must be three positive numbers device:edge:cloud (like 1:4:40), got {text!r}")
    return dict(zip(("device", "edge", "cloud"), values))


def profile_tier(model: str, batch: int, out: Path, tier: str, *, quota: Optional[float] = None,
                 repeat: int = 3) -> Path:
    """Profile one emulated tier into ``out`` (merged with the tiers already there)."""
    extra = ["--threads", str(THREADS[tier])] if THREADS[tier] else []
    extra += ["--cpu-quota", str(quota)] if quota else []
    proc = subprocess.Popen([sys.executable, "-m", "hiertrain", "profile", "--model", model, "--batch", str(batch),
                             "--repeat", str(repeat), "--warmup", "1", "--tier", tier, "--merge", "--out", str(out),
                             *extra], stdout=subprocess.DEVNULL)
    try:
        code = proc.wait(timeout=1800)
    except BaseException:
        proc.terminate()  # it removes its CPU-quota group on the way out
        proc.wait()
        raise
    if code:
        raise ConfigError(f"profiling the {tier} failed (exit code {code})")
    return out


def profile_tiers(model: str, batch: int, out: Path, *, quotas: Mapping[str, float]) -> Path:
    """Profile all three emulated tiers into one hiertrain-profile/1 (quotas in cores, where given)."""
    for tier in ("cloud", "edge", "device"):
        profile_tier(model, batch, out, tier, quota=quotas.get(tier))
    return out


def seconds_per_sample(profile: Any, tier: str) -> float:
    """Forward plus backward of the whole model, per sample, on ``tier``."""
    t = profile.tiers[tier]
    return float(sum(t.forward_s) + sum(t.backward_s))


def quotas_for(times: Mapping[str, float], probe: Mapping[str, float], speeds: Mapping[str, float]) -> dict[str, float]:
    """Step 2 above: the quotas that turn probe timings into the target speed ratios (pure)."""
    out = {}
    for tier, q in probe.items():
        target = times["cloud"] * speeds["cloud"] / speeds[tier]
        out[tier] = round(min(MAX_QUOTA, max(MIN_QUOTA, q * times[tier] / target)), 4)
    return out


def ratios(profile: Any) -> dict[str, float]:
    """Measured speeds relative to the device (device = 1)."""
    dev = seconds_per_sample(profile, "device")
    return {t: round(dev / seconds_per_sample(profile, t), 2) for t in ("device", "edge", "cloud")}


def calibrate(model: str, batch: int, work: Path, *,
              speeds: Mapping[str, float] = SPEEDS) -> tuple[dict[str, float], Path, dict[str, Any]]:
    """Quotas for edge and device, the profile measured under them, and a record of the calibration."""
    from hiertrain.profile import Profile

    probe_path = work / f"probe-{model}.json"
    for tier in ("cloud", *PROBE):
        profile_tier(model, batch, probe_path, tier, quota=PROBE.get(tier))
    probe = Profile.load(probe_path)
    times = {t: seconds_per_sample(probe, t) for t in ("cloud", *PROBE)}
    quotas = quotas_for(times, PROBE, speeds)
    final = work / f"profile-{model}.json"
    final.write_text(probe_path.read_text())
    for tier in PROBE:
        profile_tier(model, batch, final, tier, quota=quotas[tier])
    prof = Profile.load(final)
    record = {"target_speeds": dict(speeds), "probe_quotas": dict(PROBE),
              "probe_ms_per_sample": {t: round(1e3 * v, 3) for t, v in times.items()},
              "quotas": quotas, "ms_per_sample": {t: round(1e3 * seconds_per_sample(prof, t), 3) for t in prof.tiers},
              "measured_speeds": ratios(prof)}
    return quotas, final, record
