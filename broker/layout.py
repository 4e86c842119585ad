"""The broker directory: settings, accounts, password file, ACL and credentials.

``hiertrain broker init --dir D`` writes::

    D/broker.json              settings (advertised host, port, bind address, TLS, packet limit)
    D/passwd                   Mosquitto password file, PBKDF2-SHA512 ($7$), one line per account
    D/acl                      each account publishes only below hiertrain/<job>/<account>/ (the
                               planner also the schedule) and reads only what its role needs
    D/credentials/<acct>.json  what a tier needs to connect (hiertrain.net.transport.Endpoint)
    D/credentials/observer-mosquitto/mosquitto_sub
                               the read-only observer's options for mosquitto_sub (XDG_CONFIG_HOME)
    D/mosquitto.conf           written by broker.mosquitto from the settings
    D/data/                    Mosquitto persistence (sessions, retained schedule)

The same files drive the embedded fallback broker (broker.embedded).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional, Sequence

from hiertrain import ACCOUNTS
from hiertrain.net import topics
from hiertrain.errors import BrokerError
from hiertrain.net.transport import Endpoint

DEFAULT_PORT = 1883
DEFAULT_MAX_PACKET = 16 << 20
_PBKDF2_ITERATIONS = 101  # what mosquitto_passwd 2.0 writes


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    bind: str = "0.0.0.0"
    max_packet_bytes: int = DEFAULT_MAX_PACKET
    tls_cert: Optional[str] = None
    tls_key: Optional[str] = None
    tls_ca: Optional[str] = None
    job: Optional[str] = None  # the one job the accounts serve (None: any job, for trusted jobs only)
    # a hierarchical job's edge site: this broker bridges its site's sync topics to the cloud's broker,
    # connecting with the credentials file `broker add-site` wrote there (bridge-<site>.json)
    site: Optional[str] = None
    bridge: Optional[str] = None

    def __post_init__(self) -> None:
        if self.job is not None:
            try:
                topics.validate_job(self.job)
            except topics.TopicError as exc:
                raise BrokerError(str(exc)) from None
        if self.bridge is not None:
            self.bridge_endpoint()  # checked here, once
        if not 0 < self.port < 65536:
            raise BrokerError(f"port {self.port} is not in 1..65535")
        if self.max_packet_bytes < 1 << 20 or self.max_packet_bytes > 268_435_455:
            raise BrokerError(f"max packet size {self.max_packet_bytes} must be in 1 MiB..256 MiB")
        tls = (self.tls_cert, self.tls_key, self.tls_ca)
        if any(tls) and not all(tls):
            raise BrokerError("TLS needs all of --tls-cert, --tls-key and --tls-ca")
        for path in filter(None, tls):
            if not Path(path).is_file():
                raise BrokerError(f"TLS file {path!r} does not exist")


    def bridge_endpoint(self) -> Endpoint:
        """The cloud's broker and this site's bridge account on it; :class:`BrokerError` in one line."""
        from hiertrain.errors import ConfigError

        if self.job is None or self.site is None:
            raise BrokerError("a bridge belongs to one job's edge site: the broker needs --job and --site")
        try:
            topics.validate_site(self.site)
            endpoint = Endpoint.load(self.bridge)
        except (topics.TopicError, ConfigError, OSError) as exc:
            raise BrokerError(f"bridge credentials {self.bridge}: {exc}") from None
        want = f"{topics.BRIDGE}{self.site}"
        if endpoint.username != want or endpoint.job != self.job:
            raise BrokerError(f"bridge credentials {self.bridge} are {endpoint.username!r} for job {endpoint.job!r}, "
                              f"not {want!r} for job {self.job!r}: run `hiertrain broker add-site --site {self.site}` "
                              f"on the cloud's broker and use the file it writes")
        return endpoint


def password_hash(password: str, *, salt: Optional[bytes] = None) -> str:
    """A Mosquitto 2.0 ``$7$`` (PBKDF2-SHA512) password hash."""
    salt = salt if salt is not None else os.urandom(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, _PBKDF2_ITERATIONS)
    return f"$7${_PBKDF2_ITERATIONS}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def password_matches(password: str, hashed: str) -> bool:
    try:
        _, kind, iterations, salt, digest = hashed.split("$")
        if kind != "7":
            return False
        got = hashlib.pbkdf2_hmac("sha512", password.encode(), base64.b64decode(salt), int(iterations))
        return hmac.compare_digest(base64.b64encode(got).decode(), digest)
    except (ValueError, TypeError):
        return False


def read_password_file(path: str | os.PathLike) -> dict[str, str]:
    """user -> hash, from a Mosquitto password file."""
    lines = Path(path).read_text().splitlines()
    return dict(line.split(":", 1) for line in lines if ":" in line)


def acl_text(job: Optional[str] = None, devices: Sequence[str] = ()) -> str:
    """Per account: write only its own topics, read only what its role needs; ``job`` binds every
    account to that job's tree. ``devices``: the enrolled devices, each an account of its own."""
    lines = [f"# hiertrain ACL for {'job ' + job if job else 'any job'}: least privilege per account."]
    for account in (*ACCOUNTS, *devices):
        lines += ["", f"user {account}"]
        lines += [f"topic read {f}" for f in topics.readable_by(account, job or "+")]
        lines += [f"topic write {f}" for f in topics.writable_by(account, job or "+")]
    return "\n".join(lines) + "\n"


