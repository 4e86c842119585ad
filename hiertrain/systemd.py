"""systemd units for the long-running services (broker, tiers, planner)."""

from __future__ import annotations

import os
import pwd
import shlex
import sys
from pathlib import Path

from hiertrain.errors import ConfigError

DEFAULT_UNIT_DIR = Path("/etc/systemd/system")


def unit_text(*, description: str, argv: list[str], user: str, workdir: Path) -> str:
    return "\n".join([
        "[Unit]",
        f"Description={description}",
        "After=network-online.target",
        "Wants=network-online.target",
        "",
        "[Service]",
        "Type=simple",
        f"User={user}",
        f"WorkingDirectory={workdir}",
        f"ExecStart={shlex.join(argv)}",
        "Restart=on-failure",
        "RestartSec=3",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
        "",
    ])


def owner(path: Path) -> str:
    return pwd.getpwuid(path.stat().st_uid).pw_name


def install(name: str, *, description: str, subcommand: list[str], owned: Path,
            unit_dir: Path = DEFAULT_UNIT_DIR) -> Path:
    """Write ``hiertrain-<name>.service`` running ``hiertrain <subcommand>`` as the owner of ``owned``."""
    if not unit_dir.is_dir() or not os.access(unit_dir, os.W_OK):
        raise ConfigError(f"cannot write units to {unit_dir}; pass --unit-dir or run as root")
    exe = Path(sys.executable).with_name("hiertrain")
    argv = [str(exe if exe.exists() else Path(sys.executable)), *([] if exe.exists() else ["-m", "hiertrain"]),
            *subcommand]
    unit = unit_dir / f"hiertrain-{name}.service"
    unit.write_text(unit_text(description=description, argv=argv, user=owner(owned),
                              workdir=owned if owned.is_dir() else owned.parent))
    return unit
