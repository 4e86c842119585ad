"""Where the broker is and who we are to it: one credentials file per account (``hiertrain broker
add-*`` writes them), with the standby brokers a connection moves to when its broker is gone."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from hiertrain.errors import ConfigError


@dataclass(frozen=True)
class Endpoint:
    """Where the broker is and who we are to it (one credentials file per account)."""

    host: str
    port: int
    username: str
    password: str
    tls_ca: Optional[str] = None
    max_packet_bytes: Optional[int] = None  # the broker's limit, when its credentials file says
    job: Optional[str] = None               # the one job the account may serve, when bound
    standby: tuple[str, ...] = ()           # "host:port" of standby brokers with the same accounts

    def __post_init__(self) -> None:
        if not self.host or not isinstance(self.port, int) or not 0 < self.port < 65536:
            raise ConfigError(f"bad broker address {self.host!r}:{self.port!r}")
        self.brokers()  # standby addresses checked here, once

    def brokers(self) -> list[tuple[str, int]]:
        """The broker, then its standbys, as (host, port)."""
        out = [(self.host, self.port)]
        for addr in self.standby:
            host, _, port = str(addr).rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ConfigError(f"bad standby broker address {addr!r}: expected host:port")
            out.append((host, int(port)))
        return out

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Endpoint":
        try:
            data = json.loads(Path(path).read_text())
            return cls(**{k: data[k] for k in ("host", "port", "username", "password")},
                       tls_ca=data.get("tls_ca"), max_packet_bytes=data.get("max_packet_bytes"), job=data.get("job"),
                       standby=tuple(data.get("standby", ())))
        except FileNotFoundError:
            raise ConfigError(f"credentials file {str(path)!r} does not exist") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"credentials file {str(path)!r} is not valid: {exc}") from None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"
