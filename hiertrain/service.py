"""What every service of a job opens the same way, the three-tier tiers (:mod:`hiertrain.tier`) and
the fleet's (:mod:`hiertrain.fleetservice`): a connection under its account that refuses what a
message of this model cannot be, the segments (built here or fetched from a builder), and the
check that no tensor it sends is NaN or infinite (divergence ends the run where it happens,
naming it, instead of a receiver dropping the message and waiting); and the checkpoint keeper
(:class:`hiertrain.train.collect.Keeper`), a collector's flag in its status.
"""

from __future__ import annotations

import time
from typing import Any, NamedTuple, Optional

import numpy as np

from hiertrain import TIERS
from hiertrain.errors import Diverged
from hiertrain.net.transport import Transport
from hiertrain.net.validate import max_message_bytes, non_finite, validator
from hiertrain.tierconfig import TierConfig
from hiertrain.train import artifacts, collect
from hiertrain.train.models import ModelSpec
from hiertrain.train.runtime import Runtime


class Opened(NamedTuple):
    transport: Transport
    supply: artifacts.Supply
    runtime: Runtime


def open_service(cfg: TierConfig, spec: ModelSpec, *, account: str,
                 peers: Optional[frozenset[str]] = frozenset(TIERS)) -> Opened:
    """``peers``: whose statuses count (see :class:`~hiertrain.net.transport.Transport`): the three tiers
    unless said otherwise; a fleet's coordinator follows every enrolled device (``None``)."""
    transport = Transport(cfg.endpoint, account=account, job=cfg.job, chunk_bytes=cfg.chunk_bytes,
                          validator=validator(spec, cfg.batch), max_message_bytes=max_message_bytes(spec, cfg.batch),
                          expire_s=max(60.0, 2 * cfg.timeout_s), peers=peers)
    supply = artifacts.Supply(transport, directory=cfg.segments_dir, timeout=cfg.timeout_s)
    runtime = Runtime(threads=cfg.threads, root=cfg.cache / "segments" if cfg.cache else None, provider=supply.provider,
                      dilation=cfg.kernel_dilation)
    return Opened(transport, supply, runtime)


LINK_OF = {frozenset(("device", "edge")): "device_edge", frozenset(("edge", "cloud")): "edge_cloud",
           frozenset(("device", "cloud")): "device_cloud"}  # through the edge: the slower link's rate


def tier_of(account: str) -> str:
    """The tier an account is on: a fleet's devices have names of their own, a standby edge ``edge-*``."""
    return account if account in TIERS else "edge" if account.startswith("edge") else "device"


def transport_figures(transport: Transport, account: str) -> dict[str, Any]:
    """What every service's telemetry says of its transport: each link's rate measured on what it
    received since the last report (Mbit/s, payload), bytes and messages both ways, and the messages
    it refused, by reason."""
    links = {}
    for sender, mbps in transport.take_rates().items():
        link = LINK_OF.get(frozenset((tier_of(sender), tier_of(account))))
        if link:
            links[link] = round(mbps, 3)
    return {"t": time.time(), "links": links, "bytes_sent": transport.sent_bytes,
            "bytes_received": transport.received_bytes, "messages_sent": transport.sent_messages,
            "messages_received": transport.received_messages, "dropped": dict(transport.dropped)}


def check_finite(who: str, at: str, kind: str, dest: str, tensors: dict[str, np.ndarray], lr: float) -> None:
    """Raise :class:`Diverged` if a tensor about to be sent is not finite (``at``: "at iteration 7", "in round 3")."""
    for name, t in tensors.items():
        why = non_finite(f"{kind} {name} to {dest}", t)
        if why:
            raise Diverged(f"{who}: training diverged {at} ({why}); lower the learning rate (now {lr})")


def keeper_for(cfg: TierConfig, transport: Transport, spec: ModelSpec) -> collect.Keeper:
    """The checkpoint keeper: it stores, collects (``[checkpoint] collect``, said in our status),
    answers fetches and announces each checkpoint it stores."""
    if cfg.checkpoint_collect:
        transport.status_extra["collector"] = True
    return collect.Keeper(transport, spec, cfg.checkpoint_dir, keep=cfg.checkpoint_keep, collect=cfg.checkpoint_collect,
                          on_stored=lambda it: transport.announce(checkpoint_iteration=it))
