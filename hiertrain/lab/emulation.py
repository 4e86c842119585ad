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

A quota slows everything a tier does alike: its kernels and its Python (paho's packet handling, our
dispatcher). But the paper's cloud is fast because of its GPU, which does not speed up its Python, and
a Raspberry Pi's interpreter is about as far behind an x86 core as its kernels are behind the edge's.
So with ``interpreter`` ratios (:data:`INTERPRETER`, ``bench testbed --interpreter-ratios``) the device
and the edge are each emulated in two parts (:func:`split`):

- a CPU quota of ``1 / interpreter`` cores, for its interpreter;
- a *kernel dilation* for the rest of its kernels' slowdown, which step 1 measures as before. Every
  ORT run is stretched by a sleep (:class:`hiertrain.train.runtime.Segment`).

**Interpreter ratios** are seconds of the same pure-Python workload, alexdedyura/cpu-benchmark
(github.com/alexdedyura/cpu-benchmark; the workload is unchanged since 2021), against this machine. One
core here (AMD EPYC, CPython 3.11.7) takes 16.34 s a run, measured with that workload, between an
i7-1165G7 at 16.885 s and an EPYC 4244P at 13.985 s (the README's table). The published runs:

- Raspberry Pi 3 B+ (1.4 GHz, CPython 3.11.2): 245 s (the repository's issue 20), 15.0x;
- Raspberry Pi 3 B (the paper's device, 1.2 GHz): that scaled by clock, 17.5x;
- Raspberry Pi 4: 79.216 s (the README), 4.85x;
- Jetson Nano (Cortex-A57, 1.43 GHz): no published run was found. It is taken as 1.2 Pi 4s, 5.8x (an
  estimate: its single-thread ncnn CNN latencies are 1.19x a Pi 4's, Tencent/ncnn benchmark/README.md);
- the paper's edge, one core of an i3-7100U (2.4 GHz, no turbo): the i3-8100's 30.636 s (same core,
  3.6 GHz) scaled by clock, 2.8x.

**Kernel ratios** stay the paper's (``SPEEDS``: device 1 : edge 4 : cloud 40). ncnn's published CNN
latencies corroborate the device : edge part. Over its fp32 models, a Pi 3 B+ on its four cores is a
geometric-mean 8.3x slower than one i7-7700K core at 4.5 GHz. The i3-7100U runs at 2.4 GHz on the same
core design, which makes the Pi 3 B+ about 4.4x slower than it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping, Optional

from hiertrain.errors import ConfigError

SPEEDS = {"device": 1.0, "edge": 4.0, "cloud": 40.0}
INTERPRETER = {"pi3": 17.5, "pi3b+": 15.0, "pi4": 4.85, "jetson": 5.8, "i3-7100u": 2.8}  # see above
PAPER_INTERPRETER = f"{INTERPRETER['pi3']}:{INTERPRETER['i3-7100u']}"  # device (Pi 3 B) : edge (i3-7100U)
THREADS = {"cloud": 0, "edge": 1, "device": 1}  # ORT intra-op threads per tier (0 = every core)
PROBE = {"edge": 0.5, "device": 0.2}
MIN_QUOTA, MAX_QUOTA = 0.01, 1.0
# The quotas `bench testbed` calibrated for LeNet-5 on these machines (stop 12): fixed references for
# the benchmarks that scale a measurement to the emulated Pi 3 and edge without calibrating again
REFERENCE_QUOTAS = {"device": 0.0233, "edge": 0.1125}


def parse_interpreter(text: str) -> dict[str, float]:
    """``"17.5:2.8"`` -> how many times slower than a core here the device's and the edge's Python are."""
    try:
        values = [float(x) for x in text.split(":")]
    except ValueError:
        values = []
    if len(values) != 2 or not all(v >= 1 for v in values):
        raise ConfigError(f"interpreter ratios must be two numbers >= 1, device:edge (like 17.5:2.8), got {text!r}")
    return dict(zip(("device", "edge"), values))


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
                 repeat: int = 3, dilation: float = 1.0) -> Path:
    """Profile one emulated tier into ``out`` (merged with the tiers already there)."""
    extra = ["--threads", str(THREADS[tier])] if THREADS[tier] else []
    extra += ["--cpu-quota", str(quota)] if quota else []
    extra += ["--kernel-dilation", str(dilation)] if dilation > 1 else []
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


def split(kernel_quota: float, interpreter: Optional[float]) -> tuple[float, float]:
    """(CPU quota, kernel dilation) of a device whose kernels the quota ``kernel_quota`` emulates and
    whose interpreter is ``interpreter`` times slower than one core here: the quota that slows the
    interpreter so much (1 / interpreter), and the dilation that slows its kernels the rest of the way
    (pure). A device whose interpreter is no faster than its kernels keeps the kernel quota alone."""
    if not interpreter:
        return kernel_quota, 1.0
    quota = min(MAX_QUOTA, 1.0 / interpreter)
    if quota <= kernel_quota:
        return kernel_quota, 1.0
    return round(quota, 4), round(quota / kernel_quota, 3)


def calibrate(model: str, batch: int, work: Path, *, speeds: Mapping[str, float] = SPEEDS,
              interpreter: Optional[Mapping[str, float]] = None) -> tuple[dict[str, float], Path, dict[str, Any]]:
    """Quotas for edge and device, the profile measured under them, and a record of the calibration.
    With ``interpreter`` (per tier, its Python interpreter that many times slower than a core here),
    a tier's kernels and its interpreter are emulated apart (:func:`split`): the record's
    ``dilation`` is each tier's kernel dilation."""
    from hiertrain.profile import Profile

    probe_path = work / f"probe-{model}.json"
    for tier in ("cloud", *PROBE):
        profile_tier(model, batch, probe_path, tier, quota=PROBE.get(tier))
    probe = Profile.load(probe_path)
    times = {t: seconds_per_sample(probe, t) for t in ("cloud", *PROBE)}
    kernel_quotas = quotas_for(times, PROBE, speeds)
    quotas, dilation = dict(kernel_quotas), {}
    for tier in PROBE:
        quotas[tier], dilation[tier] = split(kernel_quotas[tier], (interpreter or {}).get(tier))
    final = work / f"profile-{model}.json"
    final.write_text(probe_path.read_text())
    for tier in PROBE:
        profile_tier(model, batch, final, tier, quota=quotas[tier], dilation=dilation[tier])
    prof = Profile.load(final)
    record = {"target_speeds": dict(speeds), "probe_quotas": dict(PROBE),
              "probe_ms_per_sample": {t: round(1e3 * v, 3) for t, v in times.items()},
              "quotas": quotas, "ms_per_sample": {t: round(1e3 * seconds_per_sample(prof, t), 3) for t in prof.tiers},
              "measured_speeds": ratios(prof)}
    if interpreter:
        record.update(interpreter_ratios=dict(interpreter), kernel_quotas=kernel_quotas, dilation=dilation)
    return quotas, final, record
