"""``hiertrain init DIR``: a new job's files for its three machines, and a README of what to run
on each (as ``flwr new`` starts a Flower project).

::

    DIR/README.md                   the commands, machine by machine
    DIR/edge/broker/                the job-bound broker (``broker init --job``)
    DIR/edge/edge.toml  edge.json   the edge service, its credentials
    DIR/edge/planner.toml planner.json
    DIR/cloud/cloud.toml cloud.json
    DIR/device/device.toml device.json

Each folder is copied to its machine as it is: configs name their credentials relative to
themselves, and every credentials file is readable by its owner only.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

from hiertrain import MAX_BATCH, MODEL_NAMES, TIERS
from hiertrain.net import topics
from hiertrain.errors import ConfigError
from hiertrain.lab.local import toml

DATASETS = ("synthetic", "cifar10", "tiny-imagenet", "npz", "images", "csv")  # "python": entry = ... by hand
OWN_DATA = ("npz", "images", "csv")  # no test split of their own: the first HOLDOUT samples (shuffled) are held out
HOLDOUT = 64


def init(root: Path, *, job: str, host: str, port: int, bind: str, model: str, batch: int, iterations: int,
         lr: float, dataset: str, data_path: Optional[str], bw_device_edge: float, bw_edge_cloud: float,
         force: bool = False) -> list[Path]:
    """Write the job's files under ``root``; return the folders, one per machine."""
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
    if root.exists() and any(root.iterdir()) and not force:
        raise ConfigError(f"{root} is not empty; choose a new directory or pass --force")
    bdir = BrokerDir(root / "edge" / "broker")
    bdir.init(Settings(host=host, port=port, bind=bind, job=job), force=force)
    write_config(bdir)
    every = max(1, iterations // 10)
    train = {"model": model, "batch": batch, "lr": lr, "iterations": iterations, "timeout_s": 60}
    for tier in TIERS:
        folder = root / tier
        folder.mkdir(parents=True, exist_ok=True)
        if model_file is not None:
            shutil.copy2(model_file, folder / model)
        for account in (tier, "planner") if tier == "edge" else (tier,):
            shutil.copy2(bdir.credentials_file(account), folder / f"{account}.json")  # 0600, as written
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

## 2. The cloud server, in `cloud/`

```bash
{profile} --tier cloud --out profile-cloud.json
hiertrain cloud run --config cloud.toml
```

## 3. The device, in `device/`

```bash
{profile} --tier device --out profile-device.json
hiertrain device run --config device.toml
```

A device without the gradient builder (plain onnxruntime, a Raspberry Pi) profiles with graphs
built on the edge server: there, `hiertrain segments build --model {model} --out segments-{model}`;
copy `segments-{model}/` here and add `--segments segments-{model}` to the profile command. For
training it fetches what it needs from the edge over MQTT by itself.

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
