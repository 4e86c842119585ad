"""Service configuration files (TOML): which job, which broker, as whom.

Every long-running service (tiers, planner, ``schedule watch``) reads one file::

    job = "demo"

    [broker]
    credentials = "broker/credentials/device.json"   # relative to this file
    # or inline: host = "10.0.0.2", port = 1883, username = "device", password = "...", tls_ca = "..."
    standby = ["10.0.1.2:1883"]   # optional: brokers with the same accounts to move to when this one is gone

Sections for the service itself (``[train]``, ``[planner]`` ...) are kept in :attr:`ServiceConfig.raw`
and read through :meth:`ServiceConfig.table`, strictly: a key or table the service does not know, a
value of the wrong type or one that would be coerced with a loss (``batch = 3.9``, ``iterations =
true``, ``lr = "0.5"``) is refused in one line naming it.
"""

from __future__ import annotations

import difflib
import os
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Mapping, Union

from hiertrain.net import topics
from hiertrain.errors import ConfigError, TopicError
from hiertrain.net.transport import Endpoint

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass(frozen=True)
class ServiceConfig:
    path: Path
    job: str
    endpoint: Endpoint
    raw: dict[str, Any] = field(default_factory=dict)

    def section(self, name: str) -> dict[str, Any]:
        value = self.raw.get(name, {})
        if not isinstance(value, dict):
            raise ConfigError(f"{self.path}: [{name}] must be a table")
        return value

    def table(self, name: str, keys: Mapping[str, "Kind"]) -> dict[str, Any]:
        """Table ``[name]``, every key checked against ``keys`` (name -> kind): an unknown key or
        a value of another kind is refused, naming it. Missing keys are absent from the result."""
        return typed(self.section(name), keys, where=f"{self.path}: [{name}]")

    def only_tables(self, names: Iterable[str]) -> "ServiceConfig":
        """Refuse a top-level key or table that is not ``job``, ``[broker]`` or one of ``names``."""
        known = {"job", "broker", *names}
        for key in self.raw:
            if key not in known:
                what = f"[{key}]" if isinstance(self.raw[key], dict) else f"key {key!r}"
                raise ConfigError(f"{self.path}: unknown {what}{_hint(key, known)}; this file may hold "
                                  f"{', '.join(f'[{k}]' for k in sorted(known - {'job'}))} and job")
        return self

    def resolve(self, value: str) -> Path:
        """A path from the file, relative to the file's directory."""
        p = Path(os.path.expanduser(value))
        return p if p.is_absolute() else (self.path.parent / p).resolve()


Kind = Union[type, str]
"""What a key holds: ``int`` (not a bool, not 3.9), ``float`` (an int is taken), ``str``, ``bool``,
``list``, or ``"any"`` (checked by the caller)."""


def _hint(key: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def typed(table: Mapping[str, Any], keys: Mapping[str, Kind], *, where: str) -> dict[str, Any]:
    """``table``'s values, each of the kind ``keys`` names; unknown keys and other kinds refused."""
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false", list: "a list"}
    out: dict[str, Any] = {}
    for key, value in table.items():
        if key not in keys:
            raise ConfigError(f"{where} unknown key {key!r}{_hint(key, keys)}; known: {', '.join(sorted(keys))}")
        kind = keys[key]
        if kind == "any":
            out[key] = value
            continue
        ok = type(value) is kind or kind is float and type(value) is int
        if not ok:
            shown = f"{value!r}" if not isinstance(value, dict) else "a table"
            raise ConfigError(f"{where} {key} = {shown} is not {names[kind]}")  # type: ignore[index]
        out[key] = float(value) if kind is float else value
    return out


BROKER_KEYS: dict[str, Kind] = {"credentials": str, "host": str, "port": int, "username": str, "password": str,
                                "tls_ca": str, "standby": "any"}


def read_toml(path: Path, what: str = "config file") -> dict[str, Any]:
    """A TOML file's tables, or one line saying why not."""
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{what} {str(path)!r} does not exist") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{what} {str(path)!r} is not valid TOML: {exc}") from None


def load(path: str | os.PathLike) -> ServiceConfig:
    path = Path(path)
    raw = read_toml(path)
    try:
        job = topics.validate_job(raw.get("job"))
    except TopicError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    broker = raw.get("broker")
    if not isinstance(broker, dict):
        raise ConfigError(f"{path}: a [broker] table is required")
    typed(broker, BROKER_KEYS, where=f"{path}: [broker]")
    cfg = ServiceConfig(path.resolve(), job, _endpoint(path, broker), raw)
    return cfg


def _endpoint(path: Path, broker: dict[str, Any]) -> Endpoint:
    endpoint = _primary(path, broker)
    standby = broker.get("standby")
    if standby is None:
        return endpoint
    if not isinstance(standby, list) or not all(isinstance(a, str) for a in standby):
        raise ConfigError(f"{path}: [broker] standby must be a list of \"host:port\" strings, got {standby!r}")
    try:
        return replace(endpoint, standby=tuple(standby))
    except ConfigError as exc:
        raise ConfigError(f"{path}: [broker] {exc}") from None


def _primary(path: Path, broker: dict[str, Any]) -> Endpoint:
    if "credentials" in broker:
        creds = Path(os.path.expanduser(str(broker["credentials"])))
        endpoint = Endpoint.load(creds if creds.is_absolute() else path.parent / creds)
        return replace(endpoint, host=str(broker["host"])) if "host" in broker else endpoint  # e.g. another interface
    try:
        return Endpoint(str(broker["host"]), int(broker.get("port", 1883)), str(broker["username"]),
                        str(broker["password"]), tls_ca=broker.get("tls_ca"))
    except KeyError as exc:
        raise ConfigError(f"{path}: [broker] needs `credentials` or host/username/password ({exc} missing)") from None
