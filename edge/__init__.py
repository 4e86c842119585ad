"""The edge server: runs the MQTT broker (``hiertrain broker start``) and a training tier, or, with a
``[fleet]`` table, the fleet's coordinator (:mod:`hiertrain.edge.coordinator`)."""

from hiertrain.tier import run_tier


def run(config: str, *, resume: bool = False) -> int:
    from hiertrain import tierconfig

    cfg = tierconfig.load("edge", config)
    if cfg.fleet:
        from hiertrain.edge.coordinator import Coordinator

        return Coordinator(cfg, resume=resume).run()
    return run_tier("edge", config, resume=resume)
