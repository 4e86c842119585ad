"""Random but plausible hiertrain-profile/1 instances for planner tests."""

import numpy as np

from hiertrain.profile import Profile


def random_profile(rng: np.random.Generator, n: int, *, can_train=(True, True, True)) -> Profile:
    speed = {"device": rng.uniform(5, 40), "edge": rng.uniform(1, 8), "cloud": rng.uniform(0.05, 2)}
    base_f = rng.uniform(1e-5, 2e-3, n)
    tiers = {}
    for (tier, k), ok in zip(speed.items(), can_train):
        noise = rng.uniform(0.7, 1.3, n)
        entry = {"forward_s": list(base_f * k * noise), "backward_s": list(2 * base_f * k * noise * rng.uniform(0.8, 1.2)),
                 "update_s": list(rng.uniform(0, 1e-3, n) * k)}
        if not ok:
            entry = {"forward_s": [], "backward_s": [], "update_s": [], "can_train": False}
        tiers[tier] = entry
    layers = [{"name": f"u{i + 1}", "output_bytes": float(rng.choice([rng.uniform(10, 500), rng.uniform(1e3, 6e4)])),
               "param_bytes": float(rng.uniform(0, 5e5))} for i in range(n)]
    return Profile.from_json({"format": "hiertrain-profile/1", "model": f"random{n}",
                              "sample_bytes": float(rng.uniform(1e3, 2e4)), "layers": layers, "tiers": tiers})


def planner_config(directory, credentials, *, job: str = "t", rates: bool = True):
    """A planner.toml (batch 32, hysteresis 0.25) over a random five-unit profile, with initial link
    rates of 5 Mbit/s unless ``rates`` is false; returns (config, profile) paths."""
    import json

    profile = directory / "profile.json"
    profile.write_text(json.dumps(random_profile(np.random.default_rng(4), 5).to_json()))
    cfg = directory / "planner.toml"
    cfg.write_text(f'job = "{job}"\n[broker]\ncredentials = "{credentials}"\n'
                   f'[planner]\nbatch = 32\nhysteresis = 0.25\nprofile = "{profile}"\n'
                   + ("bw_device_edge = 5.0\nbw_edge_cloud = 5.0\n" if rates else ""))
    return cfg, profile