class BrokerDir:
    """Paths and contents of one broker directory."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root).resolve()
        self.settings_file = self.root / "broker.json"
        self.passwd = self.root / "passwd"
        self.acl = self.root / "acl"
        self.credentials = self.root / "credentials"
        self.conf = self.root / "mosquitto.conf"
        self.data = self.root / "data"
        self.observer_options = self.credentials / "observer-mosquitto"  # XDG_CONFIG_HOME for mosquitto_sub

    def credentials_file(self, account: str) -> Path:
        return self.credentials / f"{topics.validate_account(account, enrolled=True)}.json"

    def devices(self) -> list[str]:
        """The enrolled devices (``add-device``): the password file's accounts beyond the fixed ones."""
        return sorted(a for a in read_password_file(self.passwd) if a not in ACCOUNTS)

    def add_device(self, name: str) -> Path:
        """Enrol a device: its own account and credentials file, and its lines in the ACL (it publishes
        only under its own name and reads what the device reads). Returns the credentials file."""
        try:
            topics.validate_device_name(name)
        except topics.TopicError as exc:
            raise BrokerError(str(exc)) from None
        return self._enrol(name)

    def _enrol(self, name: str) -> Path:
        """An account beyond the fixed ones (a device, a site's bridge): password, credentials, ACL."""
        settings = self.settings()
        users = read_password_file(self.passwd)
        if name in users:
            raise BrokerError(f"{name!r} is already enrolled in {self.root} (remove-device it first to "
                              f"give it new credentials)")
        password = secrets.token_urlsafe(18)
        _write_private(self.passwd, "".join(f"{a}:{h}\n" for a, h in {**users, name: password_hash(password)}.items()))
        self._write_credentials(name, password, settings)
        self.acl.write_text(acl_text(settings.job, self.devices()))
        return self.credentials_file(name)

    def add_site(self, site: str) -> Path:
        """On the cloud's broker of a hierarchical job: an edge site's bridge account (``bridge-<site>``),
        which may publish only its site's model and read only the average. Returns its credentials
        file, which the site's broker bridges with (``broker bridge``)."""
        try:
            topics.validate_site(site)
        except topics.TopicError as exc:
            raise BrokerError(str(exc)) from None
        if self.settings().job is None:
            raise BrokerError(f"{self.root} serves any job: a site's bridge needs a broker bound to one (init --job)")
        return self._enrol(f"{topics.BRIDGE}{site}")

    def remove_device(self, name: str) -> None:
        """Withdraw a device's account, ACL lines and credentials file."""
        users = read_password_file(self.passwd)
        if name in ACCOUNTS or name not in users:
            raise BrokerError(f"no enrolled device {name!r} in {self.root} (enrolled: {', '.join(self.devices()) or 'none'})")
        settings = self.settings()
        del users[name]
        _write_private(self.passwd, "".join(f"{a}:{h}\n" for a, h in users.items()))
        self.acl.write_text(acl_text(settings.job, self.devices()))
        self.credentials_file(name).unlink(missing_ok=True)

    def settings(self) -> Settings:
        if not self.settings_file.is_file():
            raise BrokerError(f"{self.root} is not a broker directory; run `hiertrain broker init --dir {self.root}`")
        try:
            return Settings(**json.loads(self.settings_file.read_text()))
        except (ValueError, TypeError) as exc:
            raise BrokerError(f"{self.settings_file} is not valid: {exc}") from None

    def init(self, settings: Settings, *, force: bool = False) -> None:
        """Create accounts with fresh random passwords and write every file."""
        if self.settings_file.exists() and not force:
            raise BrokerError(f"{self.root} already holds a broker; pass --force to replace its accounts")
        self.root.mkdir(parents=True, exist_ok=True)
        self.credentials.mkdir(exist_ok=True)
        self.data.mkdir(exist_ok=True)
        passwords = {a: secrets.token_urlsafe(18) for a in ACCOUNTS}
        _write_private(self.passwd, "".join(f"{a}:{password_hash(p)}\n" for a, p in passwords.items()))
        self.acl.write_text(acl_text(settings.job))
        for account, password in passwords.items():
            self._write_credentials(account, password, settings)
        self.save(settings)

    def save(self, settings: Settings) -> None:
        """Record ``settings`` and bring the credentials' address in line with them."""
        self.settings_file.write_text(json.dumps(asdict(settings), indent=2) + "\n")
        for account in (*ACCOUNTS, *(self.devices() if self.passwd.exists() else ())):
            path = self.credentials_file(account)
            if path.exists():
                self._write_credentials(account, Endpoint.load(path).password, settings)

    def with_port(self, port: Optional[int]) -> Settings:
        """The settings, with ``port`` recorded if one is given."""
        settings = self.settings()
        if port is not None and port != settings.port:
            settings = replace(settings, port=port)
            self.save(settings)
        return settings

    def _write_credentials(self, account: str, password: str, settings: Settings) -> None:
        endpoint = Endpoint(settings.host, settings.port, account, password, tls_ca=settings.tls_ca,
                            max_packet_bytes=settings.max_packet_bytes, job=settings.job)
        _write_private(self.credentials_file(account), endpoint.to_json())
        if account == "observer":  # mosquitto_sub reads its options from $XDG_CONFIG_HOME/mosquitto_sub
            self.observer_options.mkdir(exist_ok=True)
            tls = [f"--cafile {settings.tls_ca}"] if settings.tls_ca else []
            _write_private(self.observer_options / "mosquitto_sub",
                           "\n".join([f"-h {settings.host}", f"-p {settings.port}", "-u observer", f"-P {password}",
                                      *tls]) + "\n")


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
