"""A tier service's configuration (TOML), shared by device, edge and cloud.

::

    job = "demo"
    [broker]
    credentials = "broker/credentials/device.json"
    [train]                       # the same on every tier
    model = "lenet5"              # one of the zoo's, or your own: "path/to/model.onnx" (hiertrain model import)
    batch = 32
    optimizer = "sgd"             # or "adamw"
    lr = 0.05
    seed = 0                      # initial weights and batch order
    iterations = 100              # the device runs this many iterations, then stops every tier
    timeout_s = 60                # longest wait for any one message
    [runtime]
    threads = 0                   # ORT intra-op threads (0: all cores)
    cache = "~/.cache/hiertrain"  # built segments
    segments = "segments-lenet5"  # optional: `hiertrain segments build` output copied here (no builder needed)
    chunk_kb = 256                # MQTT frame size
    kernel_dilation = 3.6         # emulation only: every kernel run stretched to this many times its seconds
    [checkpoint]                  # written by whichever tier plays worker_o, every N iterations
    dir = "checkpoints"
    every = 10
    keep = 3                      # the newest 3 kept
    collect = true                # on one tier: every checkpoint comes here, wherever worker_o runs
    [data]                        # the device's data
    dataset = "synthetic"         # or "cifar10", "tiny-imagenet", "npz", "images", "csv" (with path = ...),
                                  # "python" (with entry = "module:function", path optional)
    label = "species"             # csv: the label column (default: label/class/target/y, the one column of words, the last)
    shard = [0, 4]                # a fleet device's part: every 4th sample from the 1st (emulating devices that share a set)
    [eval]                        # `hiertrain evaluate`: where the data set has no test split,
    holdout = 256                 # its first N samples, which the device then never trains on
    every = 10                    # the model's owner: held-out accuracy every N steps, in its telemetry
    samples = 128                 # ... on at most this many held-out samples (default 512)
    [profile]                     # published (retained) for the planner
    file = "profile-device.json"
    [fleet]                       # a fleet: enrolled devices (credentials from `broker add-device NAME`),
    file = "fleet.toml"           # the edge's: the devices it plans (`hiertrain plan-fleet`'s file)
    devices = 3                   # the edge's: how many devices to wait for before the first step
    log = "fleet-log.jsonl"       # the edge's: one line per step, who trained which samples
    policy = "hiertrain"          # the edge's: or a baseline: edgesplit, all-local, all-edge, all-cloud, ...
    planner = "broker/credentials/planner.json"  # the edge's: publishes each plan on the schedule topic
    sync = { every = 4 }          # the edge's: "exact" (default), or the devices' own copies averaged every
                                  # K steps (periodic sync), or { up_to = K }: the planner picks K <= this
    samples = 8                   # a device's: with [profile] file, it publishes its profile and joins on its
    rate_mbps = 10                # own with this many samples per step, over a radio of this rate,
    private = true                # its raw samples never leaving it (the fleet file may override each)
    [energy]                      # joules per step in telemetry, and a device's energy budget
    source = "auto"               # rapl, pmic (Pi 5), jetson (jetson-stats), model, or auto: the first there
    power = "pi4"                 # the power model's device class (pi3, pi4, pi5, jetson, server; default by
    busy_w = 6.8                  # tier) and any of its figures: idle_w, busy_w, tx_nj_per_bit, rx_nj_per_bit
    budget_j = 5.0                # a device's: the most joules it may spend per step (the planner keeps to it)
    battery = "/sys/class/power_supply/BAT0/capacity"  # a device's: below low_pct percent,
    low_pct = 20                  # its budget becomes low_budget_j (re-planned within two steps)
    low_budget_j = 2.0
    budget_w = 4.0                # a device's: the most watts it may draw on average over training (its
    low_budget_w = 3.0            # watt-hours per hour; the step is paced to keep it), and while low
    [hierarchy]                   # a hierarchical job (several edge sites, their brokers bridged to the cloud's)
    site = "lab1"                 # the edge's: its site (its broker bridges as bridge-lab1)
    sites = ["lab1", "lab2"]      # the cloud's averager: the sites it averages
    every = 20                    # both: the sites' models are averaged every K2 steps (and after the last)
    wait_s = 60                   # both: how long a site waits for the average, the averager for the sites
    log = "average-log.jsonl"     # the averager's: one line per round, the sites in it
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

from hiertrain import MAX_BATCH, TIERS, config
from hiertrain.errors import ConfigError, HiertrainError
from hiertrain.train.optim import OptimizerConfig
from hiertrain.train.hierarchy import DEFAULT_WAIT_S, Hierarchy
from hiertrain.train.periodic import Sync
from hiertrain.net.transport import Endpoint


@dataclass(frozen=True)
class TierConfig:
    tier: str
    job: str
    endpoint: Endpoint
    model: str
    batch: int
    optimizer: OptimizerConfig
    seed: int = 0
    iterations: int = 100
    timeout_s: float = 60.0
    threads: int = 0
    kernel_dilation: float = 1.0        # an emulated device's kernels (hiertrain.lab.emulation)
    cache: Optional[Path] = None
    segments_dir: Optional[Path] = None
    chunk_bytes: int = 256 << 10
    checkpoint_dir: Optional[Path] = None
    checkpoint_every: int = 0
    checkpoint_keep: int = 3         # the newest N checkpoints kept in checkpoint_dir
    checkpoint_collect: bool = False  # every checkpoint comes here, wherever worker_o runs
    dataset: str = "synthetic"
    data_path: Optional[str] = None
    data_entry: Optional[str] = None  # dataset "python": module:function
    data_label: Optional[str] = None  # dataset "csv": the label column
    data_shard: Optional[tuple[int, int]] = None  # (i, n): this device trains every n-th sample from i
    compress_samples: bool = False  # uint8 samples travel losslessly compressed (hiertrain.net.compress)
    holdout: int = 0
    eval_every: int = 0  # the model's owner scores its weights on held-out samples every N steps, in telemetry
    eval_samples: int = 512  # ... on at most this many
    profile: Optional[dict[str, Any]] = None  # this tier's hiertrain-profile/1, published for the planner
    path: Optional[Path] = None
    fleet: bool = False                 # a [fleet] table: many enrolled devices, the clock at the edge
    fleet_file: Optional[Path] = None   # the edge's: the devices it may plan (hiertrain plan-fleet's file)
    fleet_devices: int = 1              # the edge waits for this many devices before the first step
    fleet_log: Optional[Path] = None    # the edge's: one JSON line per step (who trained which samples)
    fleet_policy: str = "hiertrain"     # the edge's: the fleet planner, or a baseline (plan-fleet lists them)
    fleet_planner: Optional[Endpoint] = None  # the edge's: the planner's account, to publish plans on the schedule topic
    fleet_join: Optional[dict[str, Any]] = None  # a device's: what it says of itself when it publishes its profile
    fleet_sync: Sync = Sync()           # the edge's: exact, or periodic sync of the devices' copies
    energy: Optional[Any] = None        # the [energy] table: hiertrain.meters.EnergyConfig
    hierarchy: Optional[Hierarchy] = None  # [hierarchy]: an edge site's, or the cloud averager's

    def load_data(self, spec: Any) -> Any:
        """The device's data set, checked against the model (shape, labels): one line if it does not fit."""
        from hiertrain.train import data

        ds = data.load(self.dataset, path=self.data_path, shape=spec.input_shape, classes=spec.classes,
                       seed=self.seed, entry=self.data_entry, label=self.data_label,
                       search=self.path.parent if self.path else None)
        try:
            data.check(ds, spec.input_shape, spec.classes, self.model)
        except ConfigError as exc:
            raise ConfigError(f"{self.path}: {exc}") from None
        return ds

    def training_data(self, spec: Any) -> Any:
        """What the device trains on: its data set less the ``[eval] holdout`` samples evaluate scores
        (the synthetic set has a held-out part of its own)."""
        ds = self.load_data(spec)
        ds = ds.split(self.holdout)[0] if self.holdout and self.dataset != "synthetic" else ds
        return ds.shard(*self.data_shard) if self.data_shard else ds


