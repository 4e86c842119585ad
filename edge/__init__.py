"""The edge server: runs the MQTT broker (``hiertrain broker start``) and a training tier."""

from functools import partial

from hiertrain.tier import run_tier

run = partial(run_tier, "edge")
