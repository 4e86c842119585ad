"""The MQTT topic tree of a hiertrain job: builders and a parser that validate.

::

    hiertrain/<job>/schedule                              retained JSON, planner only
    hiertrain/<job>/<account>/status                      retained JSON, Last Will "offline"
    hiertrain/<job>/<account>/telemetry                   JSON: link rates, phase times
    hiertrain/<job>/<account>/profile                     retained JSON hiertrain-profile/1 (a tier's, or a
                                                          fleet device's to join: with a "fleet" object)
    hiertrain/<job>/<sender>/<kind>/<dest>/<layer>        framed tensors (hiertrain.net.wire)
    hiertrain/<job>/sync/up/<site>                        a hierarchical job: an edge site's model for the
    hiertrain/<job>/sync/down                             cloud's average, and the average (framed tensors); the
                                                          only topics a bridge between an edge site's
                                                          broker and the cloud's carries (broker.mosquitto)

``<kind>`` is one of :data:`TENSOR_KINDS` or :data:`SERVICE_KINDS` (``segreq``/``segment``: a
built segment asked of and sent by a builder tier, :mod:`hiertrain.train.artifacts`; ``checkpoint``:
a checkpoint pushed to the collecting tier, or asked back for a resume, :mod:`hiertrain.train.collect`);
``<layer>`` the unit index the tensor belongs to (the cut for activations and their gradients, the unit for weights and weight gradients,
0 for samples and labels). Every account publishes only below ``hiertrain/+/<account>/``,
which is what the broker's ACL enforces; the schedule topic is the planner's alone.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Union

from hiertrain import ACCOUNTS, TIERS
from hiertrain.errors import TopicError

ROOT = "hiertrain"
TENSOR_KINDS: tuple[str, ...] = ("samples", "act", "grad", "wgrad", "weights")
SERVICE_KINDS: tuple[str, ...] = ("segreq", "segment",  # built segments for tiers that cannot build (artifacts)
                                  "checkpoint")  # checkpoints collected in one place, fetched back to resume (collect)
MESSAGE_KINDS: tuple[str, ...] = TENSOR_KINDS + SERVICE_KINDS
ACCOUNT_KINDS: tuple[str, ...] = ("status", "telemetry", "profile")
MAX_LAYER = 100_000
_JOB = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
_LAYER = re.compile(r"(0|[1-9][0-9]{0,5})\Z")


def validate_job(job: object) -> str:
    """Return ``job`` if it is a valid job id, else raise :class:`TopicError`."""
    if not isinstance(job, str) or not _JOB.match(job):
        raise TopicError(
            f"bad job id {job!r}: use 1-64 characters from A-Z a-z 0-9 _ . - "
            "starting with a letter or digit"
        )
    return job


def validate_tier(tier: object, *, what: str = "tier") -> str:
    if tier not in TIERS:
        raise TopicError(f"bad {what} {tier!r}: expected one of {', '.join(TIERS)}")
    return tier  # type: ignore[return-value]


_DEVICE = re.compile(r"[a-z][a-z0-9_-]{0,31}\Z")


def validate_device_name(name: object) -> str:
    """An enrolled device's account name (``broker add-device``): its own topics are under it."""
    if (not isinstance(name, str) or not _DEVICE.match(name) or name in ACCOUNTS or name in ("schedule", "sync")
            or name.startswith(BRIDGE)):
        raise TopicError(f"bad device name {name!r}: use 1-32 characters from a-z 0-9 _ - starting with a "
                         f"letter, other than {', '.join(ACCOUNTS)}, sync, and not starting with {BRIDGE}")
    return name


BRIDGE = "bridge-"  # an edge site's bridge account on the cloud's broker: bridge-<site>


def validate_site(site: object) -> str:
    """An edge site's name in a hierarchical job (its bridge account is ``bridge-<site>``)."""
    if not isinstance(site, str) or not _DEVICE.match(site) or len(site) > 32 - len(BRIDGE):
        raise TopicError(f"bad site name {site!r}: use 1-{32 - len(BRIDGE)} characters from a-z 0-9 _ - "
                         f"starting with a letter")
    return site


