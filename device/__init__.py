"""The edge device (e.g. a Raspberry Pi): it holds the data and drives the iterations; in a fleet
(a ``[fleet]`` table) it is one data source and worker of many (:mod:`hiertrain.device.worker`).

It trains with plain onnxruntime (aarch64 or x86-64): segments it cannot build itself come
prebuilt, from a copied ``hiertrain segments build`` directory or from a builder tier over MQTT
(:mod:`hiertrain.train.artifacts`); with onnxruntime-training installed it builds its own.
"""

from __future__ import annotations


def run(config: str, *, resume: bool = False) -> int:
    from hiertrain import tierconfig
    from hiertrain.tier import run_tier

    cfg = tierconfig.load("device", config)
    if cfg.fleet:  # one of many devices, with its own account: the edge's coordinator drives
        from hiertrain.device.worker import DeviceWorker

        return DeviceWorker(cfg).run()
    return run_tier("device", config, resume=resume)