def _profile(path: Path, tier: str) -> dict[str, Any]:
    """The profile this tier publishes: it must hold this tier's timings (a wrong file is refused
    here, not discovered by the planner while the device waits)."""
    from hiertrain.profile import Profile

    profile = Profile.load(path)
    if tier not in profile.tiers:
        raise ConfigError(f"[profile] file {str(path)!r} has timings for {', '.join(sorted(profile.tiers)) or 'no tier'}, "
                          f"not the {tier}: make it with `hiertrain profile --tier {tier} ...` on this machine")
    return profile.to_json()


MAX_TIMEOUT_S = 7 * 24 * 3600.0
FRAME_HEADER_BYTES = 4096  # room for a frame's routing header and MQTT's own beside the chunk


def _energy(cfg: Any, tier: str, table: dict[str, Any]) -> Any:
    from hiertrain.meters import EnergyConfig

    try:
        return EnergyConfig.of(table, tier=tier, resolve=cfg.resolve)
    except ConfigError as exc:
        raise ConfigError(f"{cfg.path}: [energy] {exc}") from None


def _check_limits(c: TierConfig, path: Any) -> None:
    """Values that cannot work are refused here, in one line naming the value and the limit."""
    def bad(what: str) -> ConfigError:
        return ConfigError(f"{path}: {what}")

    if not 1 <= c.batch <= MAX_BATCH:
        raise bad(f"batch = {c.batch} is not in 1..{MAX_BATCH}")
    if c.iterations < 0:
        raise bad(f"iterations = {c.iterations} must be >= 0")
    if not 0 < c.timeout_s <= MAX_TIMEOUT_S:  # also refuses inf and nan
        raise bad(f"timeout_s = {c.timeout_s} must be a finite number of seconds in (0, {MAX_TIMEOUT_S:g}]")
    if c.holdout < 0:
        raise bad(f"[eval] holdout = {c.holdout} must be >= 0")
    if c.eval_every < 0:
        raise bad(f"[eval] every = {c.eval_every} must be >= 0 (0: never)")
    if c.eval_samples < 1:
        raise bad(f"[eval] samples = {c.eval_samples} must be >= 1")
    if c.threads < 0:
        raise bad(f"[runtime] threads = {c.threads} must be >= 0 (0: all cores)")
    if not 1.0 <= c.kernel_dilation <= 1000.0:
        raise bad(f"[runtime] kernel_dilation = {c.kernel_dilation} must be in 1..1000")
    if c.chunk_bytes < 1 << 10:
        raise bad(f"[runtime] chunk_kb = {c.chunk_bytes >> 10} must be >= 1")
    limit = c.endpoint.max_packet_bytes
    if limit and c.chunk_bytes + FRAME_HEADER_BYTES > limit:
        raise bad(f"[runtime] chunk_kb = {c.chunk_bytes >> 10} does not fit the broker's max_packet_size of "
                  f"{limit >> 10} KiB (at most {(limit - FRAME_HEADER_BYTES) >> 10})")
    if c.checkpoint_every < 0:
        raise bad(f"[checkpoint] every = {c.checkpoint_every} must be >= 0")
    if c.checkpoint_keep < 1:
        raise bad(f"[checkpoint] keep = {c.checkpoint_keep} must be >= 1")
    if c.checkpoint_collect and c.checkpoint_dir is None:
        raise bad("[checkpoint] collect = true needs a dir to collect into")
    if c.fleet and c.tier == "edge" and c.fleet_file is None:
        raise bad("[fleet] on the edge needs file = \"fleet.toml\": the devices it plans (hiertrain plan-fleet's file)")
    if c.fleet and c.tier == "edge":  # (the planner is the edge's: a device need not have it)
        from hiertrain.planner.fleetpolicies import POLICIES

        if c.fleet_policy not in POLICIES:
            raise bad(f"[fleet] policy = {c.fleet_policy!r}: expected one of {', '.join(POLICIES)}")
    if c.fleet_join is not None:
        if c.tier != "device":
            raise bad(f"[fleet] {', '.join(c.fleet_join)}: a device's keys (what it publishes to join), not the {c.tier}'s")
        if c.profile is None or "samples" not in c.fleet_join or "rate_mbps" not in c.fleet_join:
            raise bad("[fleet] samples, rate_mbps and a [profile] file go together: the profile a device publishes "
                      "to join on its own")
        if not 1 <= c.fleet_join["samples"] <= c.batch or not 0 < c.fleet_join["rate_mbps"] < float("inf"):
            raise bad(f"[fleet] samples = {c.fleet_join['samples']} must be in 1..{c.batch} ([train] batch) and "
                      f"rate_mbps = {c.fleet_join['rate_mbps']} > 0")
    if c.hierarchy is not None and c.tier == "edge" and not c.fleet:
        raise bad("[hierarchy] on the edge is a site of a hierarchical job: its fleet needs a [fleet] table")
    if c.fleet_sync.periodic and c.tier != "edge":
        raise bad(f"[fleet] sync is the edge's (its coordinator sends the devices what to do), not the {c.tier}'s")
    if c.fleet_devices < 1:
        raise bad(f"[fleet] devices = {c.fleet_devices} must be >= 1")
    if c.fleet and c.tier == "device" and c.endpoint.username in ("device", "edge", "cloud", "planner", "observer"):
        raise bad(f"[fleet]: a fleet device connects with its own account (hiertrain broker add-device NAME), "
                  f"not {c.endpoint.username!r}")
    if c.endpoint.job is not None and c.endpoint.job != c.job:
        raise bad(f"job = {c.job!r}, but the credentials serve only job {c.endpoint.job!r}")


