"""An emulated arm64 machine (a Raspberry Pi's CPU) for running a tier on an x86-64 host.

A Debian arm64 root file system whose programs run under qemu user-mode emulation:

- built once with ``debootstrap --foreign`` (download and unpack only: the second stage, which
  configures the packages under emulation, takes minutes and is not needed to run Python),
  plus the Debian packages of Python 3.11 unpacked with ``dpkg-deb``; cached in a directory the
  user chooses (``HIERTRAIN_ARM64_ROOT``, default ``~/.cache/hiertrain/arm64-rootfs``);
- Python packages installed from their aarch64 *wheels* by the host's pip (``--platform``), so
  nothing is compiled or installed under emulation;
- a process started with :meth:`Arm64Root.python` runs ``qemu-aarch64-static`` inside the root,
  in a private mount namespace (``unshare -m``) where ``/proc``, ``/dev`` and the given
  host directories are visible: nothing it mounts outlives it, and binfmt_misc is left alone.

Root is required (chroot, mount). It shares the host's network, so it reaches a broker on loopback.
Use it for correctness, never for timing: an emulated LeNet-5 step is ~55x slower than native.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterable, Optional

from hiertrain.errors import ConfigError

SUITE = "bookworm"           # Python 3.11, as the cp311 wheels need
PYTHON = "/usr/bin/python3.11"
QEMU = "qemu-aarch64-static"
SITE = "/opt/hiertrain-site"
PLATFORM = ["--platform", "manylinux_2_28_aarch64", "--only-binary=:all:", "--python-version", "3.11",
            "--implementation", "cp", "--abi", "cp311"]


def default_root() -> Path:
    return Path(os.environ.get("HIERTRAIN_ARM64_ROOT", Path.home() / ".cache" / "hiertrain" / "arm64-rootfs"))


def missing_tools() -> list[str]:
    """What this host lacks to build or run the emulated machine (empty if nothing)."""
    out = [t for t in ("debootstrap", "dpkg-deb", "unshare", "chroot", QEMU) if shutil.which(t) is None]
    if os.geteuid() != 0:
        out.append("root (chroot and mount)")
    return out


def _run(cmd: list[str], what: str) -> None:
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode:
        raise ConfigError(f"{what} failed ({proc.returncode}): {proc.stdout.strip()[-600:]}")


class Arm64Root:
    def __init__(self, path: Optional[Path] = None, *,
                 mirror: str = os.environ.get("HIERTRAIN_DEBIAN_MIRROR", "http://deb.debian.org/debian")) -> None:
        self.path = Path(path or default_root())
        self.mirror = mirror

    def ensure(self) -> "Arm64Root":
        """Build the root file system unless the cache holds it."""
        if (self.path / PYTHON.lstrip("/")).exists() and (self.path / "usr/bin" / QEMU).exists():
            return self
        missing = missing_tools()
        if missing:
            raise ConfigError(f"the emulated arm64 machine needs {', '.join(missing)} "
                              f"(apt-get install debootstrap qemu-user-static)")
        tmp = self.path.with_name(self.path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.parent.mkdir(parents=True, exist_ok=True)
        _run(["debootstrap", "--arch=arm64", "--foreign", "--variant=minbase", "--include=python3,libgomp1",
              SUITE, str(tmp), self.mirror], "debootstrap (arm64, first stage)")
        for deb in sorted((tmp / "var/cache/apt/archives").glob("*.deb")):  # what the second stage would install
            _run(["dpkg-deb", "-x", str(deb), str(tmp)], f"unpacking {deb.name}")
        shutil.copy2(shutil.which(QEMU), tmp / "usr/bin" / QEMU)
        shutil.rmtree(self.path, ignore_errors=True)
        os.rename(tmp, self.path)
        return self

    def install(self, requirements: Iterable[str]) -> None:
        """Install ``requirements`` (e.g. ``hiertrain-*.whl[device]``) from aarch64 wheels, with the
        host's pip, into a fresh site directory of the root."""
        site = self.path / SITE.lstrip("/")
        shutil.rmtree(site, ignore_errors=True)
        _run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--target", str(site),
              *PLATFORM, *requirements], "pip install (aarch64 wheels)")

    def python(self, binds: Iterable[Path] = ()) -> list[str]:
        """The command that runs the emulated Python (append its arguments) with ``binds`` visible
        at the same paths inside."""
        root = shlex.quote(str(self.path))
        # No /sys: onnxruntime's cpuinfo, seeing the host's x86 CPU lists there and in /proc/cpuinfo,
        # crashes the emulated process; without them it warns and uses defaults.
        lines = ["set -e", f"R={root}", 'mount -t proc proc "$R/proc"', 'mount --rbind /dev "$R/dev"',
                 'mount -t tmpfs tmpfs "$R/tmp"']  # mount points made in /tmp vanish with the process
        for b in binds:
            q = shlex.quote(str(Path(b).resolve()))
            lines += [f'mkdir -p "$R"{q}', f'mount --bind {q} "$R"{q}']
        lines.append(f'exec env PYTHONPATH={SITE} HOME=/root chroot "$R" /usr/bin/{QEMU} {PYTHON} "$@"')
        return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", "\n".join(lines), "arm64"]
