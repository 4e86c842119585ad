"""The cloud server: a training tier behind the slow WAN link; keeps built segments in its cache.
With a ``[fleet]`` table it serves a fleet's coordinator (:mod:`hiertrain.cloud.worker`); with a
``[hierarchy]`` table it averages a hierarchical job's edge sites (:mod:`hiertrain.cloud.averager`)."""

from hiertrain.tier import run_tier


def run(config: str, *, resume: bool = False) -> int:
    from hiertrain import tierconfig

    cfg = tierconfig.load("cloud", config)
    if cfg.hierarchy is not None:
        from hiertrain.cloud.averager import run as average

        return average(cfg)
    if cfg.fleet:
        from hiertrain.cloud.worker import CloudWorker

        return CloudWorker(cfg).run()
    return run_tier("cloud", config, resume=resume)