def sync_up(job: str, site: str) -> str:
    """Where edge site ``site`` publishes its model for the cloud's average (bridged out)."""
    return f"{ROOT}/{validate_job(job)}/sync/up/{validate_site(site) if site != '+' else site}"


def sync_down(job: str) -> str:
    """Where the cloud publishes the average, retained (bridged in to every site)."""
    return f"{ROOT}/{validate_job(job) if job != '+' else job}/sync/down"


def validate_account(account: object, *, enrolled: bool = False) -> str:
    """One of the job's fixed accounts, or (``enrolled``) an enrolled device's name."""
    if account in ACCOUNTS:
        return account  # type: ignore[return-value]
    if enrolled and isinstance(account, str) and _DEVICE.match(account) and account not in ("schedule", "sync"):
        return account
    raise TopicError(f"bad account {account!r}: expected one of {', '.join(ACCOUNTS)}"
                     + (" or an enrolled device's name" if enrolled else ""))


def validate_layer(layer: object) -> int:
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer <= MAX_LAYER:
        raise TopicError(f"bad layer {layer!r}: expected an integer in 0..{MAX_LAYER}")
    return layer


def validate_party(party: object, *, what: str = "tier") -> str:
    """Who may send or receive tensors: a tier, or (in a fleet) an enrolled device's name."""
    if party in TIERS or isinstance(party, str) and _DEVICE.match(party) and party not in ACCOUNTS \
            and party != "schedule":
        return party  # type: ignore[return-value]
    raise TopicError(f"bad {what} {party!r}: expected one of {', '.join(TIERS)} or an enrolled device's name")


@dataclass(frozen=True)
class TensorTopic:
    """``hiertrain/<job>/<sender>/<kind>/<dest>/<layer>``: tensors from one tier to another."""

    job: str
    sender: str
    kind: str
    dest: str
    layer: int

    def __post_init__(self) -> None:
        validate_job(self.job)
        validate_party(self.sender, what="sender")
        if self.kind not in MESSAGE_KINDS:
            raise TopicError(f"bad tensor kind {self.kind!r}: expected one of {', '.join(MESSAGE_KINDS)}")
        validate_party(self.dest, what="destination")
        validate_layer(self.layer)

    def __str__(self) -> str:
        return f"{ROOT}/{self.job}/{self.sender}/{self.kind}/{self.dest}/{self.layer}"


@dataclass(frozen=True)
class AccountTopic:
    """``hiertrain/<job>/<account>/<kind>`` for status, telemetry and profiles."""

    job: str
    account: str
    kind: str

    def __post_init__(self) -> None:
        validate_job(self.job)
        validate_account(self.account, enrolled=True)
        if self.kind not in ACCOUNT_KINDS:
            raise TopicError(f"bad topic kind {self.kind!r}: expected one of {', '.join(ACCOUNT_KINDS)}")

    def __str__(self) -> str:
        return f"{ROOT}/{self.job}/{self.account}/{self.kind}"


@dataclass(frozen=True)
class ScheduleTopic:
    """``hiertrain/<job>/schedule``: the planner's retained, versioned schedule."""

    job: str

    def __post_init__(self) -> None:
        validate_job(self.job)

    def __str__(self) -> str:
        return f"{ROOT}/{self.job}/schedule"


@dataclass(frozen=True)
class SyncTopic:
    """``hiertrain/<job>/sync/up/<site>`` (a site's model, ``site`` set) or ``hiertrain/<job>/sync/down``
    (the cloud's average): a hierarchical job's only topics across the bridges."""

    job: str
    site: str = ""  # "": the average, down

    def __post_init__(self) -> None:
        validate_job(self.job)
        if self.site:
            validate_site(self.site)

    def __str__(self) -> str:
        return sync_up(self.job, self.site) if self.site else sync_down(self.job)


Topic = Union[TensorTopic, AccountTopic, ScheduleTopic, SyncTopic]


def tensor(job: str, sender: str, kind: str, dest: str, layer: int) -> str:
    return str(TensorTopic(job, sender, kind, dest, layer))


def schedule(job: str) -> str:
    return str(ScheduleTopic(job))


def status(job: str, account: str) -> str:
    return str(AccountTopic(job, account, "status"))


def telemetry(job: str, account: str) -> str:
    return str(AccountTopic(job, account, "telemetry"))


