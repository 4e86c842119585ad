"""``hiertrain init DIR``: a new job's files for its three machines, and a README of what to run
on each (as ``flwr new`` starts a Flower project).

::

    DIR/README.md                   the commands, machine by machine
    DIR/edge/broker/                the job-bound broker (``broker init --job``)
    DIR/edge/edge.toml  edge.json   the edge service, its credentials
    DIR/edge/planner.toml planner.json
    DIR/cloud/cloud.toml cloud.json
    DIR/device/device.toml device.json

``hiertrain init DIR --devices N``: a fleet's instead, N devices each with its own account::

    DIR/edge/edge.toml fleet.toml   the coordinator and its (optional) overrides; planner.json
                                    publishes its plans on the schedule topic
    DIR/cloud/cloud.toml cloud.json the cloud worker, which publishes its timings
    DIR/device-1/device.toml device-1.json ...   each publishes its profile and joins

Each folder is copied to its machine as it is: configs name their credentials relative to
themselves, and every credentials file is readable by its owner only.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Optional

from hiertrain import MAX_BATCH, MODEL_NAMES, TIERS
from hiertrain.net import topics
from hiertrain.errors import ConfigError
from hiertrain.lab.cluster import toml

DATASETS = ("synthetic", "cifar10", "tiny-imagenet", "npz", "images", "csv")  # "python": entry = ... by hand
OWN_DATA = ("npz", "images", "csv")  # no test split of their own: the first HOLDOUT samples (shuffled) are held out
HOLDOUT = 64


def init(root: Path, *, job: str, host: str, port: int, bind: str, model: str, batch: int, iterations: int,
         lr: float, dataset: str, data_path: Optional[str], bw_device_edge: float, bw_edge_cloud: float,
         force: bool = False, devices: int = 0) -> list[Path]:
    """Write the job's files under ``root``; return the folders, one per machine. ``devices``: a
    fleet of that many devices (each trains ``batch // devices`` samples of every step)."""
    from hiertrain.broker.layout import BrokerDir, Settings
    from hiertrain.broker.mosquitto import write_config

    try:
        topics.validate_job(job)
    except topics.TopicError as exc:
        raise ConfigError(f"--job: {exc}") from None
    model_file = Path(model) if model.endswith(".onnx") else None
    if model_file is None and model not in MODEL_NAMES:
        raise ConfigError(f"--model {model!r} is neither one of {', '.join(MODEL_NAMES)} nor an .onnx file")
    if model_file is not None:
        from hiertrain.train import models

        models.get(str(model_file))  # a model that cannot be trained: refused now, with the reason
        model = model_file.name  # each machine's folder gets a copy
    if not 1 <= batch <= MAX_BATCH:
        raise ConfigError(f"--batch {batch} is not in 1..{MAX_BATCH}")
    if dataset not in DATASETS:
        raise ConfigError(f"--data {dataset!r} is not one of {', '.join(DATASETS)}")
    if dataset != "synthetic" and not data_path:
        raise ConfigError(f"--data {dataset} needs --data-path (where the data set is on the device)")
    if devices < 0 or devices and batch < devices:
        raise ConfigError(f"--devices {devices}: a fleet needs 1 to --batch ({batch}) devices, each with a sample "
                          f"of every step")
    if root.exists() and any(root.iterdir()) and not force:
        raise ConfigError(f"{root} is not empty; choose a new directory or pass --force")
    bdir = BrokerDir(root / "edge" / "broker")
    bdir.init(Settings(host=host, port=port, bind=bind, job=job), force=force)
    names = [f"device-{i}" for i in range(1, devices + 1)]
    for name in names:
        bdir.add_device(name)
    write_config(bdir)
    every = max(1, iterations // 10)
    train = {"model": model, "batch": batch, "lr": lr, "iterations": iterations, "timeout_s": 60}
    if devices:
        return _fleet(root, bdir, names, job=job, host=host, port=port, model=model, model_file=model_file,
                      train=train, every=every, dataset=dataset, data_path=data_path, bw_device_edge=bw_device_edge,
                      bw_edge_cloud=bw_edge_cloud)
    for tier in TIERS:
        folder = _machine(root / tier, bdir, tier, model_file, model)
        toml(folder / f"{tier}.toml", job, Path(f"{tier}.json"), {
            "train": train,
            "runtime": {"cache": "cache"},
            "checkpoint": {"every": every, "dir": "checkpoints", "keep": 3, **({"collect": True} if tier == "device" else {})},
            "profile": {"file": f"profile-{tier}.json"},
            **({"data": {"dataset": dataset, **({"path": data_path} if data_path else {})}} if tier == "device" else {}),
            **({"eval": {"holdout": HOLDOUT}} if tier == "device" and dataset in OWN_DATA else {}),
        })
    toml(root / "edge" / "planner.toml", job, Path("planner.json"), {
        "planner": {"batch": batch, "bw_device_edge": bw_device_edge, "bw_edge_cloud": bw_edge_cloud}})
    (root / "README.md").write_text(readme(job=job, host=host, port=port, model=model, batch=batch,
                                           iterations=iterations, every=every))
    return [root / t for t in TIERS]


def _machine(folder: Path, bdir: Any, account: str, model_file: Optional[Path], model: str) -> Path:
    """A machine's folder: its credentials (the edge's with the planner's), and the model file if it is one."""
    folder.mkdir(parents=True, exist_ok=True)
    if model_file is not None:
        shutil.copy2(model_file, folder / model)
    for creds in (account, "planner") if account == "edge" else (account,):
        shutil.copy2(bdir.credentials_file(creds), folder / f"{creds}.json")  # 0600, as written
    return folder


def _fleet(root: Path, bdir: Any, names: list[str], *, job: str, host: str, port: int, model: str,
           model_file: Optional[Path], train: dict[str, Any], every: int, dataset: str, data_path: Optional[str],
           bw_device_edge: float, bw_edge_cloud: float) -> list[Path]:
    """A fleet's folders: the edge's coordinator, the cloud worker, and a folder per device."""
    samples = train["batch"] // len(names)
    data = {"dataset": dataset, **({"path": data_path} if data_path else {})}
    folders = {"edge": root / "edge", "cloud": root / "cloud", **{n: root / n for n in names}}
    for account, folder in folders.items():
        _machine(folder, bdir, account, model_file, model)
        tier = account if account in TIERS else "device"
        sections: dict[str, dict[str, Any]] = {"train": train, "runtime": {"cache": "cache"}}
        if tier == "edge":
            sections["fleet"] = {"file": "fleet.toml", "devices": len(names), "log": "fleet-log.jsonl",
                                 "planner": "planner.json"}
            sections["checkpoint"] = {"every": every, "dir": "checkpoints", "keep": 3}
        elif tier == "cloud":
            sections["fleet"] = {}
            sections["profile"] = {"file": "profile-cloud.json"}
        else:
            sections["fleet"] = {"samples": samples, "rate_mbps": bw_device_edge, "private": False}
            sections["profile"] = {"file": "profile-device.json"}
            i = names.index(account)
            sections["data"] = {**data, **({"shard": [i, len(names)]} if dataset == "synthetic" else {})}
        toml(folder / f"{tier}.toml", job, Path(f"{account}.json"), sections)
    (root / "edge" / "fleet.toml").write_text(f"""\
# The fleet the edge's coordinator plans. Devices join on their own: each publishes its profile
# (its device.toml's [profile] file and [fleet] samples, rate_mbps, private).
profile = "profile-edge.json"  # the edge's timings; the cloud publishes its own
medium_mbps = {bw_device_edge:g}              # the shared device-edge medium
cloud_mbps = {bw_edge_cloud:g}               # the edge-cloud link

# Optional: the operator's word on a device overrides what it publishes, e.g.
# [[device]]
# name = "{names[0]}"
# private = true          # its raw samples never leave it
# rate_mbps = 2.5         # its radio, as measured
""")
    (root / "README.md").write_text(fleet_readme(job=job, host=host, port=port, model=model, samples=samples,
                                                 names=names, iterations=train["iterations"], every=every))
    return list(folders.values())


def _cloud_and_device(profile: str, model: str, device: str) -> str:
    """The README's sections for the cloud server and the device(s): the same in both kinds of job."""
    return f"""## 2. The cloud server, in `cloud/`

```bash
{profile} --tier cloud --out profile-cloud.json
hiertrain cloud run --config cloud.toml
```

## 3. {device}

```bash
{profile} --tier device --out profile-device.json
hiertrain device run --config device.toml
```

A device without the gradient builder (plain onnxruntime, a Raspberry Pi) profiles with graphs
built on the edge server: there, `hiertrain segments build --model {model} --out segments-{model}`;
copy `segments-{model}/` here and add `--segments segments-{model}` to the profile command. For
training it fetches what it needs from the edge over MQTT by itself."""


def fleet_readme(*, job: str, host: str, port: int, model: str, samples: int, names: list[str], iterations: int,
                 every: int) -> str:
    profile = f"hiertrain profile --model {model} --batch {samples}"
    return f"""# hiertrain fleet `{job}`

{model}, {len(names)} devices of {samples} samples each per step, {iterations} steps, trained across the
devices, an edge server and a cloud server: the edge's coordinator plans where each device's units
run (on it, on the edge, on the cloud) and every step equals single-process SGD over the samples
it names. The broker runs on the edge server; the others reach it at `{host}:{port}`.

Copy each folder to its machine as it is: `edge/` to the edge server, `cloud/` to the cloud server,
`device-1/` ... `device-{len(names)}/` to the devices. Each holds its service's config and its own
credentials (mode 0600: keep them so); a device publishes only under its own name.

Install: `pip install 'hiertrain[edge]'` on the edge server, `'hiertrain[cloud]'` on the cloud
server, `'hiertrain[device]'` on each device (plain onnxruntime, also on aarch64: it fetches the
segments it trains from the edge over MQTT).

## 1. The edge server, in `edge/`

```bash
hiertrain broker start --dir broker          # Mosquitto (or: hiertrain broker install-service --dir broker)
{profile} --tier edge --out profile-edge.json
hiertrain edge run --config edge.toml        # waits for {len(names)} devices and the cloud
```

The coordinator plans once {len(names)} devices and the cloud have published their profiles, and
again whenever one joins or leaves; each plan version is on the schedule topic. It checkpoints
every {every} steps in `edge/checkpoints/`; run it again with `--resume` to continue from the newest.

{_cloud_and_device(profile, model, "Each device, in its folder (`device-1/` here)")}

A device that comes later (enrolled with `hiertrain broker add-device --dir broker NAME` on the
edge, its folder made like these) is planned in at the next step; the edge's `fleet.toml` may
override what a device says of itself.

## Watching

```bash
hiertrain schedule watch --config edge.toml     # each plan version: which units run where, per device
```

Every step's members and loss are in `edge/fleet-log.jsonl`. To score the newest checkpoint on a
device's held-out data, copy `edge/checkpoints/` to it and there run `hiertrain evaluate --config
device.toml --checkpoint checkpoints`. The configs are documented in hiertrain's README (A fleet
of devices).
"""


def readme(*, job: str, host: str, port: int, model: str, batch: int, iterations: int, every: int) -> str:
    profile = f"hiertrain profile --model {model} --batch {batch}"
    return f"""# hiertrain job `{job}`

{model}, batch {batch}, {iterations} iterations, trained across a device, an edge server and a
cloud server. The broker runs on the edge server and the tiers reach it at `{host}:{port}`
(`hiertrain init --host` to change it).

Copy each folder to its machine as it is: `edge/` to the edge server, `cloud/` to the cloud
server, `device/` to the device (the machine with the data: a Raspberry Pi, say). Each holds its
service's config and its own credentials (mode 0600: keep them so).

Install: `pip install 'hiertrain[edge]'` on the edge server (it builds graphs, plans, and can run
the embedded broker where Mosquitto is absent), `'hiertrain[cloud]'` on the cloud server,
`'hiertrain[device]'` on the device (plain onnxruntime, also on aarch64).

## 1. The edge server, in `edge/`

```bash
hiertrain broker start --dir broker          # Mosquitto (or: hiertrain broker install-service --dir broker)
{profile} --tier edge --out profile-edge.json
hiertrain planner run --config planner.toml  # plans once the three profiles are in
hiertrain edge run --config edge.toml
```

Each of the last three runs in a terminal of its own (or as a unit: `hiertrain planner
install-service --config planner.toml`, and likewise for the edge).

{_cloud_and_device(profile, model, "The device, in `device/`")}

The device starts once the edge and the cloud are online, trains {iterations} iterations and then
stops every tier. Run it again to train again (`--resume` continues from the newest checkpoint).
Checkpoints are written every {every} iterations and collected in `device/checkpoints/`;
`hiertrain evaluate --config device.toml` scores the newest.

## Watching

```bash
hiertrain schedule watch --config edge.toml     # the planner's schedules, as they change
XDG_CONFIG_HOME=broker/credentials/observer-mosquitto mosquitto_sub -t 'hiertrain/{job}/#' -v   # on the edge
```

The configs are documented in hiertrain's README (Running it on three machines).
"""
