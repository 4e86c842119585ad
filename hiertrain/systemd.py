"""systemd units for the long-running services (broker, tiers, planner), hardened.

Every unit runs as an unprivileged user (never root: a unit for root is refused), with no new
privileges, a read-only view of the system (``ProtectSystem=strict``) but for the service's own
directory (configs, credentials, segment cache, checkpoints, broker data), a private /tmp, no
devices, no capabilities, system calls limited to what services use; tiers and the planner start
after the broker, and a tier restarted after a failure resumes from the newest checkpoint
(``--resume`` starts from iteration 0 where there is none). ``systemd-analyze security`` rates
each of them below 5.0 ("OK").
"""

from __future__ import annotations

import os
import pwd
import shlex
import sys
from pathlib import Path
from typing import Optional

from hiertrain.errors import ConfigError

DEFAULT_UNIT_DIR = Path("/etc/systemd/system")
BROKER_UNIT = "hiertrain-broker.service"
HARDENING = [
    "NoNewPrivileges=yes",
    "ProtectSystem=strict",
    "ProtectHome=read-only",
    "PrivateTmp=yes",
    "PrivateDevices=yes",
    "ProtectKernelTunables=yes",
    "ProtectKernelModules=yes",
    "ProtectKernelLogs=yes",
    "ProtectControlGroups=yes",
    "ProtectClock=yes",
    "ProtectHostname=yes",
    "ProtectProc=invisible",
    "ProcSubset=pid",
    "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
    "RestrictNamespaces=yes",
    "RestrictRealtime=yes",
    "RestrictSUIDSGID=yes",
    "LockPersonality=yes",
    "RemoveIPC=yes",
    "CapabilityBoundingSet=",
    "AmbientCapabilities=",
    "SystemCallArchitectures=native",
    "SystemCallFilter=@system-service",
    "SystemCallFilter=~@privileged @resources",
    "UMask=0077",
]


def unit_text(*, description: str, argv: list[str], user: str, workdir: Path,
              after_broker: bool = True, writable: Optional[list[Path]] = None) -> str:
    after = "network-online.target" + (f" {BROKER_UNIT}" if after_broker else "")
    return "\n".join([
        "[Unit]",
        f"Description={description}",
        f"After={after}",
        "Wants=network-online.target",
        "",
        "[Service]",
        "Type=simple",
        f"User={user}",
        f"WorkingDirectory={workdir}",
        f"Environment=HIERTRAIN_CACHE={workdir / '.hiertrain-cache'}",  # built segments, inside what it may write
        f"ExecStart={shlex.join(argv)}",
        "Restart=on-failure",
        "RestartSec=3",
        f"ReadWritePaths={' '.join(str(p) for p in (writable or [workdir]))}",
        *HARDENING,
        "",
        "[Install]",
        "WantedBy=multi-user.target",
        "",
    ])


def owner(path: Path) -> str:
    return pwd.getpwuid(path.stat().st_uid).pw_name


def install(name: str, *, description: str, subcommand: list[str], owned: Path,
            unit_dir: Path = DEFAULT_UNIT_DIR, user: Optional[str] = None) -> Path:
    """Write ``hiertrain-<name>.service`` running ``hiertrain <subcommand>`` as ``user`` (default:
    the owner of ``owned``, which must not be root)."""
    if not unit_dir.is_dir() or not os.access(unit_dir, os.W_OK):
        raise ConfigError(f"cannot write units to {unit_dir}; pass --unit-dir or run as root")
    user = user or owner(owned)
    try:
        uid = pwd.getpwnam(user).pw_uid
    except KeyError:
        raise ConfigError(f"no user {user!r}; create one (useradd --system --home-dir {owned.parent} {user})") from None
    if uid == 0:
        raise ConfigError(f"refusing a unit that runs as root: create a user (useradd --system hiertrain), give it "
                          f"{owned if owned.is_dir() else owned.parent} (chown -R), or pass --user")
    exe = Path(sys.executable).with_name("hiertrain")
    argv = [str(exe if exe.exists() else Path(sys.executable)), *([] if exe.exists() else ["-m", "hiertrain"]),
            *subcommand]
    unit = unit_dir / f"hiertrain-{name}.service"
    workdir = owned if owned.is_dir() else owned.parent
    unit.write_text(unit_text(description=description, argv=argv, user=user, workdir=workdir,
                              after_broker=name != "broker"))
    return unit