def _hierarchy(cfg: Any, tier: str, t: dict[str, Any]) -> Hierarchy:
    """``[hierarchy]``: on an edge, its ``site`` and ``every`` (K2); on the cloud (the averager), the
    ``sites`` and ``every``; ``wait_s`` on both, ``log`` on the cloud's."""
    from hiertrain.errors import TopicError
    from hiertrain.net.topics import validate_site

    def bad(why: str) -> ConfigError:
        return ConfigError(f"{cfg.path}: [hierarchy] {why}")

    mine = {"edge": {"site", "every", "wait_s"}, "cloud": {"sites", "every", "wait_s", "log"}}.get(tier, set())
    extra = sorted(set(t) - mine)
    if extra:
        raise bad(f"{', '.join(extra)}: not the {tier}'s (an edge site has site, every, wait_s; the cloud's "
                  f"averager sites, every, wait_s, log)")
    if "every" not in t or t["every"] < 1:
        raise bad(f"every = {t.get('every')}: the steps between averages (K2 >= 1), the same on the sites and the cloud")
    if not 0 < t.get("wait_s", 1.0) <= MAX_TIMEOUT_S:
        raise bad(f"wait_s = {t['wait_s']} must be > 0")
    try:
        if tier == "edge":
            if "site" not in t:
                raise bad('needs site = "NAME": this edge server\'s site (its bridge account is bridge-NAME)')
            validate_site(t["site"])
        else:
            sites = t.get("sites")
            if not isinstance(sites, list) or not sites or len(set(map(str, sites))) != len(sites):
                raise bad(f"sites = {sites!r}: the edge sites to average, a list of distinct names")
            for s in sites:
                validate_site(s)
    except TopicError as exc:
        raise bad(str(exc)) from None
    return Hierarchy(site=t.get("site", ""), every=t["every"], sites=tuple(t.get("sites", ())),
                     wait_s=float(t.get("wait_s", DEFAULT_WAIT_S)),
                     log=str(cfg.resolve(t["log"])) if "log" in t else None)