def profile(job: str, account: str) -> str:
    """A tier's profile, or an enrolled fleet device's (:mod:`hiertrain.edge.roster`)."""
    return str(AccountTopic(job, validate_party(account, what="profile's account"), "profile"))


def inbox(job: str, party: str) -> str:
    """The subscription filter for every tensor addressed to ``party`` (a tier or an enrolled device)."""
    return f"{ROOT}/{validate_job(job)}/+/+/{validate_party(party)}/+"


def all_of_kind(job: str, kind: str) -> str:
    """The filter for one account-topic kind (``status``, ``telemetry``, ``profile``) of all accounts."""
    if kind not in ACCOUNT_KINDS:
        raise TopicError(f"bad topic kind {kind!r}: expected one of {', '.join(ACCOUNT_KINDS)}")
    return f"{ROOT}/{validate_job(job)}/+/{kind}"


def writable_by(account: str, job: str = "+") -> list[str]:
    """The topic filters ``account`` may publish to (the broker's ACL is built from this); ``job``
    binds the account to one job (``+``: any). An enrolled device publishes under its own name."""
    validate_account(account, enrolled=True)
    job = job if job == "+" else validate_job(job)
    if account == "observer":
        return []
    if account.startswith(BRIDGE):  # an edge site's bridge, on the cloud's broker: its site's model only
        return [f"{ROOT}/{job}/sync/up/{validate_site(account[len(BRIDGE):])}"]
    own = [f"{ROOT}/{job}/{account}/#"]
    if account == "edge":  # a site's coordinator: its model up, for the cloud's average
        return own + [f"{ROOT}/{job}/sync/up/+"]
    if account == "cloud":  # the averager: the average down
        return own + [sync_down(job)]
    return own + [f"{ROOT}/{job}/schedule"] if account == "planner" else own


BROKER_COUNTERS = "$SYS/broker/#"  # Mosquitto's counters, every ``sys_interval`` s (broker/mosquitto.py)


def readable_by(account: str, job: str = "+") -> list[str]:
    """The topic filters ``account`` may read: what its role needs, nothing else (a tier never
    sees another tier's samples, activations or weights); an enrolled device reads as the device."""
    validate_account(account, enrolled=True)
    job = job if job == "+" else validate_job(job)
    common = [f"{ROOT}/{job}/schedule", f"{ROOT}/{job}/+/status", f"{ROOT}/{job}/+/telemetry"]
    if account == "observer":  # everything but tensors, and the broker's own counters (its load)
        return common + [f"{ROOT}/{job}/+/profile", BROKER_COUNTERS]
    if account == "planner":
        return common + [f"{ROOT}/{job}/+/profile"]
    if account.startswith(BRIDGE):
        return [sync_down(job)]
    inbox = common + [f"{ROOT}/{job}/+/+/{account}/+"]
    if account == "edge":
        return inbox + [sync_down(job)]
    if account == "cloud":
        return inbox + [f"{ROOT}/{job}/sync/up/+"]
    return inbox


def parse(topic: str) -> Topic:
    """Parse a concrete topic name; raise :class:`TopicError` naming what is wrong."""
    if not isinstance(topic, str):
        raise TopicError(f"topic must be a string, not {type(topic).__name__}")
    parts = topic.split("/")
    if parts[0] != ROOT:
        raise TopicError(f"topic {topic!r} is not under {ROOT}/")
    try:
        if len(parts) == 3 and parts[2] == "schedule":
            return ScheduleTopic(parts[1])
        if parts[2:] == ["sync", "down"]:
            return SyncTopic(parts[1])
        if len(parts) == 5 and parts[2:4] == ["sync", "up"]:
            return SyncTopic(parts[1], parts[4])
        if len(parts) == 4:
            return AccountTopic(parts[1], parts[2], parts[3])
        if len(parts) == 6:
            if not _LAYER.match(parts[5]):
                raise TopicError(f"bad layer {parts[5]!r}")
            return TensorTopic(parts[1], parts[2], parts[3], parts[4], int(parts[5]))
    except TopicError as exc:
        raise TopicError(f"topic {topic!r}: {exc}") from None
    raise TopicError(f"topic {topic!r} has {len(parts)} levels; not a hiertrain topic")
