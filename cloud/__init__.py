"""The cloud server: a training tier behind the slow WAN link; keeps built segments in its cache."""

from functools import partial

from hiertrain.tier import run_tier

run = partial(run_tier, "cloud")