def _sync(path: Any, value: Any) -> Sync:
    """``[fleet] sync``: "exact", ``{every = K}`` or ``{up_to = K}`` (K >= 1)."""
    if value == "exact":
        return Sync()
    if isinstance(value, dict) and len(value) == 1 and set(value) <= {"every", "up_to"}:
        (key, k), = value.items()
        if isinstance(k, int) and not isinstance(k, bool) and 1 <= k <= 10_000:
            return Sync(**{key: k})
    raise ConfigError(f'{path}: [fleet] sync = {value!r}: expected "exact", {{every = K}} or {{up_to = K}} '
                      f"with K an integer in 1..10000")


def _planner(cfg: Any, credentials: str) -> Endpoint:
    """The planner's account for the fleet's coordinator, on the edge's own broker (and standbys)."""
    ep = Endpoint.load(cfg.resolve(credentials))
    if ep.username != "planner":
        raise ConfigError(f"{cfg.path}: [fleet] planner = {credentials!r} holds the {ep.username!r} account's "
                          f"credentials, not the planner's (only the planner may publish schedules)")
    edge = cfg.endpoint
    return replace(ep, host=edge.host, port=edge.port, standby=edge.standby, tls_ca=edge.tls_ca or ep.tls_ca)


def _shard(value: Any, path: Any) -> Optional[tuple[int, int]]:
    if value is None:
        return None
    if not (isinstance(value, list) and len(value) == 2 and all(type(v) is int for v in value)
            and 0 <= value[0] < value[1]):
        raise ConfigError(f"{path}: [data] shard = {value!r} is not [i, n] with 0 <= i < n")
    return value[0], value[1]


def _model(cfg: Any, name: str) -> str:
    """A zoo model's name, or a model file's path resolved against the config's folder."""
    from hiertrain.train.models import is_file

    return str(cfg.resolve(name)) if is_file(name) else name


