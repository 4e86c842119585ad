"""CPU quotas with cgroup v1 (``/sys/fs/cgroup/cpu``): emulate a slower machine for processes we start.

Used by the profiler (``--cpu-quota``) and the testbed. A :class:`CpuQuota` creates its own group,
moves only the pids it is given (children we started) into it, and removes the group on exit.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional

from hiertrain.errors import ConfigError

ROOT = Path("/sys/fs/cgroup/cpu")
PERIOD_US = 2_000  # short periods: throttling looks like a slower CPU, not like stalls
MIN_QUOTA_US = 1_000  # the kernel's floor


def available() -> Optional[str]:
    """``None`` if quotas can be set here, else why not."""
    if os.geteuid() != 0:
        return "CPU quotas need root (cgroup v1 under /sys/fs/cgroup/cpu)"
    if not (ROOT / "cpu.cfs_quota_us").exists():
        return f"no cgroup v1 cpu controller at {ROOT}"
    return None


class CpuQuota:
    """A cgroup limiting its processes to ``cores`` CPUs' worth of time (e.g. 0.25)."""

    def __init__(self, cores: float, *, name: Optional[str] = None) -> None:
        why = available()
        if why:
            raise ConfigError(why)
        self.path = ROOT / (name or f"hiertrain-{os.getpid()}-{time.monotonic_ns()}")
        self.path.mkdir()
        try:
            self.set(cores)
        except ConfigError:
            self.path.rmdir()
            raise

    def set(self, cores: float) -> None:
        """Change the quota; effective at once for the processes inside."""
        if not 0.01 <= cores <= os.cpu_count():  # type: ignore[operator]
            raise ConfigError(f"CPU quota {cores} must be between 0.01 and {os.cpu_count()} cores")
        period = max(PERIOD_US, int(MIN_QUOTA_US / cores) + 1)
        try:
            (self.path / "cpu.cfs_quota_us").write_text("-1")  # lift first: the period may shrink below the quota
            (self.path / "cpu.cfs_period_us").write_text(str(period))
            (self.path / "cpu.cfs_quota_us").write_text(str(int(cores * period)))
        except OSError as exc:
            raise ConfigError(f"cannot set a CPU quota of {cores} cores: {exc}") from None
        self.cores = cores

    def add(self, pid: int) -> None:
        (self.path / "cgroup.procs").write_text(str(pid))

    def close(self) -> None:
        """Move any processes still inside back to the root group, then remove the group."""
        if not self.path.exists():
            return
        for pid in (self.path / "cgroup.procs").read_text().split():
            try:
                (ROOT / "cgroup.procs").write_text(pid)
            except OSError:
                pass  # it exited meanwhile
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.02)  # the kernel frees the group a moment after its last task leaves
        raise ConfigError(f"could not remove cgroup {self.path}")

    def __enter__(self) -> "CpuQuota":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
