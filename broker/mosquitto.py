"""Mosquitto for a broker directory: its configuration file and command line."""

from __future__ import annotations

import os
import pwd
import shutil
from pathlib import Path
from typing import Optional

from hiertrain.broker.layout import BrokerDir, Settings, _write_private
from hiertrain.errors import BrokerError
from hiertrain.net import topics

READY = " running"
PID_FILE = "mosquitto.pid"  # "mosquitto version 2.0.11 running", logged once every listener is open


def executable() -> Optional[str]:
    """The Mosquitto binary, or ``None`` when it is not installed."""
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.access(p, os.X_OK)), None)


def config_text(bdir: BrokerDir, settings: Settings) -> str:
    lines = [
        "# Written by hiertrain from broker.json; edit that and restart, not this file.",
        "per_listener_settings false",
        "allow_anonymous false",
        f"password_file {bdir.passwd}",
        f"acl_file {bdir.acl}",
        "persistence true",
        f"persistence_location {bdir.data}/",
        "autosave_interval 5",  # retained schedule and statuses survive a crash, at most 5 s old
        f"max_packet_size {settings.max_packet_bytes}",
        "max_queued_messages 100000",
        "max_inflight_messages 0",
        "set_tcp_nodelay true",
        "sys_interval 2",  # $SYS/broker/# (the observer's to read): the broker's load, fresh every 2 s
        # Stay the user who started us (mosquitto would otherwise switch from root to "mosquitto",
        # which cannot read the private files of this directory).
        f"user {pwd.getpwuid(os.getuid()).pw_name}",
        f"pid_file {bdir.root / PID_FILE}",  # `broker add-device` finds it to reload the accounts
        "log_dest stderr",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "log_type information",
        "connection_messages true",
        "",
        f"listener {settings.port} {settings.bind}",
    ]
    if settings.tls_cert:
        lines += [f"certfile {settings.tls_cert}", f"keyfile {settings.tls_key}", f"cafile {settings.tls_ca}"]
    if settings.bridge:
        lines += ["", *bridge_text(settings)]
    return "\n".join(lines) + "\n"


def bridge_text(settings: Settings) -> list[str]:
    """Mosquitto's own bridge from an edge site's broker to the cloud's: it carries this site's model
    out and the average in, and nothing else (every other topic stays on the site); it logs in as
    the site's bridge account, which the cloud's ACL holds to those two topics; TLS when the
    credentials name a CA."""
    to = settings.bridge_endpoint()
    prefix = f"{topics.ROOT}/{settings.job}/"
    lines = [f"connection hiertrain-{settings.job}-{settings.site}",
             f"address {to.host}:{to.port}",
             f"remote_username {to.username}",
             f"remote_password {to.password}",
             f"remote_clientid hiertrain-bridge-{settings.job}-{settings.site}",
             "bridge_protocol_version mqttv311",
             "cleansession false",   # queued both ways across a WAN outage
             "notifications false",  # no $SYS state topics: the cloud's ACL would refuse them anyway
             "try_private true",
             "restart_timeout 1 10",
             f"topic sync/up/{settings.site} out 1 {prefix} {prefix}",
             f"topic sync/down in 1 {prefix} {prefix}"]
    if to.tls_ca:
        lines.append(f"bridge_cafile {to.tls_ca}")
    return lines


def write_config(bdir: BrokerDir, port: Optional[int] = None) -> Settings:
    settings = bdir.with_port(port)
    _write_private(bdir.conf, config_text(bdir, settings))  # (a bridge's password is in it)
    return settings


def command(bdir: BrokerDir) -> list[str]:
    exe = executable()
    if exe is None:
        raise BrokerError("mosquitto is not installed (apt-get install -y mosquitto); "
                          "`hiertrain broker start --embedded` runs the pure-Python fallback")
    return [exe, "-c", str(bdir.conf)]


def reload(bdir: BrokerDir) -> Optional[int]:
    """Ask the Mosquitto running for ``bdir`` to re-read its password file and ACL (SIGHUP: no
    restart, connected clients stay); its pid, or None when none runs for this directory."""
    import signal

    try:
        pid = int((bdir.root / PID_FILE).read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return None
    if str(bdir.conf).encode() not in cmdline:  # a stale pid file: that process is not our broker
        return None
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        return None
    except PermissionError:
        raise BrokerError(f"the broker (pid {pid}) runs as another user: run this as that user or root") from None
    return pid