TABLES: dict[str, dict[str, config.Kind]] = {
    "train": {"model": str, "batch": int, "optimizer": str, "lr": float, "weight_decay": float, "seed": int,
              "iterations": int, "timeout_s": float},
    "runtime": {"threads": int, "cache": str, "segments": str, "chunk_kb": int, "kernel_dilation": float},
    "checkpoint": {"dir": str, "every": int, "keep": int, "collect": bool},
    "data": {"dataset": str, "path": str, "entry": str, "label": str, "shard": list, "compress": bool},
    "eval": {"holdout": int, "every": int, "samples": int},
    "profile": {"file": str},
    "fleet": {"file": str, "devices": int, "log": str, "policy": str, "planner": str, "sync": "any",
              "samples": int, "rate_mbps": float, "private": bool},
    "hierarchy": {"site": str, "every": int, "wait_s": float, "sites": list, "log": str},
    "energy": {"source": str, "power": str, "idle_w": float, "busy_w": float, "tx_nj_per_bit": float,
               "rx_nj_per_bit": float, "budget_j": float, "battery": str, "low_pct": float, "low_budget_j": float,
               "budget_w": float, "low_budget_w": float},
}
"""A tier config's tables and their keys: anything else is refused at load, naming it."""


def load(tier: str, path: str | os.PathLike) -> TierConfig:
    if tier not in TIERS:
        raise ConfigError(f"unknown tier {tier!r}")
    cfg = config.load(path).only_tables(TABLES)
    train, rt, ck, data, ev, prof, fleet, hier, energy = (cfg.table(name, keys) for name, keys in TABLES.items())

    try:
        optimizer = OptimizerConfig(train.get("optimizer", "sgd"), lr=train.get("lr", 0.05),
                                    weight_decay=train.get("weight_decay", 0.0))
    except Exception as exc:
        raise ConfigError(f"{cfg.path}: {exc}") from None
    out = TierConfig(
        tier=tier, job=cfg.job, endpoint=cfg.endpoint,
        model=_model(cfg, train.get("model", "lenet5")), batch=train.get("batch", 32), optimizer=optimizer,
        seed=train.get("seed", 0), iterations=train.get("iterations", 100), timeout_s=train.get("timeout_s", 60.0),
        threads=rt.get("threads", 0), kernel_dilation=rt.get("kernel_dilation", 1.0),
        cache=cfg.resolve(rt["cache"]) if "cache" in rt else None,
        segments_dir=cfg.resolve(rt["segments"]) if "segments" in rt else None,
        chunk_bytes=rt.get("chunk_kb", 256) << 10,
        checkpoint_dir=cfg.resolve(ck["dir"]) if "dir" in ck else None,
        checkpoint_every=ck.get("every", 0), checkpoint_keep=ck.get("keep", 3),
        checkpoint_collect=ck.get("collect", False),
        dataset=data.get("dataset", "synthetic"),
        data_path=str(cfg.resolve(data["path"])) if "path" in data else None,
        data_entry=data.get("entry"), data_label=data.get("label"),
        data_shard=_shard(data.get("shard"), cfg.path), compress_samples=data.get("compress", False),
        holdout=ev.get("holdout", 0), eval_every=ev.get("every", 0),
        eval_samples=ev.get("samples", 512), path=cfg.path,
        profile=_profile(cfg.resolve(prof["file"]), tier) if "file" in prof else None,
        fleet="fleet" in cfg.raw, fleet_file=cfg.resolve(fleet["file"]) if "file" in fleet else None,
        fleet_devices=fleet.get("devices", 1),
        fleet_log=cfg.resolve(fleet["log"]) if "log" in fleet else None,
        fleet_policy=fleet.get("policy", "hiertrain"),
        fleet_sync=_sync(cfg.path, fleet.get("sync", "exact")),
        fleet_planner=_planner(cfg, fleet["planner"]) if "planner" in fleet else None,
        fleet_join={k: fleet[k] for k in ("samples", "rate_mbps", "private") if k in fleet} or None,
        energy=_energy(cfg, tier, energy),
        hierarchy=_hierarchy(cfg, tier, hier) if "hierarchy" in cfg.raw else None,
    )
    _check_limits(out, cfg.path)
    from hiertrain.train import models

    try:
        models.get(out.model)  # unknown model, or one that cannot be trained: a clear error now, not at the first iteration
    except HiertrainError as exc:
        raise ConfigError(f"{cfg.path}: [train] model: {exc}") from None
    if out.segments_dir is not None and not (out.segments_dir / "manifest.json").is_file():
        raise ConfigError(f"{cfg.path}: [runtime] segments = {str(out.segments_dir)!r} holds no manifest.json "
                          f"(write one with `hiertrain segments build --model {out.model} --out DIR`)")
    return out
